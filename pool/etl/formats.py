"""Files: Parquet, CSV and ``.npy`` sources (read a batch at a time) and sinks (one part per
chunk, assembled into the output), and the check of a file's column types against the model."""

from __future__ import annotations

import bisect
import csv
import io
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..messages import DEFAULT_INPUT, STRING, SignatureInfo, TensorInfo
from .common import Columns, EtlError, import_optional, return_free_memory
from .frames import arrow_column, source_columns, squeezed, with_predictions

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

    def row_bytes(self) -> float:
        """Bytes per row, uncompressed, from the footer (the row groups' sizes)."""
        meta = self._file.metadata
        size = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
        return size / max(1, meta.num_rows)

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
    """A CSV file, parsed a block at a time; columns that feed text inputs are read as text.

    With ``span=(prefix, start, stop)`` it is the records of bytes ``[start, stop)`` of the file
    read after ``prefix`` (the header and its line break), parsed with the column types of
    ``schema`` (the whole file's, read where it starts): one partition of a file job on a
    cluster (:func:`line_start` finds where its records start)."""

    format = "csv"

    def __init__(
        self, path: Path, schema: Any = None, span: tuple[bytes, int, int] | None = None
    ) -> None:
        self.path = path
        self._span = span
        if schema is None:  # from the first block, as every reader of the file infers it
            reader = self._open({}, head=True)
            schema = reader.schema
            reader.close()
        self.schema = schema
        self.num_rows: int | None = None

    def _stream(self) -> Any:
        if self._span is None:
            return self.path
        prefix, start, stop = self._span
        return io.BufferedReader(_ByteRange(self.path, prefix, start, stop), 1 << 20)

    def _open(self, column_types: dict[str, Any], head: bool = False) -> Any:
        """A pyarrow CSV reader; with ``head``, of the file's first two blocks only (the
        reader would read ahead far into the file just to tell its schema)."""
        pacsv = import_optional("pyarrow.csv")
        try:
            options = pacsv.ConvertOptions(column_types=column_types)
            stream = self._stream()
            if head and self._span is None:
                blocks = 2 * pacsv.ReadOptions().block_size
                stream = io.BufferedReader(_ByteRange(self.path, b"", 0, blocks), 1 << 16)
            return pacsv.open_csv(stream, convert_options=options)
        except (_arrow_error(), OSError) as exc:
            raise EtlError(f"{self._where()}: cannot read CSV ({exc}){self._hint()}") from None

    def batches(
        self, start: int, batch_rows: int, strings: Sequence[str] = (), records: bool = False
    ) -> Iterator[Any]:
        """Record batches from row ``start``; the columns ``strings`` are read as text (the
        others as pyarrow infers them). With ``records``, each batch carries one more column,
        ``RECORD``: each row's own bytes in the file, for a CSV output that keeps them."""
        pa = import_optional("pyarrow")
        types = {name: pa.string() for name in strings}
        if self._span is not None:  # a partition: the whole file's types, not its own guess
            types = {**{f.name: f.type for f in self.schema}, **types}
        reader = self._open(types)
        # A partition always splits its records itself too: a count that differs from pyarrow's
        # means that it does not start or end where a record does.
        split = records or self._span is not None
        text: CsvRecords | None = None
        if split:
            text = CsvRecords(self.path, file=None if self._span is None else self._stream())

        def read() -> Iterator[Any]:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    if text is not None and not text.exhausted():
                        raise EtlError(
                            f"{self._where()}: the CSV text holds more records than the rows read "
                            f"(unusual quoting?); write Parquet instead{self._hint()}"
                        ) from None
                    return
                except _arrow_error() as exc:
                    raise EtlError(
                        f"{self._where()}: cannot read CSV ({exc}){self._hint()}"
                    ) from None
                if text is not None:
                    kept = text.take(batch.num_rows)
                    if records:
                        batch = pa.RecordBatch.from_arrays(
                            [*batch.columns, kept], names=[*batch.schema.names, RECORD]
                        )
                yield batch

        try:
            yield from _skip_rows(read(), start)
        finally:
            reader.close()
            if text is not None:
                text.close()

    def _hint(self) -> str:
        if self._span is None:
            return ""
        return (
            "; a partition starts where a line starts, so a quoted field that holds a line "
            "break cannot be split there: convert the input to Parquet, or run without --cluster"
        )

    def _where(self) -> str:
        if self._span is None:
            return str(self.path)
        return f"{self.path} (bytes {self._span[1]}..{self._span[2]})"

    def text_header(self) -> tuple[bytes, bytes]:
        """The header's own bytes and its line break (``\\r\\n`` or ``\\n``)."""
        text = CsvRecords(self.path)
        try:
            return text.header, text.line_break
        finally:
            text.close()

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


class _ByteRange(io.RawIOBase):
    """``prefix``, then bytes ``[start, stop)`` of the file at ``path``: a readable stream."""

    def __init__(self, path: Path, prefix: bytes, start: int, stop: int) -> None:
        super().__init__()
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        self._file.seek(start)
        self._prefix = memoryview(prefix)
        self._left = max(0, stop - start)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if len(self._prefix):
            n = min(len(view), len(self._prefix))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        n = min(len(view), self._left)
        if n <= 0:
            return 0
        got = self._file.readinto(view[:n]) or 0
        self._left -= got
        return got

    def close(self) -> None:
        self._file.close()
        super().close()


_BREAK = re.compile(rb"[\r\n]")


def line_start(path: Path, offset: int, size: int) -> int:
    """The first position at or after ``offset`` where a line of the file starts (after a
    ``\n``, a ``\r\n`` or a lone ``\r``); ``size`` if none does. Where a CSV file is cut for
    its partitions: a line start is a record start unless a quoted field holds a line break."""
    if offset <= 0 or offset >= size:
        return min(max(offset, 0), size)
    with open(path, "rb") as f:
        f.seek(offset - 1)
        window = f.read(1 << 16)  # from the byte before ``offset``: does a line end there?
        if window[:1] == b"\n" or (window[:1] == b"\r" and window[1:2] != b"\n"):
            return offset
        window, at = window[1:], offset  # look from ``offset`` on
        while window:
            found = _BREAK.search(window)
            if found is None:
                at += len(window)
                window = f.read(1 << 16)
                continue
            i = found.start()
            if window[i : i + 1] == b"\r":
                following = window[i + 1 : i + 2] or f.read(1)
                return at + i + (2 if following == b"\n" else 1)
            return at + i + 1
    return size


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

    def row_bytes(self) -> float:
        """Bytes per row, from the array's header."""
        return float(self._array.dtype.itemsize * int(np.prod(self._array.shape[1:])))

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


def _type_problem(field: Any, spec: TensorInfo, shown: TensorInfo | None = None) -> str | None:
    """Why an Arrow column of this type cannot feed ``spec``, or ``None`` if it can.

    Types only: integers into a narrower integer or a float input, and floats into a narrower
    float input, pass here; their values are checked row by row when the rows are read
    (:func:`pool.sharding.cast_values`). ``shown`` is the input named in messages (the whole
    input when ``spec`` is one of several side-by-side columns)."""
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
    wanted = f"the model's input {(shown or spec).describe()}"
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
        by_value = (have.kind in "iu" and want.kind in "iuf") or (have.kind == want.kind == "f")
        if not (np.can_cast(have, want, casting="safe") or by_value):
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
        spec = shown = specs[name]
        if len(names) > 1 and spec.shape is not None:  # side-by-side scalars: check one scalar
            spec = TensorInfo(spec.name, spec.dtype, spec.shape[:-1])
        for column in names:
            problem = _type_problem(schema.field(column), spec, shown)
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
    #: ``gc.collect()`` after each part assembled (off on a cluster worker: see assemble)
    collect_garbage = True

    def write_part(self, pieces: Sequence[Any], outputs: Sequence[Any], path: Path) -> None:
        pq = import_optional("pyarrow.parquet")
        table = _output_table(pieces, outputs)
        pq.write_table(table, path, row_group_size=max(1, table.num_rows))

    def assemble(self, parts: Sequence[Path], target: Path, total_rows: int) -> None:
        pq = import_optional("pyarrow.parquet")
        schema = _unified([pq.read_schema(part) for part in parts])
        writer = None
        try:
            for part in parts:  # one chunk in memory at a time, released before the next
                with pq.ParquetFile(part, pre_buffer=False) as source:
                    if writer is None:
                        writer = pq.ParquetWriter(target, schema)
                    for group in range(source.num_row_groups):
                        table = source.read_row_group(group, use_threads=False)
                        if not table.schema.equals(schema):
                            table = table.cast(schema)
                        writer.write_table(table, row_group_size=max(1, table.num_rows))
                        del table
                return_free_memory(self.collect_garbage)
        finally:
            if writer is not None:
                writer.close()


def _as_binary(kind: Any) -> Any:
    """``kind`` with text replaced by bytes, inside lists too."""
    pa = import_optional("pyarrow")
    if pa.types.is_string(kind):
        return pa.binary()
    if pa.types.is_large_string(kind):
        return pa.large_binary()
    if pa.types.is_fixed_size_list(kind):
        return pa.list_(_as_binary(kind.value_type), kind.list_size)
    if pa.types.is_list(kind):
        return pa.list_(_as_binary(kind.value_type))
    return kind


def _unified(schemas: Sequence[Any]) -> Any:
    """The output's schema: the first part's, except that a text output which is bytes in any
    part (a value that is not UTF-8) is bytes in all."""
    pa = import_optional("pyarrow")
    first = schemas[0]
    fields = []
    for index, field in enumerate(first):
        kinds = {schema.field(index).type for schema in schemas if len(schema) == len(first)}
        if len(kinds) > 1 and len({_as_binary(k) for k in kinds}) == 1:
            field = field.with_type(_as_binary(field.type))
        fields.append(field)
    return pa.schema(fields, metadata=first.metadata)


def _as_text(kind: Any) -> Any:
    """``kind`` with bytes replaced by text, inside lists too."""
    pa = import_optional("pyarrow")
    if pa.types.is_binary(kind):
        return pa.string()
    if pa.types.is_large_binary(kind):
        return pa.large_string()
    if pa.types.is_fixed_size_list(kind):
        return pa.list_(_as_text(kind.value_type), kind.list_size)
    if pa.types.is_list(kind):
        return pa.list_(_as_text(kind.value_type))
    return kind


def _csv_ready(table: Any) -> Any:
    """List columns as JSON arrays (``[0.25, -1.5]``): CSV has no list type. Bytes are written
    as the text they encode; bytes that are not UTF-8 are an ``EtlError`` (CSV holds text)."""
    pa = import_optional("pyarrow")
    for index, field in enumerate(table.schema):
        kind = field.type
        if _as_text(kind) != kind:
            try:
                table = table.set_column(
                    index, field.name, table.column(index).cast(_as_text(kind))
                )
            except pa.ArrowInvalid:
                raise EtlError(
                    f"column {field.name!r} holds bytes that are not UTF-8 text, and a CSV file "
                    "holds text: write Parquet (a binary column) instead"
                ) from None
            kind = table.schema.field(index).type
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


def _csv_line(names: Sequence[str]) -> bytes:
    """One CSV line of ``names``, quoted only where needed, without a line break."""
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(names)
    return out.getvalue().encode()


class CsvSink:
    """Each chunk a CSV part with its header; assembled as one header plus every part's rows.

    From a CSV input (``keep_text``), each row is the input record's own bytes followed by the
    predictions, so the input's columns are kept byte for byte (quoting, number formats, line
    breaks); otherwise the rows are written by pyarrow."""

    format = "csv"
    suffix = ".csv"

    def __init__(self) -> None:
        self.header: bytes | None = None
        self.line_break = b"\n"

    def keep_text(self, header: bytes, line_break: bytes) -> None:
        self.header, self.line_break = header, line_break

    def write_part(self, pieces: Sequence[Any], outputs: Sequence[Any], path: Path) -> None:
        pacsv = import_optional("pyarrow.csv")
        if self.header is None:
            pacsv.write_csv(_csv_ready(_output_table(pieces, outputs)), path)
            return
        pa = import_optional("pyarrow")
        pc = import_optional("pyarrow.compute")
        names = list(outputs[0])
        with open(path, "wb") as out:
            out.write(self.header + b"," + _csv_line(names) + self.line_break)
            for piece, predictions in zip(pieces, outputs, strict=True):
                if not piece.num_rows:
                    continue
                table = pa.table(
                    {name: arrow_column(squeezed(predictions[name])) for name in names}
                )
                written = pa.BufferOutputStream()
                options = pacsv.WriteOptions(include_header=False)
                pacsv.write_csv(_csv_ready(table), written, options)
                buf = written.getvalue().to_pybytes()
                starts, stops, _ = _spans(buf, True)
                if len(starts) != piece.num_rows:
                    raise EtlError(
                        f"{len(starts)} CSV lines of predictions for {piece.num_rows} rows"
                    )
                binary = pa.large_binary()
                rows = pc.binary_join_element_wise(  # record + "," + predictions
                    piece.column(RECORD),
                    _binary(_bytes_of(buf, starts, stops), stops - starts),
                    pa.scalar(b",", binary),
                )
                rows = pc.binary_join_element_wise(  # + the line break (+ nothing)
                    rows, pa.scalar(b"", binary), pa.scalar(self.line_break, binary)
                )
                out.write(_values_bytes(rows))

    def assemble(self, parts: Sequence[Path], target: Path, total_rows: int) -> None:
        first = CsvRecords(parts[0])
        try:
            header = first.header + first.line_break
        finally:
            first.close()
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


# --- CSV text kept as it is ---------------------------------------------------------------------

#: The column that carries each CSV record's own text from a CSV source to a CSV sink.
RECORD = "\x00pool:csv-record"

_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


_FIELD_END = np.array([ord(","), ord("\n"), ord("\r"), ord('"')], np.uint8)


def _quotes(b: np.ndarray, final: bool) -> np.ndarray | None:
    """The positions of the quotes in ``b`` (which starts a record), or ``None`` when a quote
    is not where a quoted field opens (at the start of a field, or right after the quote that
    closes it: ``""``) or closes (before a delimiter, a line break or ``""``). Such a quote is
    literal text to pyarrow, and counting quotes would split records wrongly."""
    at = np.flatnonzero(b == 34)
    opening, closing = at[0::2], at[1::2]
    inner = opening[opening > 0]
    if not np.isin(b[inner - 1], _FIELD_END).all():
        return None
    inner = closing[closing < len(b) - 1]
    if not np.isin(b[inner + 1], _FIELD_END).all():
        return None
    if final and len(closing) < len(opening):
        return None  # a quoted field never closed: let the csv module report it
    return at


def _spans(buf: bytes, final: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """``(starts, stops, consumed)``: the records that end in ``buf``, where pyarrow's CSV
    reader splits them (a line break ``\\n``, ``\\r\\n`` or ``\\r`` outside a quoted field;
    empty lines are not records). ``stops`` exclude the line break; ``consumed`` is where the
    first record not known to be complete begins (all of ``buf`` when ``final``)."""
    b = np.frombuffer(buf, np.uint8)
    quotes = _quotes(b, final)
    if quotes is not None:  # found without Python: a line break after an even number of quotes
        lf = np.flatnonzero(b == 10)
        cr = np.flatnonzero(b == 13)
        lf = lf[(np.searchsorted(quotes, lf) & 1) == 0]
        cr = cr[(np.searchsorted(quotes, cr) & 1) == 0]
        inside = cr < len(b) - 1
        follows = np.zeros(len(cr), np.uint8)
        follows[inside] = b[cr[inside] + 1]
        lone_cr = cr[(follows != 10) & (inside | final)]  # a \r\n may span two reads
        ends = np.union1d(lf, lone_cr).astype(np.int64)
        starts = np.concatenate(([0], ends + 1)).astype(np.int64)
        stops = np.concatenate((ends, [len(b)])).astype(np.int64)
        crlf = np.zeros(len(ends), dtype=bool)
        after = ends > 0
        crlf[after] = (b[ends[after]] == 10) & (b[ends[after] - 1] == 13)
        stops[:-1] -= crlf
        if not final:
            starts, stops = starts[:-1], stops[:-1]
        keep = stops > starts
        consumed = len(b) if final else (int(ends[-1]) + 1 if len(ends) else 0)
        return starts[keep], stops[keep], consumed
    # Quotes: Python's csv module splits records as pyarrow does (a quote opens a quoted field
    # only at the start of a field; "" inside one is a quote). latin-1 keeps byte offsets.
    lines = [(m.start(), m.end(), m.group()) for m in _LINE.finditer(buf.decode("latin-1"))]
    reader = csv.reader(line for _, _, line in lines)
    found: list[tuple[int, int]] = []
    done = 0  # lines that belong to complete records
    try:
        for fields in reader:
            if not final and reader.line_num == len(lines):
                break  # the last line read may continue (an open quote, \r then \n)
            first, last = lines[done], lines[reader.line_num - 1]
            done = reader.line_num
            if fields:
                text = last[2]
                cut = 2 if text.endswith("\r\n") else 1 if text.endswith(("\r", "\n")) else 0
                found.append((first[0], last[1] - cut))
    except csv.Error:
        if final:
            raise
    consumed = len(buf) if final else (lines[done][0] if done < len(lines) else len(buf))
    spans = np.array(found, np.int64).reshape(-1, 2)
    return spans[:, 0], spans[:, 1], consumed


def _bytes_of(buf: bytes, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """The bytes of ``buf`` in the spans ``[starts[i], stops[i])``, one after the other."""
    b = np.frombuffer(buf, np.uint8)
    gap_from = np.concatenate(([0], stops))  # the bytes between records: line breaks, empty
    gap_to = np.concatenate((starts, [len(b)]))  # lines, what comes before and after
    sizes = gap_to - gap_from
    gap_from, sizes = gap_from[sizes > 0], sizes[sizes > 0]
    first = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    keep = np.ones(len(b), dtype=bool)
    keep[np.repeat(gap_from - first, sizes) + np.arange(int(sizes.sum()))] = False
    return b[keep]


def _binary(data: np.ndarray, lengths: np.ndarray) -> Any:
    """An Arrow ``large_binary`` array of consecutive values of ``lengths`` bytes in ``data``."""
    pa = import_optional("pyarrow")
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(data[: int(offsets[-1])])]
    return pa.Array.from_buffers(pa.large_binary(), len(lengths), buffers)


def _values_bytes(column: Any) -> memoryview:
    """The bytes of every value of a ``large_binary`` array, one after the other."""
    offsets = np.frombuffer(column.buffers()[1], np.int64)[column.offset :]
    first, last = int(offsets[0]), int(offsets[len(column)])
    return memoryview(column.buffers()[2])[first:last]


class CsvRecords:
    """A CSV file's records as their own bytes (without the line break), in file order: what
    lets a CSV output keep every input column byte for byte. ``header`` is the first record,
    ``line_break`` the header's line break (``\\n`` unless it is ``\\r\\n``)."""

    def __init__(self, path: Path, block: int = 1 << 20, file: Any = None) -> None:
        self.path = path
        # ``file``: a binary stream to split instead of ``path`` (a byte range, see csv_range)
        self._file = open(path, "rb") if file is None else file  # noqa: SIM115 (close())
        self._block = block
        self._buf = b""
        self._eof = False
        self._data = np.empty(0, np.uint8)  # records read and not taken: their bytes...
        self._lengths = np.empty(0, np.int64)  # ...and lengths
        self.line_break = b"\n"
        self.header_end = 0  # where the record after the header starts (with its line break)
        self._at = 0  # the offset in the file of ``_buf``'s first byte
        self._started = False
        self._read()
        while not len(self._lengths) and not self._eof:
            self._read()
        self.header = self.take(1)[0].as_py() if len(self._lengths) else b""

    def _read(self) -> None:
        chunk = self._file.read(self._block)
        self._eof = not chunk
        buf = self._buf + chunk
        try:
            starts, stops, consumed = _spans(buf, self._eof)
        except csv.Error as exc:
            raise EtlError(f"{self.path}: cannot read CSV ({exc})") from None
        if len(starts):
            if not self._started:  # the header: its line break is the output's
                self._started = True
                self.line_break = b"\r\n" if buf[stops[0] : stops[0] + 2] == b"\r\n" else b"\n"
                after = buf[stops[0] : stops[0] + 2]
                width = 2 if after == b"\r\n" else 1 if after[:1] in (b"\r", b"\n") else 0
                self.header_end = self._at + int(stops[0]) + width
            self._data = np.concatenate((self._data, _bytes_of(buf, starts, stops)))
            self._lengths = np.concatenate((self._lengths, stops - starts))
        self._buf = buf[consumed:]
        self._at += consumed

    def take(self, n: int) -> Any:
        """The next ``n`` records as an Arrow binary array; ``EtlError`` if the file has fewer."""
        while len(self._lengths) < n and not self._eof:
            self._read()
        if len(self._lengths) < n:
            raise EtlError(
                f"{self.path}: {n - len(self._lengths)} row(s) read from the CSV file have no "
                "record of their own in its text (unusual quoting?); write Parquet instead"
            )
        taken = _binary(self._data, self._lengths[:n])
        size = int(self._lengths[:n].sum())
        self._data, self._lengths = self._data[size:], self._lengths[n:]
        return taken

    def buffered(self) -> tuple[int, int]:
        """``(records, bytes)`` read and not taken yet, line breaks counted as the header's."""
        records = len(self._lengths)
        return records, int(self._lengths.sum()) + records * len(self.line_break)

    def skip(self, n: int) -> None:
        while n > 0:
            n -= len(self.take(min(n, 1 << 16)))

    def exhausted(self) -> bool:
        while not len(self._lengths) and not self._eof:
            self._read()
        return not len(self._lengths)

    def close(self) -> None:
        self._file.close()
