"""What every part of :mod:`pool.etl` shares: the error, the optional imports, the ``columns=``
types, and returning memory and flushing files between chunks.

Install hints name the distribution, ``prediction-pool``; the import name is ``pool``.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import importlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import PoolError

log = logging.getLogger("pool")

#: ``columns=``: one column name (single-input models), several names stacked into one input,
#: or ``{model input: column or [columns]}``.
Columns = str | Sequence[str] | Mapping[str, str | Sequence[str]] | None
#: ``output_column=``: the new column's name (single-output models) or ``{output: column}``.
OutputColumns = str | Mapping[str, str] | None


class EtlError(PoolError, ValueError):
    """An input, column, value type or output path the job cannot use.

    Raised before any worker starts where the check does not need the model, and before any row
    is dispatched otherwise. The command line reports it in one line and exits with status 2.
    """


#: The extra that brings pandas, pyarrow and tqdm.
ETL_EXTRA_HINT = "pip install 'prediction-pool[etl]'"


def import_optional(module: str) -> Any:
    """Import ``module`` of the ``etl`` extra, or raise ``ImportError`` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module.partition('.')[0]} is needed for data frames, Arrow and files: "
            f"{ETL_EXTRA_HINT} ({exc})"
        ) from exc


# --- memory and disk, between chunks ------------------------------------------------------


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):  # not glibc
        return None


def return_free_memory(collect: bool = True) -> None:
    """Hand memory freed since the last chunk back to the OS, so the process's footprint follows
    what it holds (a chunk or two) instead of ratcheting up with the rows done.

    ``gc.collect`` first, so that any cyclic garbage of the chunk (pandas and Arrow objects)
    is freed before Arrow's pool and the C heap are trimmed (``collect=False``: not, where a
    full collection is slow, as in a Dask worker holding a model)."""
    if collect:
        gc.collect()
    import_optional("pyarrow").default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file or a directory) to disk; best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
