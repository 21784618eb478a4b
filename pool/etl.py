"""Data frames, Arrow and files through the pool: the ETL edge of the package.

pandas, pyarrow and tqdm are the optional ``etl`` extra (``pip install 'pool[etl]'``). This module
imports them only inside the functions that use them, so ``import pool`` works without them.

In memory (``PredictionPool.predict(frame, columns=...)`` and ``PredictionPool.map_batches``)::

    DataFrame / Series / RecordBatch / Table / Arrow array
      ▼ to_inputs             columns -> {model input: ndarray}, each checked against its input
      ▼ PredictionPool.imap   at most max_in_flight shards ahead, results in input order
      ▼ with_predictions      one new column per output (vectors: list / fixed-size-list column)
    each batch, with its predictions, in input order

Files (:func:`predict_file` and ``python -m pool predict``)::

    Source: Parquet row groups (ParquetFile.iter_batches) / CSV blocks / .npy memory map
      ▼ _pieces               <= shard_size rows each, never across a chunk boundary
      ▼ PredictionPool.imap
      ▼ chunk_rows output rows ──commit──▶ .OUT.partial/part-000007-65536.parquet
      ▼ every chunk committed ──assemble──▶ .OUT.partial/.tmp-output ──os.replace──▶ OUT

Commit and resume. Chunk ``k`` holds input rows ``[k * chunk_rows, (k + 1) * chunk_rows)``. It
is written to a temporary name in the staging directory ``.OUT.partial/`` next to the output,
flushed to disk, and renamed to ``part-<k>-<rows><suffix>``: a part exists under its final name
only complete, and its name says how many rows it holds. ``manifest.json`` records what the job
is (input path, size and mtime, model, columns, formats, ``chunk_rows``). ``resume=True`` checks
the manifest against the new call, keeps the parts ``0..k-1`` present with the expected row
counts, and starts reading at row ``k * chunk_rows``: nothing committed is recomputed, nothing
uncommitted is skipped. When the input is exhausted the parts are concatenated in order into a
temporary file inside the staging directory, which is renamed over ``OUT`` (same directory, so
the rename is atomic) before the staging directory is removed. ``OUT`` therefore only ever
appears complete. A ``lock`` file holding the owner's pid keeps two jobs off one output.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import gc
import importlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

from . import sharding
from .errors import PoolError, WorkerCrashedError, WorkerError
from .messages import DEFAULT_INPUT, DEFAULT_OUTPUT, STRING, SignatureInfo, TensorInfo

if TYPE_CHECKING:
    from .prediction_pool import PredictionPool

log = logging.getLogger("pool")

#: File formats, by file name suffix.
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".npy": "npy"}
#: Automatic ``chunk_rows`` aims at about this many bytes of input plus output per chunk...
TARGET_CHUNK_BYTES = 32 << 20
#: ...and at most this many rows.
MAX_CHUNK_ROWS = 1 << 20
#: Rows read to estimate row sizes and check value types before the job starts.
SAMPLE_ROWS = 256
MANIFEST_VERSION = 1

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


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module.partition('.')[0]} is needed for data frames, Arrow and files: "
            f"pip install 'pool[etl]' ({exc})"
        ) from exc


# --- in memory: frames and Arrow in, NumPy to the pool --------------------------------------


def is_table(x: Any) -> bool:
    """Whether ``x`` is a pandas Series/DataFrame or a pyarrow array/RecordBatch/Table.

    Never imports pandas or pyarrow: an object of theirs can only exist once they are imported.
    """
    root = type(x).__module__.partition(".")[0]
    if root == "pandas":
        import pandas as pd

        return isinstance(x, (pd.Series, pd.DataFrame))
    if root == "pyarrow":
        import pyarrow as pa

        return isinstance(x, (pa.Array, pa.ChunkedArray, pa.RecordBatch, pa.Table))
    return False


def _is_frame(x: Any) -> bool:
    """A table with named columns (DataFrame, RecordBatch, Table), not a single column."""
    return is_table(x) and hasattr(x, "columns") and type(x).__name__ != "Series"


def _column_names(frame: Any) -> list:
    names = getattr(frame, "column_names", None)  # pyarrow
    return list(names) if names is not None else list(frame.columns)


def _num_rows(frame: Any) -> int:
    return frame.num_rows if hasattr(frame, "num_rows") else len(frame)


def _input_names(signature: SignatureInfo) -> list[str] | None:
    return None if signature.inputs is None else [t.name for t in signature.inputs]


def resolve_columns(
    available: Sequence[Any], signature: SignatureInfo, columns: Columns = None
) -> dict[str, Any]:
    """Decide which column (or list of columns) feeds each model input; raise ``EtlError``.

    Without ``columns``, an input is fed by the column of the same name, and a single-input
    model by the only column of a one-column table.
    """
    inputs = _input_names(signature)
    expected = signature.describe_inputs()
    if columns is None:
        if inputs is None:
            if len(available) == 1:
                return {DEFAULT_INPUT: available[0]}
            raise EtlError(
                f"the model declares no input names and the data has {len(available)} columns "
                f"{list(available)}: name the column with columns= / --column"
            )
        mapping = {name: name for name in inputs if name in available}
        if len(mapping) == len(inputs):
            return mapping
        if len(inputs) == 1 and len(available) == 1:
            return {inputs[0]: available[0]}
        missing = [name for name in inputs if name not in mapping]
        raise EtlError(
            f"no column named {missing[0]!r} for the model's input {missing[0]!r} (inputs "
            f"{expected}); the data has columns {list(available)}: choose with columns= / --column"
        )
    if isinstance(columns, Mapping):
        mapping = {str(k): v for k, v in columns.items()}
        if inputs is not None:
            unknown = sorted(set(mapping) - set(inputs))
            missing = sorted(set(inputs) - set(mapping))
            if unknown or missing:
                raise EtlError(
                    f"columns= must map every model input {expected} to a column: "
                    f"unknown inputs {unknown}, unmapped inputs {missing}"
                )
    else:
        if inputs is not None and len(inputs) != 1:
            raise EtlError(
                f"the model has {len(inputs)} inputs {expected}: map each to a column, e.g. "
                f"columns={{{inputs[0]!r}: 'column'}} / --column {inputs[0]}=COLUMN"
            )
        mapping = {inputs[0] if inputs else DEFAULT_INPUT: columns}
    for source in mapping.values():
        for name in _as_list(source):
            if name not in available:
                raise EtlError(f"unknown column {name!r}; the data has columns {list(available)}")
    return mapping


def _as_list(source: Any) -> list:
    if isinstance(source, (str, bytes)) or not isinstance(source, Sequence):
        return [source]
    return list(source)


def _label(source: Any) -> str:
    names = _as_list(source)
    return f"column {names[0]!r}" if len(names) == 1 else f"columns {names}"


def _empty_like(spec: TensorInfo | None) -> np.ndarray | None:
    if spec is None or spec.shape is None or any(d is None for d in spec.shape[1:]):
        return None
    return np.empty((0, *spec.shape[1:]), dtype=spec.numpy_dtype)


def _arrow_to_numpy(
    column: Any, label: str, spec: TensorInfo | None, first_row: int = 0
) -> np.ndarray:
    """One Arrow column as a NumPy batch: strings as objects, equal-length lists stacked."""
    pa = _require("pyarrow")
    pc = _require("pyarrow.compute")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if column.null_count:
        first = first_row + pc.index(column.is_null(), True).as_py()
        raise EtlError(f"{label} has {column.null_count} null value(s), the first at row {first}")
    if len(column) == 0 and (empty := _empty_like(spec)) is not None:
        return empty
    kind = column.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        if pa.types.is_fixed_size_list(kind):
            width = kind.list_size
        else:
            bounds = pc.min_max(pc.list_value_length(column)).as_py()
            if bounds["min"] != bounds["max"]:
                raise EtlError(
                    f"{label} holds lists of different lengths ({bounds['min']} to "
                    f"{bounds['max']}); every row must have the same shape"
                )
            width = bounds["min"] or 0
        inner = _arrow_to_numpy(column.flatten(), label, None)
        return inner.reshape(len(column), width, *inner.shape[1:])
    return column.to_numpy(zero_copy_only=False)


def _series_to_numpy(
    series: Any, label: str, spec: TensorInfo | None, first_row: int = 0
) -> np.ndarray:
    """One pandas column as a NumPy batch; sequences in an object column are stacked."""
    plain_float = isinstance(series.dtype, np.dtype) and series.dtype.kind == "f"
    if not plain_float:  # NaN is a value in a float column, but a missing value elsewhere
        missing = series.isna().to_numpy()
        if missing.any():
            raise EtlError(
                f"{label} has {int(missing.sum())} missing value(s), the first at row "
                f"{first_row + int(np.argmax(missing))}"
            )
    numpy_dtype = getattr(series.dtype, "numpy_dtype", None)  # nullable Int64, Float32, ...
    values = series.to_numpy(dtype=numpy_dtype) if numpy_dtype is not None else series.to_numpy()
    if values.dtype == object and len(values) and isinstance(values[0], (list, tuple, np.ndarray)):
        try:
            return np.stack([np.asarray(v) for v in values])
        except ValueError:
            raise EtlError(
                f"{label} holds sequences of different shapes; every row must have the same shape"
            ) from None
    if len(values) == 0 and (empty := _empty_like(spec)) is not None:
        return empty
    return values


def _column_to_numpy(
    column: Any, label: str, spec: TensorInfo | None, first_row: int = 0
) -> np.ndarray:
    if type(column).__module__.startswith("pandas"):
        return _series_to_numpy(column, label, spec, first_row)
    return _arrow_to_numpy(column, label, spec, first_row)


def _gather(frame: Any, source: Any, spec: TensorInfo | None, first_row: int) -> np.ndarray:
    """The column (or the columns, side by side) that feed one input."""
    names = _as_list(source)
    parts = [_column_to_numpy(frame[name], _label(name), spec, first_row) for name in names]
    if len(parts) == 1:
        return parts[0]
    return np.stack(parts, axis=1)


def _checked(
    arrays: dict[str, np.ndarray], sources: Mapping[str, Any], signature: SignatureInfo
) -> dict[str, np.ndarray]:
    """Validate each input on its own, so the error names the column that does not fit."""
    if signature.inputs is None:
        return arrays
    specs = {t.name: t for t in signature.inputs}
    checked = {}
    for name, array in arrays.items():
        alone = SignatureInfo(inputs=(specs[name],), outputs=None, single_output=None)
        try:
            prepared, _ = sharding.prepare({name: array}, alone)
        except (TypeError, ValueError) as exc:
            raise type(exc)(
                f"{_label(sources[name])} does not fit the model's input {name!r}: {exc}"
            ) from None
        checked[name] = prepared[name]
    return checked


def to_inputs(
    data: Any, signature: SignatureInfo, columns: Columns = None, first_row: int = 0
) -> dict[str, np.ndarray]:
    """``{model input: ndarray}`` from a pandas Series/DataFrame or an Arrow array/batch/table.

    A Series or Arrow array feeds a single-input model. For a DataFrame, RecordBatch or Table,
    ``columns`` says which column feeds which input (see :func:`resolve_columns`); a list of
    columns is stacked side by side into one ``[N, k]`` input, and a column of equal-length
    lists (or arrays) becomes an ``[N, k, ...]`` input. Raises ``EtlError`` for an unknown
    column or a null value, ``TypeError``/``ValueError`` naming the column when it does not fit.
    Rows in messages are counted from ``first_row`` (where ``data`` starts in a file).
    """
    if not is_table(data):
        raise TypeError(
            "columns= applies to pandas Series/DataFrame and pyarrow arrays, RecordBatch and "
            f"Table inputs, got {type(data).__name__}"
        )
    specs = {t.name: t for t in signature.inputs} if signature.inputs is not None else {}
    if _is_frame(data):
        sources = resolve_columns(_column_names(data), signature, columns)
        arrays = {
            name: _gather(data, source, specs.get(name), first_row)
            for name, source in sources.items()
        }
    else:
        if columns is not None:
            raise TypeError(
                "columns= names columns of a DataFrame, RecordBatch or Table; a "
                f"{type(data).__name__} is a single column already"
            )
        inputs = _input_names(signature)
        if inputs is not None and len(inputs) != 1:
            raise EtlError(
                f"the model has {len(inputs)} inputs {signature.describe_inputs()}: pass a "
                f"DataFrame or RecordBatch with columns=, not a {type(data).__name__}"
            )
        name = inputs[0] if inputs else DEFAULT_INPUT
        label = getattr(data, "name", None) or name
        sources = {name: label}
        arrays = {name: _column_to_numpy(data, _label(label), specs.get(name), first_row)}
    return _checked(arrays, sources, signature)


# --- predictions back into frames ------------------------------------------------------------


def _as_outputs(prediction: Any, signature: SignatureInfo) -> dict[str, np.ndarray]:
    """``{output name: array}``, by name: new columns come in the same order every time."""
    if isinstance(prediction, Mapping):
        return {name: prediction[name] for name in sorted(prediction)}
    return {signature.single_output or DEFAULT_OUTPUT: prediction}


def _output_names(signature: SignatureInfo) -> list[str] | None:
    """The names of what ``predict`` returns, or ``None`` when the model does not declare them."""
    if signature.single_output is not None:
        return [signature.single_output]
    if signature.outputs is None:
        return None
    return [t.name for t in signature.outputs]


def output_columns(
    outputs: Sequence[str], output_column: OutputColumns, existing: Sequence[Any]
) -> dict[str, str]:
    """``{model output: new column name}``; raise ``EtlError`` on a clash with ``existing``."""
    if output_column is None:
        names = {name: name for name in outputs}
    elif isinstance(output_column, str):
        if len(outputs) != 1:
            raise EtlError(
                f"the model has {len(outputs)} outputs {list(outputs)}: name their columns with "
                f"output_column={{{outputs[0]!r}: 'column', ...}} / --output-column OUTPUT=COLUMN"
            )
        names = {outputs[0]: output_column}
    else:
        unknown = sorted(set(output_column) - set(outputs))
        if unknown:
            raise EtlError(
                f"output_column names unknown outputs {unknown}; the model has {outputs}"
            )
        names = {name: output_column.get(name, name) for name in outputs}
    for column in names.values():
        if column in existing:
            raise EtlError(
                f"output column {column!r} already exists in the input; choose another name "
                "with output_column= / --output-column"
            )
    if len(set(names.values())) != len(names):
        raise EtlError(f"two outputs would share a column: {names}")
    return names


def arrow_column(values: np.ndarray) -> Any:
    """An Arrow array for a NumPy batch: ``[N]`` plain, ``[N, d, ...]`` nested fixed-size lists."""
    pa = _require("pyarrow")
    values = np.ascontiguousarray(values)
    if values.ndim <= 1:
        return pa.array(values)
    column = pa.array(values.reshape(-1))
    for width in reversed(values.shape[1:]):
        column = pa.FixedSizeListArray.from_arrays(column, width)
    return column


def _pandas_column(values: np.ndarray, index: Any) -> Any:
    pd = _require("pandas")
    if values.ndim <= 1:
        return pd.Series(values, index=index)
    rows = np.empty(len(values), dtype=object)
    for i, row in enumerate(values):
        rows[i] = row
    return pd.Series(rows, index=index, dtype=object)


def with_predictions(frame: Any, columns: Mapping[str, np.ndarray]) -> Any:
    """A copy of ``frame`` (DataFrame, RecordBatch or Table) with ``columns`` appended."""
    if type(frame).__module__.startswith("pandas"):
        out = frame.copy(deep=False)
        for name, values in columns.items():
            out[name] = _pandas_column(values, frame.index)
        return out
    pa = _require("pyarrow")
    arrays, schema = list(frame.columns), frame.schema  # the schema keeps its metadata
    for name, values in columns.items():
        arrays.append(arrow_column(values))
        schema = schema.append(pa.field(name, arrays[-1].type))
    if isinstance(frame, pa.Table):
        return pa.Table.from_arrays(arrays, schema=schema)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _as_frame(batch: Any) -> Any:
    if _is_frame(batch):
        return batch
    if is_table(batch) and type(batch).__name__ == "Series":
        return batch.to_frame()
    raise TypeError(
        "map_batches expects pandas DataFrames or pyarrow RecordBatches/Tables, got "
        f"{type(batch).__name__}"
    )


# --- progress ----------------------------------------------------------------------------------


class _NoBar:
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
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        log.warning("progress=True needs tqdm (pip install 'pool[etl]'); showing no progress")
        return _NoBar()
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


# --- streaming batches ------------------------------------------------------------------------


def map_batches(
    pool: PredictionPool,
    batches: Iterable[Any],
    *,
    columns: Columns = None,
    output_column: OutputColumns = None,
    shard_size: int | None = None,
    max_in_flight: int | None = None,
    progress: bool = False,
    total: int | None = None,
) -> Iterator[Any]:
    """Yield each data frame or record batch of ``batches`` with its predictions as new columns.

    Batches are yielded in input order. At most ``max_in_flight`` shards (default: the pool's)
    are submitted ahead of the batch being yielded, so the batches held in memory are bounded
    however long ``batches`` is; pass a generator (``pd.read_csv(..., chunksize=)``,
    ``ParquetFile.iter_batches()``) to stream data larger than memory. Vector outputs become
    list columns (pandas: one ndarray per row; Arrow: fixed-size lists). ``total`` (rows) gives
    the progress bar an ETA.
    """
    signature = pool.signature
    names = _output_names(signature)
    window: deque[Any] = deque()

    def feed() -> Iterator[dict[str, np.ndarray]]:
        for batch in batches:
            frame = _as_frame(batch)
            arrays = to_inputs(frame, signature, columns)
            if names is not None:
                output_columns(names, output_column, _column_names(frame))
            window.append(frame)
            yield arrays

    bar = progress_bar(progress, total=total)
    try:
        for prediction in pool.imap(feed(), shard_size=shard_size, max_in_flight=max_in_flight):
            frame = window.popleft()
            outputs = _as_outputs(prediction, signature)
            named = output_columns(list(outputs), output_column, _column_names(frame))
            bar.update(_num_rows(frame))
            yield with_predictions(frame, {named[k]: v for k, v in outputs.items()})
    finally:
        bar.close()


# --- a SavedModel's signature without TensorFlow ---------------------------------------------

_TF_DTYPES = {
    1: "float32",
    2: "float64",
    3: "int32",
    4: "uint8",
    5: "int16",
    6: "int8",
    7: STRING,
    9: "int64",
    10: "bool",
    17: "uint16",
    19: "float16",
    22: "uint32",
    23: "uint64",
}


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, Any]]:
    """The (field number, value) pairs of one protobuf message, in wire order."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def _tensor_info(name: str, buf: memoryview) -> TensorInfo | None:
    dtype, shape = None, ()
    for number, value in _fields(buf):
        if number == 2:
            dtype = _TF_DTYPES.get(value)
        elif number == 3:  # TensorShapeProto
            dims: list[int | None] | None = []
            for field, item in _fields(value):
                if field == 2 and dims is not None:
                    size = dict(_fields(item)).get(1, 0)
                    size -= (1 << 64) if size >= 1 << 63 else 0
                    dims.append(None if size < 0 else size)
                elif field == 3 and item:
                    dims = None
            shape = None if dims is None else tuple(dims)
        elif number in (4, 5):  # sparse or composite tensors: not checked here
            return None
    return None if dtype is None else TensorInfo(name=name, dtype=dtype, shape=shape)


def peek_signature(
    model: Any, signature: str = "serving_default", output: str | None = None
) -> SignatureInfo | None:
    """Read a local SavedModel's signature from ``saved_model.pb`` without TensorFlow.

    Used to check columns against the model before any worker starts. Best effort: ``None``
    for anything but a plain local SavedModel; the pool's own check after loading is final.
    """
    if not isinstance(model, (str, os.PathLike)) or "://" in str(model):
        return None
    try:
        buf = memoryview(Path(model, "saved_model.pb").read_bytes())
        for number, meta_graph in _fields(buf):
            if number != 2:  # SavedModel.meta_graphs
                continue
            for field, entry in _fields(meta_graph):
                if field != 5:  # MetaGraphDef.signature_def
                    continue
                items = dict(_fields(entry))
                if bytes(items.get(1, b"")).decode() != signature:
                    continue
                sides: dict[int, list[TensorInfo]] = {1: [], 2: []}
                for side, tensors in _fields(items.get(2, memoryview(b""))):
                    if side in sides:
                        pair = dict(_fields(tensors))
                        info = _tensor_info(bytes(pair[1]).decode(), pair.get(2, memoryview(b"")))
                        if info is None:
                            return None
                        sides[side].append(info)
                inputs = tuple(sorted(sides[1], key=lambda t: t.name))
                outputs = tuple(sorted(sides[2], key=lambda t: t.name))
                if output is not None:
                    outputs = tuple(t for t in outputs if t.name == output)
                if not inputs or not outputs:
                    return None
                single = outputs[0].name if len(outputs) == 1 else None
                return SignatureInfo(inputs=inputs, outputs=outputs, single_output=single)
    except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError):
        return None
    return None


# --- files: sources ---------------------------------------------------------------------------


def _format_of(path: Path, given: str | None, role: str) -> str:
    if given is not None:
        if given not in set(FORMATS.values()):
            raise EtlError(
                f"unknown {role} format {given!r}; expected one of {sorted(set(FORMATS.values()))}"
            )
        return given
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        raise EtlError(
            f"cannot tell the format of {role} {str(path)!r} from its suffix; expected one of "
            f"{sorted(FORMATS)} (or pass the {role} format)"
        )
    return found


def _arrow_error() -> tuple[type[BaseException], ...]:
    pa = _require("pyarrow")
    return (pa.ArrowException,)


class _ParquetSource:
    """Row groups of a Parquet file, read a batch at a time (never the whole file)."""

    format = "parquet"

    def __init__(self, path: Path) -> None:
        pq = _require("pyarrow.parquet")
        self.path = path
        try:
            # pre_buffer off and a read buffer: column chunks stream instead of loading whole.
            self._file = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        except (*_arrow_error(), OSError) as exc:
            raise EtlError(f"{path}: not a readable Parquet file ({exc})") from None
        self.schema = self._file.schema_arrow
        self.num_rows: int | None = self._file.metadata.num_rows

    def batches(self, start: int, batch_rows: int, strings: Sequence[str] = ()) -> Iterator[Any]:
        meta = self._file.metadata
        offsets = [0]
        for group in range(meta.num_row_groups):
            offsets.append(offsets[-1] + meta.row_group(group).num_rows)
        first = bisect.bisect_right(offsets, start) - 1
        if first >= meta.num_row_groups:
            return
        skip = start - offsets[first]
        groups = list(range(first, meta.num_row_groups))
        for batch in self._file.iter_batches(batch_size=batch_rows, row_groups=groups):
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            if skip:
                batch, skip = batch.slice(skip), 0
            yield batch

    def close(self) -> None:
        self._file.close()


class _CsvSource:
    """A CSV file, parsed a block at a time; columns that feed text inputs are read as text."""

    format = "csv"

    def __init__(self, path: Path) -> None:
        self.path = path
        reader = self._open({})
        self.schema = reader.schema
        reader.close()
        self.num_rows: int | None = None

    def _open(self, column_types: dict[str, Any]) -> Any:
        pacsv = _require("pyarrow.csv")
        try:
            options = pacsv.ConvertOptions(column_types=column_types)
            return pacsv.open_csv(self.path, convert_options=options)
        except (*_arrow_error(), OSError) as exc:
            raise EtlError(f"{self.path}: cannot read CSV ({exc})") from None

    def batches(self, start: int, batch_rows: int, strings: Sequence[str] = ()) -> Iterator[Any]:
        pa = _require("pyarrow")
        reader = self._open({name: pa.string() for name in strings})
        skip = start
        try:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except _arrow_error() as exc:
                    raise EtlError(f"{self.path}: cannot read CSV ({exc})") from None
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                if skip:
                    batch, skip = batch.slice(skip), 0
                yield batch
        finally:
            reader.close()

    def count_rows(self) -> int:
        """Rows of the file (one fast parsing pass over the first column only)."""
        pa = _require("pyarrow")
        pacsv = _require("pyarrow.csv")
        first = self.schema.names[0]
        options = pacsv.ConvertOptions(include_columns=[first], column_types={first: pa.string()})
        rows = 0
        try:
            with pacsv.open_csv(self.path, convert_options=options) as reader:
                for batch in reader:
                    rows += batch.num_rows
        except _arrow_error() as exc:
            raise EtlError(f"{self.path}: cannot read CSV ({exc})") from None
        return rows

    def close(self) -> None:
        pass


class _NpySource:
    """A ``.npy`` array, memory-mapped: one column named after the model's input."""

    format = "npy"

    def __init__(self, path: Path, name: str | None) -> None:
        self.path = path
        try:
            self._array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise EtlError(
                f"{path}: {exc}; save text as a fixed-width string array, e.g. "
                "np.save(path, np.asarray(texts, dtype=str))"
            ) from None
        except OSError as exc:
            raise EtlError(f"{path}: not a readable .npy file ({exc})") from None
        if self._array.ndim == 0:
            raise EtlError(f"{path}: holds a scalar; expected an array with one row per input")
        self.name = name
        self.num_rows: int | None = self._array.shape[0]

    @property
    def schema(self) -> Any:
        pa = _require("pyarrow")
        empty = np.empty((0, *self._array.shape[1:]), dtype=self._array.dtype)
        return pa.schema([pa.field(self.name or DEFAULT_INPUT, arrow_column(empty).type)])

    def batches(self, start: int, batch_rows: int, strings: Sequence[str] = ()) -> Iterator[Any]:
        pa = _require("pyarrow")
        for begin in range(start, self._array.shape[0], batch_rows):
            values = np.ascontiguousarray(self._array[begin : begin + batch_rows])
            yield pa.record_batch([arrow_column(values)], names=[self.name or DEFAULT_INPUT])

    def close(self) -> None:
        self._array = None


def _open_source(path: Path, fmt: str, columns: Columns) -> Any:
    if not path.exists():
        raise EtlError(f"input {str(path)!r} does not exist")
    if not path.is_file():
        raise EtlError(f"input {str(path)!r} is not a file")
    if not os.access(path, os.R_OK):
        raise EtlError(f"input {str(path)!r} is not readable")
    if fmt == "parquet":
        return _ParquetSource(path)
    if fmt == "csv":
        return _CsvSource(path)
    if isinstance(columns, Mapping):
        if len(columns) != 1:
            raise EtlError(f"a .npy input holds one array, but columns= maps {len(columns)} inputs")
        (name,) = columns.values()
    else:
        name = columns
    if name is not None and not isinstance(name, str):
        raise EtlError("a .npy input holds one array: name it with one column name")
    return _NpySource(path, name)


def _type_problem(field: Any, spec: TensorInfo) -> str | None:
    """Why an Arrow column of this type cannot feed ``spec``, or ``None`` if it can."""
    pa = _require("pyarrow")
    kind, depth, widths = field.type, 0, []
    while True:
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        elif pa.types.is_fixed_size_list(kind):
            widths.append(kind.list_size)
            kind, depth = kind.value_type, depth + 1
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
            widths.append(None)
            kind, depth = kind.value_type, depth + 1
        else:
            break
    given = f"{field.name!r} has type {field.type}"
    wanted = f"the model's input {spec.describe()}"
    if spec.dtype == STRING:
        textual = (
            pa.types.is_string(kind)
            or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)
        )
        if not textual:
            return f"column {given}, but {wanted} expects text"
    else:
        numeric = (
            pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
        )
        if not numeric:
            return f"column {given}, but {wanted} expects {spec.dtype} numbers"
        have, want = np.dtype(kind.to_pandas_dtype()), spec.numpy_dtype
        if not (np.can_cast(have, want, casting="safe") or (have.kind == want.kind == "f")):
            return f"column {given}, which cannot be cast safely to {spec.dtype} for {wanted}"
    if spec.shape is not None and depth != len(spec.shape) - 1:
        return (
            f"column {given} (rank {depth + 1} per batch), but {wanted} has rank {len(spec.shape)}"
        )
    if spec.shape is not None:
        for want_width, have_width in zip(spec.shape[1:], widths, strict=False):
            if want_width is not None and have_width is not None and want_width != have_width:
                return f"column {given}, but {wanted} needs {want_width} values per row"
    return None


def _check_types(schema: Any, sources: Mapping[str, Any], signature: SignatureInfo) -> None:
    """Raise ``EtlError`` if a column's Arrow type cannot feed its model input."""
    if signature.inputs is None:
        return
    specs = {t.name: t for t in signature.inputs}
    for name, source in sources.items():
        names = _as_list(source)
        spec = specs[name]
        if len(names) > 1 and spec.shape is not None:  # side-by-side scalars: check one scalar
            spec = TensorInfo(spec.name, spec.dtype, spec.shape[:-1])
        for column in names:
            problem = _type_problem(schema.field(column), spec)
            if problem:
                raise EtlError(problem)


# --- files: sinks -----------------------------------------------------------------------------


def _output_table(pieces: Sequence[Any], outputs: Sequence[Mapping[str, np.ndarray]]) -> Any:
    pa = _require("pyarrow")
    batches = [with_predictions(p, o) for p, o in zip(pieces, outputs, strict=True)]
    return pa.Table.from_batches(batches)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):  # not glibc
        return None


def _return_free_memory() -> None:
    """Hand memory freed since the last chunk back to the OS, so the process's footprint follows
    what it holds (a chunk or two) instead of ratcheting up with the rows done.

    ``gc.collect`` first: a finished call's shard futures and their results form a reference
    cycle (each future's done-callback closes over the list of futures), so without it the
    results of many chunks wait for the cyclic collector. Then Arrow's pool and the C heap."""
    gc.collect()
    _require("pyarrow").default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _fsync(path: Path) -> None:
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


class _ParquetSink:
    """Each chunk a one-row-group Parquet part; assembled row group by row group."""

    format = "parquet"
    suffix = ".parquet"

    def write_part(self, pieces: Sequence[Any], outputs: Sequence[Any], path: Path) -> None:
        pq = _require("pyarrow.parquet")
        table = _output_table(pieces, outputs)
        pq.write_table(table, path, row_group_size=max(1, table.num_rows))

    def assemble(self, parts: Sequence[Path], target: Path, total_rows: int) -> None:
        pq = _require("pyarrow.parquet")
        writer = None
        try:
            for part in parts:  # one chunk in memory at a time, released before the next
                with pq.ParquetFile(part, pre_buffer=False) as source:
                    if writer is None:
                        schema = source.schema_arrow
                        writer = pq.ParquetWriter(target, schema)
                    for group in range(source.num_row_groups):
                        table = source.read_row_group(group, use_threads=False)
                        if not table.schema.equals(schema):
                            table = table.cast(schema)
                        writer.write_table(table, row_group_size=max(1, table.num_rows))
                        del table
                _return_free_memory()
        finally:
            if writer is not None:
                writer.close()


def _csv_ready(table: Any) -> Any:
    """List columns as JSON arrays (``[0.25, -1.5]``): CSV has no list type."""
    pa = _require("pyarrow")
    for index, field in enumerate(table.schema):
        kind = field.type
        if (
            pa.types.is_fixed_size_list(kind)
            or pa.types.is_list(kind)
            or pa.types.is_large_list(kind)
        ):
            text = [json.dumps(row) for row in table.column(index).to_pylist()]
            table = table.set_column(index, field.name, pa.array(text, pa.string()))
    return table


def _csv_header(names: Sequence[str]) -> bytes:
    pa = _require("pyarrow")
    pacsv = _require("pyarrow.csv")
    sink = pa.BufferOutputStream()
    pacsv.write_csv(pa.table({n: pa.array([], pa.string()) for n in names}), sink)
    return sink.getvalue().to_pybytes()


class _CsvSink:
    """Each chunk a CSV part with its header; assembled as one header plus every part's rows."""

    format = "csv"
    suffix = ".csv"

    def write_part(self, pieces: Sequence[Any], outputs: Sequence[Any], path: Path) -> None:
        pacsv = _require("pyarrow.csv")
        pacsv.write_csv(_csv_ready(_output_table(pieces, outputs)), path)

    def assemble(self, parts: Sequence[Path], target: Path, total_rows: int) -> None:
        pacsv = _require("pyarrow.csv")
        with pacsv.open_csv(parts[0]) as reader:
            header = _csv_header(reader.schema.names)
        with open(target, "wb") as out:
            out.write(header)
            for part in parts:
                with open(part, "rb") as source:
                    if source.read(len(header)) != header:
                        raise EtlError(f"{part}: its header differs from the first part's")
                    shutil.copyfileobj(source, out, 1 << 20)


class _NpySink:
    """Each chunk an ``.npy`` part of the predictions; assembled into one ``[N, ...]`` array."""

    format = "npy"
    suffix = ".npy"

    def write_part(self, pieces: Sequence[Any], outputs: Sequence[Any], path: Path) -> None:
        (name,) = outputs[0]
        np.save(path, np.concatenate([o[name] for o in outputs]), allow_pickle=False)

    def assemble(self, parts: Sequence[Path], target: Path, total_rows: int) -> None:
        first = np.load(parts[0], mmap_mode="r")
        if total_rows == 0:
            np.save(target, np.asarray(first), allow_pickle=False)
            return
        out = np.lib.format.open_memmap(
            target, mode="w+", dtype=first.dtype, shape=(total_rows, *first.shape[1:])
        )
        at = 0
        for part in parts:
            values = np.load(part, mmap_mode="r")
            out[at : at + len(values)] = values
            at += len(values)
        if at != total_rows:
            raise EtlError(f"parts hold {at} rows, expected {total_rows}")
        out.flush()
        del out


_SINKS = {"parquet": _ParquetSink, "csv": _CsvSink, "npy": _NpySink}


# --- files: the staging directory -------------------------------------------------------------


class _Staging:
    """``.OUT.partial/`` next to the output: lock, manifest, committed parts, assembly."""

    def __init__(self, output: Path, sink: Any) -> None:
        self.output = output
        self.dir = output.parent / f".{output.name}.partial"
        self.sink = sink
        self._locked = False
        self._part = re.compile(r"part-(\d{6,})-(\d+)" + re.escape(sink.suffix))

    # lock ----------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Create the directory and take its lock; ``EtlError`` if unwritable or taken."""
        try:
            self.dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise EtlError(f"cannot write output {str(self.output)!r}: {exc.strerror}") from None
        lock = self.dir / "lock"
        me = psutil.Process()
        record = json.dumps({"pid": me.pid, "create_time": me.create_time()})
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner(lock)
                if owner is not None:
                    raise EtlError(
                        f"output {str(self.output)!r} is being written by another job (pid "
                        f"{owner}); wait for it, or remove {lock} if that job is gone"
                    ) from None
                lock.unlink(missing_ok=True)  # stale: its owner died
                continue
            except OSError as exc:
                raise EtlError(
                    f"cannot write output {str(self.output)!r}: {exc.strerror}"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(record)
            self._locked = True
            return
        raise EtlError(f"cannot lock {lock}")

    @staticmethod
    def _owner(lock: Path) -> int | None:
        """The pid of a live process holding ``lock``, else ``None``."""
        try:
            record = json.loads(lock.read_text())
            owner = psutil.Process(record["pid"])
            if abs(owner.create_time() - record["create_time"]) < 1e-3:
                return owner.pid
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            pass
        return None

    def release(self) -> None:
        """Drop the lock; remove the directory if it holds no committed work."""
        if not self._locked:
            return
        self._locked = False
        (self.dir / "lock").unlink(missing_ok=True)
        if self.dir.is_dir() and not self.parts():  # nothing to resume: leave nothing behind
            shutil.rmtree(self.dir, ignore_errors=True)

    # manifest ------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / "manifest.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("ignoring an unreadable manifest in %s", self.dir)
            return None

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        self._write_atomically(
            "manifest.json", lambda path: path.write_text(json.dumps(manifest, indent=1))
        )

    def clear(self) -> int:
        """Remove everything but the lock; return how many committed parts were dropped."""
        dropped = 0
        for entry in self.dir.iterdir():
            if entry.name == "lock":
                continue
            dropped += bool(self._part.fullmatch(entry.name))
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return dropped

    # parts ---------------------------------------------------------------------------------
    def committed(self, chunk_rows: int, total_rows: int | None) -> list[int]:
        """Row counts of the parts ``0..k-1`` that are committed; later or stray files go."""
        found: dict[int, tuple[int, Path]] = {}
        for entry in self.dir.iterdir():
            match = self._part.fullmatch(entry.name)
            if match:
                found[int(match[1])] = (int(match[2]), entry)
            elif entry.name.startswith(".tmp-"):
                entry.unlink()  # a write the previous run did not finish
        rows: list[int] = []
        while len(rows) in found:
            count = found[len(rows)][0]
            if total_rows is not None:
                expected = min(chunk_rows, total_rows - len(rows) * chunk_rows)
                if count != expected or expected <= 0:
                    break
            elif count > chunk_rows or (count < chunk_rows and len(rows) + 1 in found):
                break
            rows.append(count)
            if count < chunk_rows:  # the short last chunk: the input ended there
                break
        for index, (_, path) in found.items():
            if index >= len(rows):
                path.unlink()
        return rows

    def commit(self, index: int, rows: int, pieces: Sequence[Any], outputs: Sequence[Any]) -> None:
        name = f"part-{index:06d}-{rows}{self.sink.suffix}"
        self._write_atomically(name, lambda path: self.sink.write_part(pieces, outputs, path))
        log.debug("committed chunk %d (%d rows) of %s", index, rows, self.output)
        _return_free_memory()

    def parts(self) -> list[Path]:
        numbered = []
        for entry in self.dir.iterdir():
            match = self._part.fullmatch(entry.name)
            if match:
                numbered.append((int(match[1]), entry))
        return [path for _, path in sorted(numbered)]

    def _write_atomically(self, name: str, write: Any) -> None:
        temporary = self.dir / f".tmp-{name}"
        try:
            write(temporary)
            _fsync(temporary)
            os.replace(temporary, self.dir / name)
        finally:
            temporary.unlink(missing_ok=True)
        _fsync(self.dir)

    # the end -------------------------------------------------------------------------------
    def finish(self, total_rows: int) -> None:
        """Concatenate the parts into a temporary file, rename it over the output, clean up."""
        temporary = self.dir / f".tmp-output{self.sink.suffix}"
        parts = self.parts()
        _return_free_memory()
        try:
            self.sink.assemble(parts, temporary, total_rows)
            _fsync(temporary)
            os.replace(temporary, self.output)
        finally:
            temporary.unlink(missing_ok=True)
        _fsync(self.output.parent)
        self._locked = False
        shutil.rmtree(self.dir, ignore_errors=True)


# --- files: the job ---------------------------------------------------------------------------


@dataclass
class FileReport:
    """What :func:`predict_file` did."""

    output: str
    rows: int  # rows in the output
    computed_rows: int  # rows predicted by this call (the rest were committed by an earlier one)
    chunks: int
    resumed_chunks: int  # chunks found committed and skipped
    chunk_rows: int
    shard_size: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.computed_rows / self.seconds if self.seconds else 0.0


def _model_identity(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        text = os.fspath(model)
        return text if "://" in text else os.path.abspath(text)
    return f"{getattr(model, '__module__', '?')}.{getattr(model, '__qualname__', repr(model))}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _check_output_path(source_path: Path, output: Path) -> None:
    if str(output) in ("", "-"):
        raise EtlError("the output must be a file path (it is written to a temporary file first)")
    if output.is_dir():
        raise EtlError(f"output {str(output)!r} is a directory")
    parent = output.parent
    if not parent.is_dir():
        raise EtlError(f"cannot write output {str(output)!r}: directory {str(parent)!r} not found")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EtlError(
            f"cannot write output {str(output)!r}: directory {str(parent)!r} is not writable"
        )
    same = output.exists() and os.path.samefile(source_path, output)
    if same or output.resolve() == source_path.resolve():
        raise EtlError(f"the output {str(output)!r} is the input file; choose another path")


def _check_named(source: Any, columns: Columns, output_column: OutputColumns) -> None:
    """Before the model is known: every named column exists; new columns do not."""
    available = source.schema.names
    if source.format != "npy" and columns is not None:
        named = columns.values() if isinstance(columns, Mapping) else [columns]
        for entry in named:
            for name in _as_list(entry):
                if name not in available:
                    raise EtlError(
                        f"unknown column {name!r}; {source.path} has columns {available}"
                    )
    new = output_column.values() if isinstance(output_column, Mapping) else [output_column]
    for name in new:
        if name is not None and name in available:
            raise EtlError(
                f"output column {name!r} already exists in {source.path}; choose another name "
                "with output_column= / --output-column"
            )


def _bytes_per_row(spec_outputs: tuple[TensorInfo, ...] | None) -> int:
    if spec_outputs is None:
        return 1024
    total = 0
    for t in spec_outputs:
        if t.shape is None or any(d is None for d in t.shape[1:]):
            total += 1024
        else:
            itemsize = 64 if t.dtype == STRING else np.dtype(t.dtype).itemsize
            total += itemsize * math.prod(t.shape[1:])
    return total


class _Job:
    """One :func:`predict_file` call, from checked arguments to the renamed output."""

    def __init__(
        self,
        source: Any,
        sink: Any,
        staging: _Staging,
        *,
        columns: Columns,
        output_column: OutputColumns,
        progress: bool,
        max_in_flight: int | None,
        identity: dict[str, Any],
    ) -> None:
        self.source, self.sink, self.staging = source, sink, staging
        self.columns = columns
        self.output_column = output_column
        self.progress = progress
        self.max_in_flight = max_in_flight
        self.identity = identity

    def check(self, signature: SignatureInfo) -> tuple[dict[str, Any], dict[str, str] | None]:
        """Columns and output names for ``signature``; ``EtlError`` if the data cannot fit."""
        if self.source.format == "npy":
            inputs = _input_names(signature)
            if inputs is not None and len(inputs) != 1:
                raise EtlError(
                    f"a .npy input holds one array, but the model has {len(inputs)} inputs "
                    f"{signature.describe_inputs()}; use Parquet or CSV"
                )
            if self.source.name is None:
                self.source.name = inputs[0] if inputs else DEFAULT_INPUT
            sources = {inputs[0] if inputs else DEFAULT_INPUT: self.source.name}
        else:
            sources = resolve_columns(self.source.schema.names, signature, self.columns)
            _check_types(self._read_schema(sources, signature), sources, signature)
        outputs = _output_names(signature)
        if self.sink.format == "npy":
            if self.output_column is not None:
                raise EtlError(".npy outputs hold only the predictions: drop --output-column")
            if outputs is not None and len(outputs) != 1:
                raise EtlError(
                    f"a .npy output holds one array, but the model has outputs {outputs}: pick "
                    "one with the pool's output= (--model-output), or write Parquet"
                )
            specs = signature.outputs or ()
            if any(t.dtype == STRING for t in specs if outputs and t.name in outputs):
                raise EtlError("a .npy output needs numbers, but the model returns text")
            named = None if outputs is None else {outputs[0]: outputs[0]}
        else:
            named = (
                None
                if outputs is None
                else output_columns(outputs, self.output_column, self.source.schema.names)
            )
        return sources, named

    def _read_schema(self, sources: Mapping[str, Any], signature: SignatureInfo) -> Any:
        if self.source.format != "csv":
            return self.source.schema
        strings = self._string_columns(sources, signature)
        pa = _require("pyarrow")
        schema = self.source.schema
        for name in strings:
            schema = schema.set(schema.get_field_index(name), pa.field(name, pa.string()))
        return schema

    @staticmethod
    def _string_columns(sources: Mapping[str, Any], signature: SignatureInfo) -> list[str]:
        if signature.inputs is None:
            return []
        text = {t.name for t in signature.inputs if t.dtype == STRING}
        return [c for name, source in sources.items() if name in text for c in _as_list(source)]

    def run(
        self,
        pool: PredictionPool,
        resume_from: dict[str, Any] | None,
        chunk_rows: int | None,
        shard_size: int | None,
    ) -> FileReport:
        started = time.perf_counter()
        signature = pool.signature
        sources, named = self.check(signature)
        strings = self._string_columns(sources, signature)
        sample = next(self.source.batches(0, SAMPLE_ROWS, strings), None)
        if sample is not None:
            try:
                sample_inputs = to_inputs(sample, signature, sources)
            except (TypeError, ValueError) as exc:
                raise EtlError(str(exc)) from None
            in_bytes = sample.nbytes / max(1, sample.num_rows)
        else:
            sample_inputs, in_bytes = {}, 0
        shard = shard_size or pool.shard_size
        if not shard:
            shard = (
                sharding.auto_shard_size(sample_inputs, 1 << 40, pool.workers)
                if sample_inputs
                else 1024
            )
        if resume_from is not None:
            chunk_rows = resume_from["chunk_rows"]
        elif not chunk_rows:
            per_row = max(1, int(in_bytes) + _bytes_per_row(signature.outputs))
            chunk_rows = min(MAX_CHUNK_ROWS, max(shard, TARGET_CHUNK_BYTES // per_row))
            chunk_rows = max(shard, chunk_rows // shard * shard)
        total = self.source.num_rows
        if total is None and self.progress and sys.stderr is not None and sys.stderr.isatty():
            total = self.source.count_rows()  # so the bar has an ETA
        if resume_from is None:
            self.staging.write_manifest({**self.identity, "chunk_rows": chunk_rows})
        done = self.staging.committed(chunk_rows, self.source.num_rows)
        if done:
            log.info("resuming: %d chunk(s), %d rows, already committed", len(done), sum(done))
        first_chunk, start = len(done), sum(done)
        log.info(
            "predicting %s -> %s: %s rows, chunks of %d rows, shards of %d rows",
            self.source.path,
            self.staging.output,
            "?" if total is None else total,
            chunk_rows,
            shard,
        )
        bar = progress_bar(self.progress, total=total, initial=start, desc=self.staging.output.name)
        try:
            chunks, end = self._stream(
                pool, signature, sources, named, strings, first_chunk, start, chunk_rows, shard, bar
            )
        finally:
            bar.close()
        if chunks == 0 and start == 0:  # an empty input: still write an (empty) output
            self._commit_empty(pool, signature, sources, named)
            chunks = 1
        self.staging.finish(end)
        seconds = time.perf_counter() - started
        log.info("wrote %d rows to %s in %.1f s", end, self.staging.output, seconds)
        return FileReport(
            output=str(self.staging.output),
            rows=end,
            computed_rows=end - start,
            chunks=first_chunk + chunks,
            resumed_chunks=first_chunk,
            chunk_rows=chunk_rows,
            shard_size=shard,
            seconds=seconds,
        )

    def _stream(
        self,
        pool: PredictionPool,
        signature: SignatureInfo,
        sources: Mapping[str, Any],
        named: dict[str, str] | None,
        strings: list[str],
        first_chunk: int,
        start: int,
        chunk_rows: int,
        shard: int,
        bar: Any,
    ) -> tuple[int, int]:
        """Predict rows ``start..`` and commit them chunk by chunk; return (chunks, end row)."""
        window: deque[tuple[int, Any]] = deque()

        def feed() -> Iterator[dict[str, np.ndarray]]:
            pieces = _pieces(self.source.batches(start, shard, strings), start, shard, chunk_rows)
            for row, piece in pieces:
                try:
                    arrays = to_inputs(piece, signature, sources, first_row=row)
                except (TypeError, ValueError) as exc:
                    raise EtlError(f"{self.source.path}: {exc}") from None
                window.append((row, piece))
                yield arrays

        held: list[Any] = []
        outputs: list[dict[str, np.ndarray]] = []
        chunk, row, in_chunk = first_chunk, start, 0
        names = named
        results = pool.imap(feed(), shard_size=shard, max_in_flight=self.max_in_flight)
        while True:
            try:
                prediction = next(results)
            except StopIteration:
                break
            except (
                WorkerError,
                WorkerCrashedError,
            ) as exc:  # name the file's rows, not the shard's
                first, piece = window[0]
                where = f"input rows {first}..{first + piece.num_rows - 1} of {self.source.path}"
                if isinstance(exc, WorkerError):
                    raise WorkerError(f"{where}: {exc.args[0]}", exc.remote_traceback) from None
                raise WorkerCrashedError(f"{where}: {exc}") from None
            _, piece = window.popleft()
            values = _as_outputs(prediction, signature)
            if names is None:  # a model that does not declare its outputs
                names = output_columns(list(values), self.output_column, self.source.schema.names)
            held.append(piece)
            outputs.append({names[k]: v for k, v in values.items()})
            in_chunk += piece.num_rows
            row += piece.num_rows
            bar.update(piece.num_rows)
            if in_chunk == chunk_rows:
                self.staging.commit(chunk, in_chunk, held, outputs)
                chunk, in_chunk, held, outputs = chunk + 1, 0, [], []
        if in_chunk:
            self.staging.commit(chunk, in_chunk, held, outputs)
            chunk += 1
        return chunk - first_chunk, row

    def _commit_empty(
        self,
        pool: PredictionPool,
        signature: SignatureInfo,
        sources: Mapping[str, Any],
        named: dict[str, str] | None,
    ) -> None:
        pa = _require("pyarrow")
        empty = pa.RecordBatch.from_pylist([], schema=self.source.schema)
        values = _as_outputs(pool.predict(to_inputs(empty, signature, sources)), signature)
        names = named or output_columns(list(values), self.output_column, empty.schema.names)
        self.staging.commit(0, 0, [empty], [{names[k]: v for k, v in values.items()}])


def _pieces(
    batches: Iterable[Any], start: int, rows: int, chunk_rows: int
) -> Iterator[tuple[int, Any]]:
    """``(first row, batch)`` of at most ``rows`` rows, never across a multiple of ``chunk_rows``.

    Small input batches (short row groups, CSV blocks) are merged, large ones cut.
    """
    pa = _require("pyarrow")
    held: list[Any] = []
    size, row = 0, start
    for batch in batches:
        offset = 0
        while offset < batch.num_rows:
            room = min(rows - size, chunk_rows - (row + size) % chunk_rows)
            take = min(room, batch.num_rows - offset)
            held.append(batch.slice(offset, take))
            size += take
            offset += take
            if take == room:
                yield row, _concat(pa, held)
                row, size, held = row + size, 0, []
    if held:
        yield row, _concat(pa, held)


def _concat(pa: Any, batches: list[Any]) -> Any:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


def predict_file(
    model: Any,
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    columns: Columns = None,
    output_column: OutputColumns = None,
    workers: int | None = None,
    shard_size: int | None = None,
    chunk_rows: int | None = None,
    max_in_flight: int | None = None,
    resume: bool = False,
    progress: bool = False,
    input_format: str | None = None,
    output_format: str | None = None,
    signature: str = "serving_default",
    model_output: str | None = None,
    **pool_options: Any,
) -> FileReport:
    """Predict every row of a Parquet, CSV or ``.npy`` file into a new file, streaming.

    ``model`` is a SavedModel path / TF Hub handle (a pool is started, with ``workers`` and
    ``pool_options``, once the arguments are checked, and shut down at the end) or a running
    :class:`PredictionPool`. Parquet and CSV outputs hold the input's columns, rows and order
    plus one column per model output (named by ``output_column``; vectors are fixed-size lists
    in Parquet and JSON arrays in CSV); a ``.npy`` output holds the predictions only.

    The output is committed ``chunk_rows`` rows at a time into ``.OUT.partial/`` and appears
    at ``output`` only complete, by an atomic rename. After a crash or Ctrl-C, ``resume=True``
    continues from the last committed chunk (see the module docstring). Without ``resume``, an
    earlier run's committed chunks are discarded. Memory stays bounded by ``chunk_rows`` plus
    ``max_in_flight`` shards of ``shard_size`` rows, whatever the size of the input.

    Raises ``EtlError`` for a missing input, an unknown column, a column whose type does not fit
    the model, or an unwritable output; all but the type check happen before any worker starts
    (the type check too, for a local SavedModel whose signature can be read from disk).
    """
    from .prediction_pool import PredictionPool

    input_path, output_path = Path(input), Path(output)
    running = model if isinstance(model, PredictionPool) else None
    if running is not None and (
        workers is not None or pool_options or signature != "serving_default" or model_output
    ):
        raise TypeError("workers= and pool options apply only when model is a path, not a pool")
    if running is None and isinstance(model, (str, os.PathLike)):
        text = os.fspath(model)
        if "://" not in text and not (Path(text) / "saved_model.pb").is_file():
            reason = "no such directory" if not os.path.isdir(text) else "no saved_model.pb in it"
            raise EtlError(f"model {text!r} is not a SavedModel directory ({reason})")
    for name, value in (("shard_size", shard_size), ("chunk_rows", chunk_rows)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise EtlError(f"{name} must be a positive integer, got {value!r}")
    in_format = _format_of(input_path, input_format, "input")
    out_format = _format_of(output_path, output_format, "output")
    source = _open_source(input_path, in_format, columns)
    try:
        _check_output_path(input_path, output_path)
        _check_named(source, columns, output_column)
        sink = _SINKS[out_format]()
        signature_name = signature
        if running is not None:
            model, signature_name, model_output = (
                running._model,
                running.signature_name,
                running.output,
            )
        stat = input_path.stat()
        identity = {
            "version": MANIFEST_VERSION,
            "input": str(input_path.resolve()),
            "input_size": stat.st_size,
            "input_mtime_ns": stat.st_mtime_ns,
            "input_format": in_format,
            "output_format": out_format,
            "model": _model_identity(model),
            "signature": signature_name,
            "model_output": model_output,
            "columns": _jsonable(columns),
            "output_column": _jsonable(output_column),
        }
        job = _Job(
            source,
            sink,
            _Staging(output_path, sink),
            columns=columns,
            output_column=output_column,
            progress=progress,
            max_in_flight=max_in_flight,
            identity=identity,
        )
        if running is None and (peeked := peek_signature(model, signature_name, model_output)):
            job.check(peeked)  # the model is known from disk: check columns before starting
        staging = job.staging
        staging.acquire()
        try:
            previous = staging.read_manifest() if resume else None
            if previous is not None:
                _check_resumable(previous, identity, chunk_rows, output_path)
            else:
                if resume:
                    log.info("nothing to resume for %s: starting from the first row", output_path)
                dropped = staging.clear()
                if dropped:
                    log.warning(
                        "discarding %d chunk(s) committed by an earlier run of %s "
                        "(pass resume=True / --resume to continue it)",
                        dropped,
                        output_path,
                    )
            if running is not None:
                return job.run(running, previous, chunk_rows, shard_size)
            started = PredictionPool(
                model,
                workers,
                signature=signature,
                output=model_output,
                shard_size=shard_size,
                **pool_options,
            ).start()
            try:
                return job.run(started, previous, chunk_rows, shard_size)
            finally:
                # Not ``with``: on Ctrl-C it kills the workers, and a worker killed while sending
                # a result leaves ProcessPoolExecutor waiting for the rest of it forever. A
                # graceful stop costs at most the shards already running (imap cancelled the
                # rest when it was closed).
                started.shutdown()
        finally:
            staging.release()
    finally:
        source.close()


def _check_resumable(
    previous: Mapping[str, Any], identity: Mapping[str, Any], chunk_rows: int | None, output: Path
) -> None:
    for key, value in identity.items():
        if previous.get(key) != value:
            raise EtlError(
                f"cannot resume {str(output)!r}: {key} was {previous.get(key)!r} in the "
                f"interrupted job and is {value!r} now; run without --resume to start over"
            )
    if chunk_rows is not None and chunk_rows != previous.get("chunk_rows"):
        raise EtlError(
            f"cannot resume {str(output)!r}: it was committed in chunks of "
            f"{previous.get('chunk_rows')} rows, not {chunk_rows}; drop --chunk-rows"
        )
