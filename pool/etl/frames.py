"""In memory: pandas and Arrow in, NumPy to the pool, predictions back as new columns.

The pool's core takes NumPy arrays only; data frames are adapted here, at the edge.
``to_inputs`` turns a Series/DataFrame or an Arrow array/RecordBatch/Table into
``{model input: ndarray}``, each checked against its input; :func:`predict` and :func:`submit`
call a pool on the result; ``with_predictions`` appends one column per output; ``map_batches``
streams batches through the pool's ``imap`` in order. Each works with any :class:`Predictor`
(a :class:`pool.PredictionPool`, local or on a cluster).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

import numpy as np

from .. import sharding
from ..messages import DEFAULT_INPUT, DEFAULT_OUTPUT, STRING, SignatureInfo, TensorInfo
from .common import Columns, EtlError, OutputColumns, import_optional
from .progress import progress_bar


class Predictor(Protocol):
    """What the functions of :mod:`pool.etl` need of a pool: a running
    :class:`pool.PredictionPool` has it, whichever backend answers its shards."""

    @property
    def signature(self) -> SignatureInfo: ...

    def submit(
        self, inputs: Any, *, shard_size: int | None = None, check_finite: bool = False
    ) -> Future: ...

    def imap(
        self,
        batches: Iterable[Any],
        *,
        shard_size: int | None = None,
        max_in_flight: int | None = None,
        check_finite: bool = False,
    ) -> Iterator[Any]: ...


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


def input_names(signature: SignatureInfo) -> list[str] | None:
    """The model's input names, or ``None`` when the model does not declare them."""
    return None if signature.inputs is None else [t.name for t in signature.inputs]


def resolve_columns(
    available: Sequence[Any], signature: SignatureInfo, columns: Columns = None
) -> dict[str, str | Sequence[str]]:
    """Decide which column (or list of columns) feeds each model input; raise ``EtlError``.

    An input that ``columns`` does not map (or every input, without ``columns``) is fed by the
    column of the same name; a single-input model by the only column of a one-column table.
    """
    inputs = input_names(signature)
    expected = signature.describe_inputs()
    if columns is None:
        if inputs is None:
            if len(available) == 1:
                return {DEFAULT_INPUT: available[0]}
            raise EtlError(
                f"the model declares no input names and the data has {len(available)} columns "
                f"{list(available)}: name the column with columns= / --column"
            )
        mapping: dict[str, str | Sequence[str]] = {n: n for n in inputs if n in available}
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
            if unknown:
                raise EtlError(
                    f"columns= names inputs the model does not have: {unknown}; its inputs "
                    f"are {expected}"
                )
            for name in inputs:  # an input not mapped is fed by the column of its name
                if name not in mapping and name in available:
                    mapping[name] = name
            missing = [name for name in inputs if name not in mapping]
            if missing:
                raise EtlError(
                    f"no column for the model's input {missing[0]!r}: columns= does not map "
                    f"it and the data has no column of that name (inputs {expected}; columns "
                    f"{list(available)})"
                )
            mapping = {name: mapping[name] for name in inputs}
    else:
        if inputs is not None and len(inputs) != 1:
            raise EtlError(
                f"the model has {len(inputs)} inputs {expected}: map each to a column, e.g. "
                f"columns={{{inputs[0]!r}: 'column'}} / --column {inputs[0]}=COLUMN"
            )
        mapping = {inputs[0] if inputs else DEFAULT_INPUT: columns}
    for source in mapping.values():
        for name in source_columns(source):
            if name not in available:
                raise EtlError(f"unknown column {name!r}; the data has columns {list(available)}")
    return mapping


def source_columns(source: Any) -> list:
    """The column names that feed one input: ``"text"`` -> ``["text"]``, ``["b0", "b1"]`` as is."""
    if isinstance(source, (str, bytes)) or not isinstance(source, Sequence):
        return [source]
    return list(source)


def _label(source: Any) -> str:
    names = source_columns(source)
    return f"column {names[0]!r}" if len(names) == 1 else f"columns {names}"


def _empty_like(spec: TensorInfo | None) -> np.ndarray | None:
    if spec is None or spec.shape is None:
        return None
    trailing = [d for d in spec.shape[1:] if d is not None]
    if len(trailing) != len(spec.shape) - 1:
        return None
    return np.empty((0, *trailing), dtype=spec.numpy_dtype)


def _arrow_to_numpy(
    column: Any, label: str, spec: TensorInfo | None, first_row: int = 0
) -> np.ndarray:
    """One Arrow column as a NumPy batch: strings as objects, equal-length lists stacked."""
    pa = import_optional("pyarrow")
    pc = import_optional("pyarrow.compute")
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
    names = source_columns(source)
    parts = [_column_to_numpy(frame[name], _label(name), spec, first_row) for name in names]
    if len(parts) == 1:
        return parts[0]
    return np.stack(parts, axis=1)


def _checked(
    arrays: dict[str, np.ndarray],
    sources: Mapping[str, Any],
    signature: SignatureInfo,
    first_row: int = 0,
) -> dict[str, np.ndarray]:
    """Validate each input on its own, so the error names the column that does not fit (and,
    for a value out of the input's range, its row counted from ``first_row``)."""
    if signature.inputs is None:
        return arrays
    specs = {t.name: t for t in signature.inputs}
    checked = {}
    for name, array in arrays.items():
        spec = specs[name]
        alone = SignatureInfo(inputs=(spec,), outputs=None, single_output=None)
        try:
            if spec.dtype != STRING and array.dtype.kind in "biuf":
                array = sharding.cast_values(name, array, spec.numpy_dtype, first_row=first_row)
            prepared, _ = sharding.prepare({name: array}, alone)
        except (TypeError, ValueError) as exc:
            raise type(exc)(
                f"{_label(sources[name])} does not fit the model's input {name!r}: {exc}"
            ) from None
        checked[name] = prepared[name]
    return checked


def predict(
    pool: Predictor,
    data: Any,
    *,
    columns: Columns = None,
    shard_size: int | None = None,
    check_finite: bool = False,
) -> Any:
    """Predict every row of a data frame or Arrow data: ``pool.predict`` for tables.

    ``data`` is a pandas Series/DataFrame or a pyarrow array/RecordBatch/Table; ``columns`` says
    which column feeds which model input (see :func:`to_inputs`). Returns what
    ``pool.predict`` returns: an array, or a dict of arrays for several outputs, row ``i``
    answering row ``i`` of ``data``. Errors name the column (and the row, for a missing value).
    """
    return submit(
        pool, data, columns=columns, shard_size=shard_size, check_finite=check_finite
    ).result()


def submit(
    pool: Predictor,
    data: Any,
    *,
    columns: Columns = None,
    shard_size: int | None = None,
    check_finite: bool = False,
) -> Future:
    """Like :func:`predict`, but return a ``concurrent.futures.Future`` at once.

    The table is converted and checked here, in the caller: a bad column raises at once."""
    arrays = to_inputs(data, pool.signature, columns)
    return pool.submit(arrays, shard_size=shard_size, check_finite=check_finite)


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
            "expected a pandas Series/DataFrame or a pyarrow array/RecordBatch/Table, got "
            f"{type(data).__name__}; pass arrays, dicts of arrays and lists of str to "
            "pool.predict directly"
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
        inputs = input_names(signature)
        if inputs is not None and len(inputs) != 1:
            raise EtlError(
                f"the model has {len(inputs)} inputs {signature.describe_inputs()}: pass a "
                f"DataFrame or RecordBatch with columns=, not a {type(data).__name__}"
            )
        name = inputs[0] if inputs else DEFAULT_INPUT
        label = getattr(data, "name", None) or name
        sources = {name: label}
        arrays = {name: _column_to_numpy(data, _label(label), specs.get(name), first_row)}
    return _checked(arrays, sources, signature, first_row)


# --- predictions back into frames ------------------------------------------------------------


def outputs_by_name(prediction: Any, signature: SignatureInfo) -> dict[str, np.ndarray]:
    """``{output name: array}``, by name: new columns come in the same order every time."""
    if isinstance(prediction, Mapping):
        return {name: prediction[name] for name in sorted(prediction)}
    return {signature.single_output or DEFAULT_OUTPUT: prediction}


def output_names(signature: SignatureInfo) -> list[str] | None:
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
    """An Arrow array for a NumPy batch: ``[N]`` plain, ``[N, d, ...]`` nested fixed-size lists.

    Bytes become ``string`` (text) when every value decodes as UTF-8, else stay ``binary``."""
    pa = import_optional("pyarrow")
    values = np.ascontiguousarray(values)
    column = pa.array(values.reshape(-1))
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        try:
            column = column.cast(
                pa.string() if pa.types.is_binary(column.type) else pa.large_string()
            )
        except pa.ArrowInvalid:  # not UTF-8: keep the bytes as they are
            pass
    if values.ndim <= 1:
        return column
    for width in reversed(values.shape[1:]):
        column = pa.FixedSizeListArray.from_arrays(column, width)
    return column


def squeezed(values: np.ndarray) -> np.ndarray:
    """An output as its column holds it: a trailing axis of size 1 is dropped, so an ``[N, 1]``
    output (a regressor, a binary classifier) is a column of numbers, not of one-element lists.
    """
    if values.ndim >= 2 and values.shape[-1] == 1:
        return values.reshape(values.shape[:-1])
    return values


def _pandas_column(values: np.ndarray, index: Any) -> Any:
    pd = import_optional("pandas")
    if values.ndim <= 1:
        return pd.Series(values, index=index)
    rows = np.empty(len(values), dtype=object)
    for i, row in enumerate(values):
        rows[i] = row
    return pd.Series(rows, index=index, dtype=object)


def with_predictions(frame: Any, columns: Mapping[str, np.ndarray]) -> Any:
    """A copy of ``frame`` (DataFrame, RecordBatch or Table) with ``columns`` appended.

    Each output becomes one column (see :func:`squeezed`: ``[N, 1]`` is a number column)."""
    if type(frame).__module__.startswith("pandas"):
        out = frame.copy(deep=False)
        for name, values in columns.items():
            out[name] = _pandas_column(squeezed(values), frame.index)
        return out
    pa = import_optional("pyarrow")
    arrays, schema = list(frame.columns), frame.schema  # the schema keeps its metadata
    for name, values in columns.items():
        arrays.append(arrow_column(squeezed(values)))
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


# --- streaming batches ------------------------------------------------------------------------


def map_batches(
    pool: Predictor,
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
    names = output_names(signature)
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
            outputs = outputs_by_name(prediction, signature)
            named = output_columns(list(outputs), output_column, _column_names(frame))
            bar.update(_num_rows(frame))
            yield with_predictions(frame, {named[k]: v for k, v in outputs.items()})
    finally:
        bar.close()
