"""File jobs on a Dask cluster: ``predict_file(..., cluster=...)`` / ``predict --cluster``.

The workers read the input and write the output; the client only plans, submits and commits::

    client  plan: the input's partitions from its metadata only (Parquet footer: row ranges;
            CSV: byte ranges from the file size; .npy: row ranges from its header)
      │     probe: every worker sees the input (same size, mtime) and the staging directory
      │     one small task per partition not yet committed: a FileTask + a Partition (paths,
      │     ranges, column names; no data)
      ▼
    worker  run_partition: reads its rows ─▶ to_inputs ─▶ the model the pool loaded there
            (plugin.loaded_plugin + pool.worker.call_model), shard_size rows per call ─▶
            writes .OUT.partial/part-<index>-<rows> (a temporary name, fsync, rename)
      ▼
    client  every part is there ─▶ one assemble task on a worker writes the output into the
            staging directory ─▶ the client renames it over OUT (atomic) and removes the rest

A worker that dies takes its partition's temporary file with it; Dask runs the task again
elsewhere (and the client again, if Dask gave up: ``KilledWorker``). Parts are committed under
their final name only complete, so ``--resume`` keeps every committed part (any of them, not a
prefix) and computes the others. Memory on a worker is one partition (about ``chunk_rows``
rows of input and output); the client holds the plan only. See docs/etl.md and
docs/scale-out.md. This module never imports TensorFlow.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from distributed import as_completed, get_worker
from distributed.scheduler import KilledWorker

from .. import sharding
from ..errors import WorkerCrashedError, WorkerError
from ..etl.common import EtlError, import_optional
from ..etl.formats import SINKS, CsvRecords, CsvSource, NpySource, ParquetSource, line_start
from ..etl.frames import output_columns, outputs_by_name, to_inputs
from ..etl.staging import write_part
from ..messages import ShardRequest, SignatureInfo
from .plugin import loaded_plugin

log = logging.getLogger("pool")

#: How many times the client re-submits a partition that Dask gave up on (``KilledWorker``:
#: its workers kept dying) before the job fails.
MAX_PARTITION_ROUNDS = 3

#: An automatic ``chunk_rows`` leaves at least this many partitions per worker when the input
#: is small enough for fewer (so that every worker has work, and a straggler is short).
PARTITIONS_PER_WORKER = 2

#: The layout of a cluster job's manifest (parts per partition, any of them committed).
LAYOUT = "partitions"


@dataclass(frozen=True)
class FileTask:
    """What every partition task of one job shares: paths, columns, types. No data."""

    plugin_name: str
    input: str
    input_format: str
    input_size: int
    input_mtime_ns: int
    staging: str
    sink_format: str
    signature: SignatureInfo
    sources: Mapping[str, Any]
    named: Mapping[str, str] | None
    output_column: Any
    strings: tuple[str, ...]
    shard_size: int
    schema: Any  # the input's Arrow schema (CSV: the column types every partition reads with)
    npy_name: str | None = None
    csv_header: bytes = b""  # the CSV header's own bytes...
    csv_line_break: bytes = b"\n"  # ...and its line break
    csv_data_start: int = 0  # where the first record after the header starts
    keep_text: bool = False  # CSV -> CSV: each row is its input record's bytes


@dataclass(frozen=True)
class Partition:
    """Rows ``[first, first + rows)`` (Parquet, .npy), or the records that start in bytes
    ``[start, stop)`` (CSV, cut points moved to the next line start by the worker)."""

    index: int
    first: int = 0
    rows: int | None = None
    start: int = 0
    stop: int = 0

    def describe(self, task: FileTask) -> str:
        if task.input_format == "csv":
            return f"partition {self.index} (bytes {self.start}..{self.stop}) of {task.input}"
        last = self.first + (self.rows or 0) - 1
        return f"partition {self.index} (input rows {self.first}..{last}) of {task.input}"


# --- the plan (client) --------------------------------------------------------------------------


def plan(source: Any, chunk_rows: int, row_bytes: float, begin: int = 0) -> list[Partition]:
    """The partitions of ``source``, from its metadata: ``chunk_rows`` rows each (Parquet,
    .npy: the local job's chunks), or about ``chunk_rows`` rows' worth of bytes (CSV, whose
    records start at byte ``begin``)."""
    if source.format == "csv":
        size = os.stat(source.path).st_size
        step = max(1, int(chunk_rows * max(1.0, row_bytes)))
        count = max(1, math.ceil((size - begin) / step))
        cuts = [begin + k * step for k in range(count)] + [size]
        return [Partition(k, start=cuts[k], stop=cuts[k + 1]) for k in range(count)]
    total = source.num_rows or 0
    count = max(1, math.ceil(total / chunk_rows))
    return [
        Partition(k, first=k * chunk_rows, rows=min(chunk_rows, total - k * chunk_rows))
        for k in range(count)
    ]


def plan_json(partitions: Sequence[Partition]) -> list[list[int | None]]:
    return [[p.first, p.rows, p.start, p.stop] for p in partitions]


def plan_from_json(entries: Sequence[Sequence[Any]]) -> list[Partition]:
    return [Partition(k, *entry) for k, entry in enumerate(entries)]


def csv_layout(path: Path) -> tuple[bytes, bytes, int, float]:
    """``(header, line break, first data byte, bytes per record)`` from the file's first block
    (what the client reads of a CSV input besides its size)."""
    text = CsvRecords(path, block=1 << 16)
    try:
        records, size = text.buffered()
        return text.header, text.line_break, text.header_end, size / max(1, records)
    finally:
        text.close()


def auto_shard(row_bytes: float) -> int:
    """Rows per model call when neither ``shard_size`` nor the pool says: about
    ``sharding.TARGET_SHARD_BYTES`` of input, at most ``sharding.MAX_AUTO_SHARD_ROWS``."""
    by_bytes = int(sharding.TARGET_SHARD_BYTES // max(1.0, row_bytes))
    return max(1, min(sharding.MAX_AUTO_SHARD_ROWS, by_bytes))


# --- the probe (every worker, before any task) --------------------------------------------------


def probe(input: str, size: int, mtime_ns: int, staging: str, lock: str) -> str | None:
    """Run on each worker: ``None`` when it sees the input (same size and mtime as the client)
    and can write into the staging directory the client created; else what is wrong."""
    try:
        seen = os.stat(input)
    except OSError as exc:
        return f"cannot see the input {input!r} ({exc.strerror})"
    if (seen.st_size, seen.st_mtime_ns) != (size, mtime_ns):
        return (
            f"sees another file at {input!r} ({seen.st_size} bytes, mtime {seen.st_mtime_ns} ns; "
            f"the client sees {size} bytes, mtime {mtime_ns} ns)"
        )
    try:
        own = (Path(staging) / "lock").read_text()
    except OSError:
        own = None
    if own != lock:
        return f"cannot see the output's staging directory {staging!r} that the client created"
    try:
        fd, name = tempfile.mkstemp(dir=staging, prefix=".tmp-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return f"cannot write into the output's staging directory {staging!r} ({exc.strerror})"
    return None


def check_workers_see(client: Any, task_paths: tuple[str, int, int, str]) -> None:
    """``EtlError`` naming a worker that cannot see the input or the staging directory."""
    input, size, mtime_ns, staging = task_paths
    lock = (Path(staging) / "lock").read_text()
    answers = client.run(probe, input, size, mtime_ns, staging, lock, on_error="return")
    for address, answer in sorted(answers.items()):
        if isinstance(answer, BaseException):
            answer = f"could not be asked whether it sees the files ({answer})"
        if answer is not None:
            raise EtlError(
                f"Dask worker {address} {answer}: with --cluster the workers read the input "
                "and write the output's parts themselves, so the input and the output's "
                "directory must be at the same path on storage every worker sees (a shared or "
                "cluster filesystem); or run without --cluster"
            )


# --- the tasks (workers) ------------------------------------------------------------------------


def _batches(task: FileTask, part: Partition) -> Iterator[Any]:
    """The record batches of one partition (read a batch at a time)."""
    path = Path(task.input)
    if task.input_format == "csv":
        size = task.input_size
        start = task.csv_data_start if part.index == 0 else line_start(path, part.start, size)
        stop = line_start(path, part.stop, size)
        if stop <= start:
            return
        span = (task.csv_header + task.csv_line_break, start, stop)
        records = CsvSource(path, task.schema, span)
        yield from records.batches(0, task.shard_size, task.strings, records=task.keep_text)
        return
    source: Any = (
        ParquetSource(path) if task.input_format == "parquet" else NpySource(path, task.npy_name)
    )
    left = part.rows or 0
    try:
        for batch in source.batches(part.first, task.shard_size):
            if left <= 0:
                break
            if batch.num_rows > left:
                batch = batch.slice(0, left)
            left -= batch.num_rows
            yield batch
    finally:
        source.close()
    if left:
        raise EtlError(f"{part.describe(task)}: the input ended {left} row(s) early")


def _empty(task: FileTask) -> Any:
    pa = import_optional("pyarrow")
    return pa.RecordBatch.from_pylist([], schema=task.schema)


def run_partition(task: FileTask, part: Partition) -> int:
    """One partition, on a Dask worker: read, predict, write its part; its row count."""
    from ..etl.files import cut_pieces
    from ..worker import call_model

    worker = get_worker()
    problem = probe_paths(task)
    if problem is not None:
        raise EtlError(f"Dask worker {worker.address} {problem}; see docs/etl.md (--cluster)")
    plugin = loaded_plugin(task.plugin_name, worker)
    model = plugin.model()
    name = sharding.describe_model(plugin.config.model)
    sink: Any = SINKS[task.sink_format]()
    if task.keep_text:
        sink.keep_text(task.csv_header, task.csv_line_break)
    csv = task.input_format == "csv"
    base = 0 if csv else part.first
    names = dict(task.named) if task.named is not None else None
    pieces: list[Any] = []
    outputs: list[dict[str, np.ndarray]] = []
    for row, piece in cut_pieces(_batches(task, part), 0, task.shard_size, 1 << 62):
        where = (
            f"rows {row}..{row + piece.num_rows - 1} of {part.describe(task)}"
            if csv
            else f"input rows {base + row}..{base + row + piece.num_rows - 1} of {task.input}"
        )
        try:
            arrays = to_inputs(piece, task.signature, task.sources, first_row=base + row)
        except (TypeError, ValueError) as exc:
            raise EtlError(f"{part.describe(task)}: {exc}") from None
        request = ShardRequest(base + row, base + row + piece.num_rows, arrays)
        try:
            result = call_model(model, request, name)
        except WorkerError as exc:
            raise WorkerError(
                f"{where}: {exc.args[0]}", exc.remote_traceback, exc.error_type
            ) from None
        plugin.count(request, result.busy_seconds)
        values = outputs_by_name(result.outputs, task.signature)
        if names is None:  # a model that does not declare its outputs
            names = output_columns(list(values), task.output_column, task.schema.names)
        pieces.append(piece)
        outputs.append({names[k]: v for k, v in values.items()})
    rows = sum(p.num_rows for p in pieces)
    if not pieces:  # an empty partition still writes a part: the output's columns and types
        empty = _empty(task)
        arrays = to_inputs(empty, task.signature, task.sources)
        values = sharding.empty_outputs(task.signature) or outputs_by_name(
            call_model(model, ShardRequest(0, 0, arrays), name).outputs, task.signature
        )
        if names is None:
            names = output_columns(list(values), task.output_column, task.schema.names)
        pieces, outputs = [empty], [{names[k]: v for k, v in values.items()}]
    write_part(
        Path(task.staging),
        part.index,
        rows,
        sink.suffix,
        lambda path: sink.write_part(pieces, outputs, path),
    )
    return rows


def probe_paths(task: FileTask) -> str | None:
    """What a partition task checks before reading: the input and the staging directory."""
    if not os.path.isfile(task.input):
        return f"cannot see the input {task.input!r}"
    if not os.path.isdir(task.staging):
        return (
            f"cannot see the output's staging directory {task.staging!r}: the input and the "
            "output's directory must be on storage every worker sees"
        )
    return None


def assemble(staging: str, sink_format: str, count: int, total_rows: int) -> str:
    """On a worker: concatenate parts ``0..count-1`` in order into a temporary file in the
    staging directory (flushed); its path, for the client to rename over the output."""
    from ..etl.common import fsync_path

    sink: Any = SINKS[sink_format]()
    sink.collect_garbage = False  # a full gc.collect() per part is slow beside a loaded model
    directory = Path(staging)
    found: dict[int, Path] = {}
    for entry in directory.iterdir():
        if entry.name.startswith("part-") and entry.name.endswith(sink.suffix):
            found[int(entry.name.split("-")[1])] = entry
    missing = [k for k in range(count) if k not in found]
    if missing:
        raise EtlError(f"{staging}: parts {missing[:5]} are missing; run again with --resume")
    temporary = directory / f".tmp-output-{uuid.uuid4().hex}{sink.suffix}"
    try:
        sink.assemble([found[k] for k in range(count)], temporary, total_rows)
        fsync_path(temporary)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return str(temporary)


# --- the job (client) ---------------------------------------------------------------------------


def run(
    job: Any,
    client: Any,
    pool: Any,
    resume_from: Mapping[str, Any] | None,
    chunk_rows: int | None,
    shard_size: int | None,
) -> Any:
    """The file job ``job`` (a checked ``pool.etl.files._Job`` whose staging directory is
    locked) on the cluster of the running ``pool``; its ``FileReport``."""
    from ..etl.files import FileReport, auto_chunk_rows
    from ..etl.progress import progress_bar

    started = time.perf_counter()
    source, staging = job.source, job.staging
    signature = pool.signature
    workers = max(1, sum(client.nthreads().values()))  # threads: tasks that run at once
    sources, named = job.check(signature)
    strings = tuple(job.text_columns(sources, signature))
    header, line_break, data_start = b"", b"\n", 0
    if source.format == "csv":  # the header and the first 64 KiB: names, sizes
        header, line_break, data_start, row_bytes = csv_layout(source.path)
    else:
        row_bytes = source.row_bytes()
    if resume_from is not None:
        chunk_rows = int(resume_from["chunk_rows"])
        partitions = plan_from_json(resume_from["partitions"])
    else:
        if not chunk_rows:
            chunk_rows = auto_chunk_rows(row_bytes, signature, shard_size or 1)
            rows = source.num_rows
            if rows is None:  # a CSV: rows estimated from its size
                rows = int((os.stat(source.path).st_size - data_start) / max(1.0, row_bytes))
            # enough partitions to keep every worker busy on a small input
            chunk_rows = max(
                1, min(chunk_rows, math.ceil(rows / (PARTITIONS_PER_WORKER * workers)))
            )
        partitions = plan(source, chunk_rows, row_bytes, data_start)
        staging.write_manifest(
            {
                **job.identity,
                "chunk_rows": chunk_rows,
                "layout": LAYOUT,
                "partitions": plan_json(partitions),
            }
        )
    shard = shard_size or pool.shard_size or auto_shard(row_bytes)
    stat = os.stat(source.path)
    task = FileTask(
        plugin_name=pool.backend.name,
        input=str(Path(source.path).resolve()),
        input_format=source.format,
        input_size=stat.st_size,
        input_mtime_ns=stat.st_mtime_ns,
        staging=str(staging.dir.resolve()),
        sink_format=job.sink.format,
        signature=signature,
        sources=dict(sources),
        named=named,
        output_column=job.output_column,
        strings=strings,
        shard_size=shard,
        schema=_read_schema(source, strings),
        npy_name=getattr(source, "name", None),
        csv_header=header,
        csv_line_break=line_break,
        csv_data_start=data_start,
        keep_text=source.format == "csv" and job.sink.format == "csv",
    )
    expected = [p.rows for p in partitions]
    done = staging.partitions(expected)
    if done:
        log.info(
            "resuming: %d of %d partition(s), %d rows, already committed",
            len(done),
            len(partitions),
            sum(done.values()),
        )
    todo = [p for p in partitions if p.index not in done]
    total = source.num_rows
    log.info(
        "predicting %s -> %s on the cluster: %s rows in %d partition(s) of about %d rows, "
        "shards of %d rows",
        source.path,
        staging.output,
        "?" if total is None else total,
        len(partitions),
        chunk_rows,
        shard,
    )
    rows = dict(done)
    bar = progress_bar(
        job.progress, total=total, initial=sum(done.values()), desc=staging.output.name
    )
    futures: dict[str, tuple[Any, Partition, int]] = {}  # key: (Dask future, partition, rounds)
    try:
        pending = as_completed(loop=client.loop)
        for part in todo:
            pending.add(_submit(client, task, part, futures, 0))
        for future in pending:
            _, part, rounds = futures.pop(future.key)
            if future.status == "finished":
                rows[part.index] = future.result()
                bar.update(rows[part.index])
                continue
            error = future.exception()
            if isinstance(error, KilledWorker) and rounds < MAX_PARTITION_ROUNDS:
                log.warning(
                    "%s: its Dask workers died %d times (KilledWorker); running it again",
                    part.describe(task),
                    error.allowed_failures + 1,
                )
                pending.add(_submit(client, task, part, futures, rounds + 1))
                continue
            if isinstance(error, KilledWorker):
                raise WorkerCrashedError(
                    f"{part.describe(task)}: Dask gave up on it {rounds + 1} times ({error})"
                ) from None
            raise error
    finally:
        bar.close()
        if futures:  # an error or Ctrl-C: the parts committed so far stay for --resume
            try:
                client.cancel([future for future, _, _ in futures.values()])
            except Exception as exc:  # the cluster is gone: nothing to cancel
                log.debug("could not cancel %d partition task(s): %s", len(futures), exc)
    end = sum(rows.values())
    assembled = client.submit(
        assemble, task.staging, task.sink_format, len(partitions), end, pure=False
    ).result()
    staging.publish(Path(assembled))
    seconds = time.perf_counter() - started
    log.info("wrote %d rows to %s in %.1f s", end, staging.output, seconds)
    return FileReport(
        output=str(staging.output),
        rows=end,
        computed_rows=end - sum(done.values()),
        chunks=len(partitions),
        resumed_chunks=len(done),
        chunk_rows=chunk_rows,
        shard_size=shard,
        seconds=seconds,
    )


def _submit(
    client: Any, task: FileTask, part: Partition, futures: dict[str, Any], rounds: int
) -> Any:
    key = f"pool-partition-{part.index}-{uuid.uuid4().hex}"
    future = client.submit(run_partition, task, part, key=key, pure=False, priority=-part.index)
    futures[key] = (future, part, rounds)
    return future


def _read_schema(source: Any, strings: Sequence[str]) -> Any:
    """The input's schema as the partitions read it: a CSV's text columns as text."""
    if source.format != "csv":
        return source.schema
    pa = import_optional("pyarrow")
    schema = source.schema
    for name in strings:
        schema = schema.set(schema.get_field_index(name), pa.field(name, pa.string()))
    return schema
