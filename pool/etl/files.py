"""One file job: :func:`predict_file` checks its arguments, opens the source and the staging
directory, and streams the rows through the pool chunk by chunk (``_Job``).

This edge starts a :class:`pool.PredictionPool` for a model path; the core never imports it."""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import sharding
from ..errors import WorkerCrashedError, WorkerError
from ..messages import DEFAULT_INPUT, STRING, SignatureInfo, TensorInfo
from ..prediction_pool import PredictionPool
from ..savedmodel_pb import not_a_savedmodel
from .common import Columns, EtlError, OutputColumns, import_optional, log
from .formats import SINKS, check_column_types, format_of, open_source
from .frames import (
    input_names,
    output_columns,
    output_names,
    outputs_by_name,
    resolve_columns,
    source_columns,
    to_inputs,
)
from .progress import progress_bar
from .savedmodel_pb import peek_signature
from .staging import Staging

#: Automatic ``chunk_rows`` aims at about this many bytes of input plus output per chunk...
TARGET_CHUNK_BYTES = 32 << 20
#: ...and at most this many rows.
MAX_CHUNK_ROWS = 1 << 20
#: Rows read to estimate row sizes and check value types before the job starts.
SAMPLE_ROWS = 256
MANIFEST_VERSION = 1


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
    seconds: float  # from the workers being ready to the rename of the output (no start-up)

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
            for name in source_columns(entry):
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
            total += itemsize * math.prod(d or 1 for d in t.shape[1:])
    return total


def auto_chunk_rows(in_bytes: float, signature: SignatureInfo, shard: int) -> int:
    """Rows per chunk: about ``TARGET_CHUNK_BYTES`` of input (``in_bytes`` per row) plus
    output, at most ``MAX_CHUNK_ROWS``, a multiple of ``shard``."""
    per_row = max(1, int(in_bytes) + _bytes_per_row(signature.outputs))
    chunk_rows = min(MAX_CHUNK_ROWS, max(shard, TARGET_CHUNK_BYTES // per_row))
    return max(shard, chunk_rows // shard * shard)


class _Job:
    """One :func:`predict_file` call, from checked arguments to the renamed output."""

    def __init__(
        self,
        source: Any,
        sink: Any,
        staging: Staging,
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
            inputs = input_names(signature)
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
            check_column_types(self._read_schema(sources, signature), sources, signature)
        outputs = output_names(signature)
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
        pa = import_optional("pyarrow")
        schema = self.source.schema
        for name in strings:
            schema = schema.set(schema.get_field_index(name), pa.field(name, pa.string()))
        return schema

    @staticmethod
    def _string_columns(sources: Mapping[str, Any], signature: SignatureInfo) -> list[str]:
        if signature.inputs is None:
            return []
        text = {t.name for t in signature.inputs if t.dtype == STRING}
        return [
            c for name, source in sources.items() if name in text for c in source_columns(source)
        ]

    def text_columns(self, sources: Mapping[str, Any], signature: SignatureInfo) -> list[str]:
        """The CSV columns read as text: all but those feeding a numeric input, so a column
        the model does not read keeps its text (``01234`` stays ``01234``, dates stay as
        written) in a CSV or Parquet output."""
        specs = {t.name: t for t in signature.inputs or ()}
        numeric = {
            column
            for name, source in sources.items()
            if specs.get(name) is None or specs[name].dtype != STRING
            for column in source_columns(source)
        }
        return [c for c in self.source.schema.names if c not in numeric]

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
        strings = self.text_columns(sources, signature)
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
            chunk_rows = auto_chunk_rows(in_bytes, signature, shard)
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

        keep_text = self.source.format == "csv" and self.sink.format == "csv"
        if keep_text:
            self.sink.keep_text(*self.source.text_header())

        def feed() -> Iterator[dict[str, np.ndarray]]:
            batches = (
                self.source.batches(start, shard, strings, records=True)
                if keep_text
                else self.source.batches(start, shard, strings)
            )
            pieces = cut_pieces(batches, start, shard, chunk_rows)
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
                    raise WorkerError(
                        f"{where}: {exc.args[0]}", exc.remote_traceback, exc.error_type
                    ) from None
                raise WorkerCrashedError(f"{where}: {exc}") from None
            _, piece = window.popleft()
            values = outputs_by_name(prediction, signature)
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
        pa = import_optional("pyarrow")
        empty = pa.RecordBatch.from_pylist([], schema=self.source.schema)
        if self.source.format == "csv" and self.sink.format == "csv":
            self.sink.keep_text(*self.source.text_header())
        values = outputs_by_name(pool.predict(to_inputs(empty, signature, sources)), signature)
        names = named or output_columns(list(values), self.output_column, empty.schema.names)
        self.staging.commit(0, 0, [empty], [{names[k]: v for k, v in values.items()}])


def cut_pieces(
    batches: Iterable[Any], start: int, rows: int, chunk_rows: int
) -> Iterator[tuple[int, Any]]:
    """``(first row, batch)`` of at most ``rows`` rows, never across a multiple of ``chunk_rows``.

    Small input batches (short row groups, CSV blocks) are merged, large ones cut.
    """
    pa = import_optional("pyarrow")
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
    overwrite: bool = False,
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
    in Parquet and JSON arrays in CSV, a trailing axis of size 1 is dropped so ``[N, 1]`` is a
    number column); a ``.npy`` output holds the predictions only. Columns the model does not
    read are kept as they are: from a CSV input, read as text (a CSV output keeps each input
    record's bytes).

    The output is committed ``chunk_rows`` rows at a time into ``.OUT.partial/`` and appears
    at ``output`` only complete, by an atomic rename. After a crash or Ctrl-C, ``resume=True``
    continues from the last committed chunk (see :mod:`pool.etl.staging`). Without ``resume``, an
    earlier run's committed chunks are discarded. An existing ``output`` is an ``EtlError``
    unless ``overwrite=True`` or ``resume=True`` continues the job that was writing it. Memory
    stays bounded by ``chunk_rows`` plus ``max_in_flight`` shards of ``shard_size`` rows,
    whatever the size of the input.

    With ``cluster=`` (a Dask scheduler address, client or cluster object, as for
    :class:`PredictionPool`), or a running pool on a cluster as ``model``, the cluster's workers
    read their own partitions and write their own parts, and this process only plans, tracks and
    renames (:mod:`pool.cluster.files`): the input and the output's directory must be at the
    same path on every worker (``EtlError`` before any model loads otherwise).

    Raises ``EtlError`` for a missing input, an unknown column, a column whose type does not fit
    the model, or an unwritable output; all but the type check happen before any worker starts
    (the type check too, for a local SavedModel whose signature can be read from disk).
    """
    input_path, output_path = Path(input), Path(output)
    running = model if isinstance(model, PredictionPool) else None
    if running is not None and (
        workers is not None or pool_options or signature != "serving_default" or model_output
    ):
        raise TypeError("workers= and pool options apply only when model is a path, not a pool")
    if running is None and isinstance(model, (str, os.PathLike)):
        text = os.fspath(model)
        reason = not_a_savedmodel(text)
        if reason is not None:
            raise EtlError(f"model {text!r} is not a SavedModel directory ({reason})")
    for name, value in (("shard_size", shard_size), ("chunk_rows", chunk_rows)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise EtlError(f"{name} must be a positive integer, got {value!r}")
    on_cluster = pool_options.get("cluster") is not None or (
        running is not None and _on_dask(running)
    )
    in_format = format_of(input_path, input_format, "input")
    out_format = format_of(output_path, output_format, "output")
    source = open_source(input_path, in_format, columns)
    try:
        _check_output_path(input_path, output_path)
        _check_named(source, columns, output_column)
        sink = SINKS[out_format]()
        signature_name = signature
        if running is not None:
            model, signature_name, model_output = (
                running.model,
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
            Staging(output_path, sink),
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
                _check_resumable(previous, identity, chunk_rows, output_path, on_cluster)
            elif output_path.exists() and not overwrite:
                raise EtlError(
                    f"output {str(output_path)!r} already exists; pass overwrite=True / "
                    "--overwrite to replace it"
                )
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
            if on_cluster:  # the workers read and write the files (pool/cluster/files.py)
                return _run_on_cluster(
                    job,
                    running or model,
                    previous,
                    chunk_rows,
                    shard_size,
                    workers=workers,
                    signature=signature,
                    output=model_output,
                    **pool_options,
                )
            if running is not None:
                return job.run(running, previous, chunk_rows, shard_size)
            if previous is not None and (done := _finish_committed(staging, previous, source)):
                return done  # every row was committed before the interruption: no pool needed
            started = PredictionPool(
                model,
                workers,
                signature=signature,
                output=model_output,
                shard_size=shard_size,
                **pool_options,
            ).start()
            with started:  # on Ctrl-C or an error, the workers are killed at once
                return job.run(started, previous, chunk_rows, shard_size)
        finally:
            staging.release()
    finally:
        source.close()


def _on_dask(running: PredictionPool) -> bool:
    """Whether a running pool's workers are a Dask cluster's (without importing Dask)."""
    module = sys.modules.get("pool.cluster.backend")
    return module is not None and isinstance(running.backend, module.DaskBackend)


def _run_on_cluster(
    job: _Job,
    model: Any,
    previous: dict[str, Any] | None,
    chunk_rows: int | None,
    shard_size: int | None,
    **pool_options: Any,
) -> FileReport:
    """The job with the cluster's workers reading and writing the files: check that they see
    them, start a pool on the cluster unless ``model`` is one, run
    :func:`pool.cluster.files.run`."""
    from ..cluster import files as cluster_files
    from ..cluster.backend import connect

    source_path = Path(job.source.path).resolve()
    stat = source_path.stat()
    paths = (str(source_path), stat.st_size, stat.st_mtime_ns, str(job.staging.dir.resolve()))
    if isinstance(model, PredictionPool):
        client = model.backend.client  # type: ignore[attr-defined]
        cluster_files.check_workers_see(client, paths)
        return cluster_files.run(job, client, model, previous, chunk_rows, shard_size)
    client, owned = connect(pool_options.pop("cluster"))
    try:
        cluster_files.check_workers_see(client, paths)  # before the model loads anywhere
        started = PredictionPool(
            model, cluster=client, shard_size=shard_size, **pool_options
        ).start()
        with started:
            return cluster_files.run(job, client, started, previous, chunk_rows, shard_size)
    finally:
        if owned:
            client.close()


def _finish_committed(
    staging: Staging, previous: Mapping[str, Any], source: Any
) -> FileReport | None:
    """Assemble the output of a resumed job whose every row is already committed (it was
    interrupted after its last commit), without starting a pool; ``None`` if rows are left."""
    begun = time.perf_counter()
    chunk_rows = previous.get("chunk_rows")
    total = source.num_rows if source.num_rows is not None else source.count_rows()
    if not isinstance(chunk_rows, int) or not total:
        return None
    done = staging.committed(chunk_rows, total)
    if sum(done) != total:
        return None
    staging.finish(total)
    log.info("resumed %s: every row was already committed; no worker started", staging.output)
    return FileReport(
        output=str(staging.output),
        rows=total,
        computed_rows=0,
        chunks=len(done),
        resumed_chunks=len(done),
        chunk_rows=chunk_rows,
        shard_size=0,
        seconds=time.perf_counter() - begun,
    )


def _check_resumable(
    previous: Mapping[str, Any],
    identity: Mapping[str, Any],
    chunk_rows: int | None,
    output: Path,
    on_cluster: bool = False,
) -> None:
    was_cluster = previous.get("layout") == "partitions"
    if was_cluster != on_cluster:
        raise EtlError(
            f"cannot resume {str(output)!r}: it was written "
            f"{'with' if was_cluster else 'without'} --cluster (cluster=), and parts are "
            "laid out differently; resume it the same way, or run without --resume"
        )
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
