"""Files: Parquet, CSV and ``.npy`` sources (read a batch at a time) and sinks (one part per
chunk, assembled into the output), and the check of a file's column types against the model."""

from __future__ import annotations

import bisect
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..messages import DEFAULT_INPUT, STRING, SignatureInfo, TensorInfo
from .common import Columns, EtlError, import_optional, return_free_memory
from .frames import arrow_column, source_columns, with_predictions

#: File formats, by file name suffix.
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".npy": "npy"}


# --- files: sources ---------------------------------------------------------------------------


def format_of(path: Path, given: str | None, role: str) -> str:
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


def _arrow_error() -> type[BaseException]:
    return import_optional("pyarrow").ArrowException


class ParquetSource:
    """Row groups of a Parquet file, read a batch at a time (never the whole file)."""

    format = "parquet"

    def __init__(self, path: Path) -> None:
        pq = import_optional("pyarrow.parquet")
        self.path = path
        try:
            # pre_buffer off and a read buffer: column chunks stream instead of loading whole.
            self._file = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        except (_arrow_error(), OSError) as exc:
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
        yield from _skip_rows(
            self._file.iter_batches(batch_size=batch_rows, row_groups=groups), skip
        )

    def close(self) -> None:
        self._file.close()


def _skip_rows(batches: Iterable[Any], skip: int) -> Iterator[Any]:
    """The record batches of ``batches`` after their first ``skip`` rows."""
    for batch in batches:
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        if skip:
            batch, skip = batch.slice(skip), 0
        yield batch


class CsvSource:
    """A CSV file, parsed a block at a time; columns that feed text inputs are read as text."""

    format = "csv"

    def __init__(self, path: Path) -> None:
        self.path = path
        reader = self._open({})
        self.schema = reader.schema
        reader.close()
        self.num_rows: int | None = None

    def _open(self, column_types: dict[str, Any]) -> Any:
        pacsv = import_optional("pyarrow.csv")
        try:
            options = pacsv.ConvertOptions(column_types=column_types)
            return pacsv.open_csv(self.path, convert_options=options)
        except (_arrow_error(), OSError) as exc:
            raise EtlError(f"{self.path}: cannot read CSV ({exc})") from None

    def batches(self, start: int, batch_rows: int, strings: Sequence[str] = ()) -> Iterator[Any]:
        pa = import_optional("pyarrow")
        reader = self._open({name: pa.string() for name in strings})

        def read() -> Iterator[Any]:
            while True:
                try:
                    yield reader.read_next_batch()
                except StopIteration:
                    return
                except _arrow_error() as exc:
                    raise EtlError(f"{self.path}: cannot read CSV ({exc})") from None

        try:
            yield from _skip_rows(read(), start)
        finally:
            reader.close()

    def count_rows(self) -> int:
        """Rows of the file (one fast parsing pass over the first column only)."""
        pa = import_optional("pyarrow")
        pacsv = import_optional("pyarrow.csv")
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


class NpySource:
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
        pa = import_optional("pyarrow")
        empty = np.empty((0, *self._array.shape[1:]), dtype=self._array.dtype)
        return pa.schema([pa.field(self.name or DEFAULT_INPUT, arrow_column(empty).type)])

    def batches(self, start: int, batch_rows: int, strings: Sequence[str] = ()) -> Iterator[Any]:
        pa = import_optional("pyarrow")
        for begin in range(start, self._array.shape[0], batch_rows):
            values = np.ascontiguousarray(self._array[begin : begin + batch_rows])
            yield pa.record_batch([arrow_column(values)], names=[self.name or DEFAULT_INPUT])

    def close(self) -> None:
        self._array = None


def open_source(path: Path, fmt: str, columns: Columns) -> Any:
    if not path.exists():
        raise EtlError(f"input {str(path)!r} does not exist")
    if not path.is_file():
        raise EtlError(f"input {str(path)!r} is not a file")
    if not os.access(path, os.R_OK):
        raise EtlError(f"input {str(path)!r} is not readable")
    if fmt == "parquet":
        return ParquetSource(path)
    if fmt == "csv":
        return CsvSource(path)
    name: str | Sequence[str] | None
    if isinstance(columns, Mapping):
        if len(columns) != 1:
            raise EtlError(f"a .npy input holds one array, but columns= maps {len(columns)} inputs")
        (name,) = columns.values()
    else:
        name = columns
    if name is not None and not isinstance(name, str):
        raise EtlError("a .npy input holds one array: name it with one column name")
    return NpySource(path, name)


def _type_problem(field: Any, spec: TensorInfo) -> str | None:
    """Why an Arrow column of this type cannot feed ``spec``, or ``None`` if it can."""
    pa = import_optional("pyarrow")
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


def check_column_types(schema: Any, sources: Mapping[str, Any], signature: SignatureInfo) -> None:
    """Raise ``EtlError`` if a column's Arrow type cannot feed its model input."""
    if signature.inputs is None:
        return
    specs = {t.name: t for t in signature.inputs}
    for name, source in sources.items():
        names = source_columns(source)
        spec = specs[name]
        if len(names) > 1 and spec.shape is not None:  # side-by-side scalars: check one scalar
            spec = TensorInfo(spec.name, spec.dtype, spec.shape[:-1])
        for column in names:
            problem = _type_problem(schema.field(column), spec)
            if problem:
                raise EtlError(problem)


# --- files: sinks -----------------------------------------------------------------------------


def _output_table(pieces: Sequence[Any], outputs: Sequence[Mapping[str, np.ndarray]]) -> Any:
    pa = import_optional("pyarrow")
    batches = [with_predictions(p, o) for p, o in zip(pieces, outputs, strict=True)]
    return pa.Table.from_batches(batches)


class ParquetSink:
    """Each chunk a one-row-group Parquet part; assembled row group by row group."""

    format = "parquet"
    suffix = ".parquet"

    def write_part(self, pieces: Sequence[Any], outputs: Sequence[Any], path: Path) -> None:
        pq = import_optional("pyarrow.parquet")
        table = _output_table(pieces, outputs)
        pq.write_table(table, path, row_group_size=max(1, table.num_rows))

    def assemble(self, parts: Sequence[Path], target: Path, total_rows: int) -> None:
        pq = import_optional("pyarrow.parquet")
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
                return_free_memory()
        finally:
            if writer is not None:
                writer.close()


def _csv_ready(table: Any) -> Any:
    """List columns as JSON arrays (``[0.25, -1.5]``): CSV has no list type."""
    pa = import_optional("pyarrow")
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
    pa = import_optional("pyarrow")
    pacsv = import_optional("pyarrow.csv")
    sink = pa.BufferOutputStream()
    pacsv.write_csv(pa.table({n: pa.array([], pa.string()) for n in names}), sink)
    return sink.getvalue().to_pybytes()


class CsvSink:
    """Each chunk a CSV part with its header; assembled as one header plus every part's rows."""

    format = "csv"
    suffix = ".csv"

    def write_part(self, pieces: Sequence[Any], outputs: Sequence[Any], path: Path) -> None:
        pacsv = import_optional("pyarrow.csv")
        pacsv.write_csv(_csv_ready(_output_table(pieces, outputs)), path)

    def assemble(self, parts: Sequence[Path], target: Path, total_rows: int) -> None:
        pacsv = import_optional("pyarrow.csv")
        with pacsv.open_csv(parts[0]) as reader:
            header = _csv_header(reader.schema.names)
        with open(target, "wb") as out:
            out.write(header)
            for part in parts:
                with open(part, "rb") as source:
                    if source.read(len(header)) != header:
                        raise EtlError(f"{part}: its header differs from the first part's")
                    shutil.copyfileobj(source, out, 1 << 20)


class NpySink:
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


SINKS = {"parquet": ParquetSink, "csv": CsvSink, "npy": NpySink}
