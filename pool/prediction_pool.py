"""``PredictionPool``: the pool's lifecycle and its public methods.

Start-up loads the model in every worker at once and returns when all are warm; calls are
validated and split into shards here, dispatched by :mod:`pool.dispatcher`, and gathered back
in input order. This module never imports TensorFlow.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import replace
from typing import Any

import numpy as np
import psutil

from . import etl, sharding
from .dispatcher import Dispatcher, Limits
from .errors import ModelLoadError, PoolClosedError
from .messages import ShardRequest, SignatureInfo, WorkerConfig, WorkerReady, WorkerStats
from .process import WorkerProcess, allowed_cpus, cpus_for, default_workers, make_context

log = logging.getLogger("pool")

Model = str | os.PathLike | Callable[[], Callable]
Prediction = np.ndarray | dict[str, np.ndarray]


class PredictionPool:
    """A pool of worker processes, each holding one loaded copy of a TensorFlow model.

    >>> with PredictionPool("path/to/saved_model", workers=2) as pool:  # doctest: +SKIP
    ...     probabilities = pool.predict(images)

    See ``docs/guide.md`` for every option.
    """

    def __init__(
        self,
        model: Model,
        workers: int | None = None,
        *,
        signature: str = "serving_default",
        output: str | None = None,
        threads_per_worker: int = 1,
        inter_op_threads: int = 1,
        pin_cpus: bool | None = None,
        shard_size: int | None = None,
        max_in_flight: int | None = None,
        start_method: str | None = None,
        start_timeout: float | None = 600.0,
        max_retries: int = 2,
        timeout: float | None = None,
        max_worker_memory: int | None = None,
        max_shards_per_worker: int | None = None,
    ) -> None:
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        if not isinstance(model, str) and not callable(model):
            raise TypeError(
                "model must be a SavedModel path, a TF Hub handle or a factory callable, "
                f"got {type(model).__name__}"
            )
        self._model = model
        self.workers = default_workers() if workers is None else _positive("workers", workers)
        self.signature_name = signature
        self.output = output
        self.threads_per_worker = _positive("threads_per_worker", threads_per_worker)
        self.inter_op_threads = _positive("inter_op_threads", inter_op_threads)
        cpus = allowed_cpus()
        if pin_cpus and cpus is None:
            raise ValueError("pin_cpus=True, but this OS has no CPU affinity API (e.g. macOS)")
        self.pin_cpus = cpus is not None if pin_cpus is None else pin_cpus
        self._allowed_cpus = cpus
        self.shard_size = None if shard_size is None else _positive("shard_size", shard_size)
        self.max_in_flight = (
            4 * self.workers if max_in_flight is None else _positive("max_in_flight", max_in_flight)
        )
        self._context = make_context(start_method)
        self.start_method = self._context.get_start_method()
        self.start_timeout = start_timeout
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self._limits = Limits(
            max_retries=max_retries,
            timeout=None if timeout is None else _positive("timeout", timeout),
            max_worker_memory=None
            if max_worker_memory is None
            else _positive("max_worker_memory", max_worker_memory),
            max_shards_per_worker=None
            if max_shards_per_worker is None
            else _positive("max_shards_per_worker", max_shards_per_worker),
        )
        self._dispatcher: Dispatcher | None = None
        self._signature: SignatureInfo | None = None
        self._ready: list[WorkerReady] = []
        self._final_stats: list[WorkerStats] = []
        self._lock = threading.Lock()
        self.startup_seconds: float | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> PredictionPool:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.shutdown(kill=exc_type is not None)

    def start(self) -> PredictionPool:
        """Start every worker, load the model in all of them at once, and warm them up."""
        with self._lock:
            if self._dispatcher is not None:
                return self
            started = time.perf_counter()
            config = self._worker_config()
            processes: list[WorkerProcess] = []
            try:
                for index in range(self.workers):
                    processes.append(self._new_process(index, config))
                self._ready = self._wait_ready(processes)
            except BaseException:
                for p in processes:
                    p.shutdown(kill=True)
                raise
            for p, ready in zip(processes, self._ready, strict=True):
                p.mark_ready(ready)
            self._signature = self._ready[0].signature
            self._dispatcher = Dispatcher(processes, self._limits, self._restart)
            self.startup_seconds = time.perf_counter() - started
            log.info(
                "pool started: %d workers (%s, %d intra-op threads each) in %.2f s",
                self.workers,
                self.start_method,
                self._ready[0].intra_op_threads,
                self.startup_seconds,
            )
            return self

    def shutdown(self, kill: bool = False) -> None:
        """Stop all workers. Waits for queued shards unless ``kill``; idempotent."""
        with self._lock:
            dispatcher, self._dispatcher = self._dispatcher, None
            if dispatcher is None:
                return
            try:
                dispatcher.stop(kill=kill)
            finally:
                for process in [s.process for s in dispatcher.slots] + dispatcher.retired:
                    process.shutdown(kill=kill)
                self._final_stats = [
                    replace(s.process.stats, rss_bytes=0) for s in dispatcher.slots
                ]
            log.info("pool shut down%s", " (workers killed)" if kill else "")

    close = shutdown

    def _worker_config(self) -> WorkerConfig:
        model = self._model
        if isinstance(model, str):
            if "://" in model:
                from . import model as model_module  # imports TensorFlow: remote handles only

                model = model_module.resolve(model)
            elif not os.path.isdir(model):
                raise ModelLoadError(
                    f"expected a SavedModel directory or a TF Hub handle, got {model!r}: "
                    "no such directory"
                )
            model = os.path.abspath(model)
        me = psutil.Process()
        return WorkerConfig(
            model=model,
            signature=self.signature_name,
            output=self.output,
            intra_op_threads=self.threads_per_worker,
            inter_op_threads=self.inter_op_threads,
            cpus=None,
            warmup_rows=self.shard_size or 1,
            parent_pid=me.pid,
            parent_create_time=me.create_time(),
        )

    def _new_process(self, index: int, config: WorkerConfig) -> WorkerProcess:
        if self.pin_cpus and self._allowed_cpus:
            config = replace(
                config, cpus=cpus_for(index, self.threads_per_worker, self._allowed_cpus)
            )
        return WorkerProcess(index, config, self._context)

    def _restart(self, old: WorkerProcess) -> WorkerProcess:
        return WorkerProcess(old.index, old.config, self._context)

    def _wait_ready(self, processes: list[WorkerProcess]) -> list[WorkerReady]:
        futures = [p.ready_future for p in processes]
        done, _ = wait_futures(futures, timeout=self.start_timeout, return_when="FIRST_EXCEPTION")
        for f in futures:
            if f in done and f.exception() is not None:
                exc = f.exception()
                if isinstance(exc, ModelLoadError):
                    raise ModelLoadError(str(exc)) from None
                raise ModelLoadError(
                    f"a worker process exited while loading the model ({exc}). In a script, "
                    'create the pool under `if __name__ == "__main__":`: with the '
                    f"{self.start_method} start method every worker re-imports the main module "
                    "(docs/guide.md, 'Start methods')"
                ) from exc
        if len(done) < len(futures):
            raise ModelLoadError(
                f"workers did not load the model within start_timeout={self.start_timeout} s"
            )
        ready = [f.result() for f in futures]
        if len({r.signature for r in ready}) != 1:
            raise ModelLoadError("workers loaded models with different signatures")
        return ready

    # --- calls -----------------------------------------------------------------------------
    @property
    def signature(self) -> SignatureInfo:
        """The model's inputs and outputs as the workers loaded them."""
        return self._running()[1]

    def _running(self) -> tuple[Dispatcher, SignatureInfo]:
        dispatcher, signature = self._dispatcher, self._signature
        if dispatcher is None or signature is None:
            raise PoolClosedError(
                "the pool is not running: use `with PredictionPool(...) as pool:` or call start()"
            )
        return dispatcher, signature

    def predict(
        self,
        inputs: Any,
        *,
        shard_size: int | None = None,
        check_finite: bool = False,
        columns: etl.Columns = None,
    ) -> Prediction:
        """Answer every row of ``inputs``; row ``i`` of the result answers input row ``i``.

        ``inputs``: an array (single-input signature), a dict of arrays (several inputs), or a
        list/array of ``str``/``bytes`` (``tf.string`` input). ``check_finite`` refuses NaN and
        infinity in floating-point inputs before anything is dispatched. A pandas
        Series/DataFrame or a pyarrow array/RecordBatch/Table works too (``pip install
        'pool[etl]'``); ``columns`` names the column feeding each input (see docs/etl.md).
        """
        return self.submit(
            inputs, shard_size=shard_size, check_finite=check_finite, columns=columns
        ).result()

    def submit(
        self,
        inputs: Any,
        *,
        shard_size: int | None = None,
        check_finite: bool = False,
        columns: etl.Columns = None,
    ) -> Future:
        """Like :meth:`predict`, but return a ``concurrent.futures.Future`` at once."""
        dispatcher, signature = self._running()
        if columns is not None or etl.is_table(inputs):
            inputs = etl.to_inputs(inputs, signature, columns)
        arrays, rows = sharding.prepare(inputs, signature, check_finite)
        return self._dispatch(dispatcher, signature, arrays, rows, shard_size)[0]

    def imap(
        self,
        batches: Iterable[Any],
        *,
        shard_size: int | None = None,
        max_in_flight: int | None = None,
        check_finite: bool = False,
    ) -> Iterator[Prediction]:
        """Predict each batch of ``batches``, yielding results in input order.

        At most ``max_in_flight`` shards are submitted ahead of the one being yielded (a batch
        is never split across that bound), so an endless generator runs in flat memory. If the
        iterable or one of its batches raises, every earlier result is yielded first.
        """
        dispatcher, signature = self._running()
        bound = (
            self.max_in_flight
            if max_in_flight is None
            else _positive("max_in_flight", max_in_flight)
        )
        window: deque[tuple[Future, list[Future]]] = deque()
        in_flight = 0
        iterator = iter(batches)
        try:
            while True:
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                except BaseException:
                    while window:  # answer everything before the failure, then re-raise
                        yield window.popleft()[0].result()
                    raise
                try:
                    arrays, rows = sharding.prepare(batch, signature, check_finite)
                except (ValueError, TypeError):
                    while window:
                        yield window.popleft()[0].result()
                    raise
                future, parts = self._dispatch(dispatcher, signature, arrays, rows, shard_size)
                window.append((future, parts))
                in_flight += len(parts)
                while in_flight >= bound and window:
                    future, parts = window.popleft()
                    in_flight -= len(parts)
                    yield future.result()
            while window:
                yield window.popleft()[0].result()
        finally:  # the consumer stopped early or something failed: drop what was not asked for
            for _, parts in window:
                for part in parts:
                    part.cancel()

    def map_batches(
        self,
        batches: Iterable[Any],
        *,
        columns: etl.Columns = None,
        output_column: etl.OutputColumns = None,
        shard_size: int | None = None,
        max_in_flight: int | None = None,
        progress: bool = False,
        total: int | None = None,
    ) -> Iterator[Any]:
        """Yield each pandas DataFrame / pyarrow RecordBatch of ``batches`` with its predictions
        added as new columns, in input order and in bounded memory (see
        :func:`pool.etl.map_batches` and docs/etl.md)."""
        return etl.map_batches(
            self,
            batches,
            columns=columns,
            output_column=output_column,
            shard_size=shard_size,
            max_in_flight=max_in_flight,
            progress=progress,
            total=total,
        )

    def _dispatch(
        self,
        dispatcher: Dispatcher,
        signature: SignatureInfo,
        arrays: sharding.Inputs,
        rows: int,
        shard_size: int | None,
    ) -> tuple[Future, list[Future]]:
        """Submit the shards of one call; return its combined future and the shards' futures."""
        if rows == 0:
            empty = sharding.empty_outputs(signature)
            if empty is not None:
                future: Future = Future()
                future.set_result(sharding.unwrap(empty, signature))
                return future, []
        size = shard_size or self.shard_size
        size = (
            _positive("shard_size", size)
            if size
            else sharding.auto_shard_size(arrays, rows, self.workers)
        )
        bounds = sharding.split(rows, size) or [(0, 0)]
        parts = [
            dispatcher.submit(ShardRequest(a, b, sharding.take(arrays, a, b))) for a, b in bounds
        ]
        return _combine(parts, signature), parts

    # --- insight ---------------------------------------------------------------------------
    def stats(self) -> list[WorkerStats]:
        """One record per worker: pid, load_seconds, loads, shards, rows, busy_seconds,
        rss_bytes, restarts, retries, cpus (a snapshot; the pool keeps counting).

        After shutdown, the final counts (with ``rss_bytes`` 0) stay available."""
        dispatcher = self._dispatcher
        if dispatcher is None:
            if not self._final_stats:
                self._running()  # raises: never started
            return [replace(s) for s in self._final_stats]
        records = []
        for slot in dispatcher.slots:
            record = replace(slot.process.stats)
            record.rss_bytes = slot.process.rss_bytes()
            records.append(record)
        return records

    def worker_pids(self) -> list[int]:
        """The pids of every live worker process."""
        dispatcher, _ = self._running()
        return [pid for slot in dispatcher.slots for pid in slot.process.pids()]

    @property
    def ready_info(self) -> list[WorkerReady]:
        """What each worker reported when the pool started (threads, CPUs, load time)."""
        return list(self._ready)


def _combine(parts: list[Future], signature: SignatureInfo) -> Future:
    """A future for the whole call: the shards' outputs gathered in order, or the first error.

    Each shard future's callback refers to the list of shard futures; the list is emptied when
    the call completes, which breaks that reference cycle so the shards' outputs are freed at
    once rather than at the next garbage collection (it matters when streaming)."""
    combined: Future = Future()
    combined.set_running_or_notify_cancel()
    pending = list(parts)
    remaining = [len(parts)]
    lock = threading.Lock()

    def finish() -> list[Future]:
        with lock:
            if combined.done() or not pending:
                return []
            taken = pending[:]
            pending.clear()
            return taken

    def on_part_done(part: Future) -> None:
        if part.cancelled() or part.exception() is not None:
            others = finish()
            if not others:
                return
            combined.set_exception(
                PoolClosedError("a shard of this call was cancelled")
                if part.cancelled()
                else part.exception()
            )
            for other in others:
                other.cancel()
            return
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if not last:
            return
        done = finish()
        if not done:
            return
        try:
            result = sharding.unwrap(sharding.gather([p.result() for p in done]), signature)
        except Exception as exc:
            combined.set_exception(exc)
            return
        combined.set_result(result)

    for part in parts:
        part.add_done_callback(on_part_done)
    return combined


def _positive(name: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value
