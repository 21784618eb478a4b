"""The progress bar: tqdm on stderr counting rows, or nothing."""

from __future__ import annotations

import os
import sys
from typing import Any

from .common import ETL_EXTRA_HINT, log


class NoBar:
    """The bar :func:`progress_bar` returns when none is shown: its methods do nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(
    enabled: bool, *, total: int | None = None, initial: int = 0, desc: str | None = None
) -> Any:
    """A tqdm bar on stderr counting rows (rate, ETA when ``total`` is known).

    Shown only when ``enabled`` and stderr is a terminal, so it never lands in a log file or
    in the data. Without tqdm installed, a warning is logged and no bar is shown.
    """
    if not enabled:
        return NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        log.warning("progress=True needs tqdm (%s); showing no progress", ETL_EXTRA_HINT)
        return NoBar()
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=" rows",
        unit_scale=True,
        file=sys.stderr,
        disable=None,  # None: off when stderr is not a terminal
        dynamic_ncols=columns > 0,
        ncols=None if columns > 0 else 80,  # a terminal that reports no size (some ptys)...
        nrows=None if columns > 0 else 24,  # ...would otherwise get a bar of width 0
        mininterval=0.5,
    )
