"""``PredictionPool``: the pool's lifecycle and its public methods.

Options are validated once into a :class:`pool.backend.Settings`; start-up hands them to a
backend (:class:`pool.local.LocalBackend`, or the Dask backend with ``cluster=``) that loads
the model in every worker at once and returns when all are warm. Calls are validated and
split into shards here, answered by the backend, and gathered back in input order. This
module never imports TensorFlow.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import pickle
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, InvalidStateError, wait
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np

from . import sharding
from .backend import Backend, Batching, Limits, Settings, positive
from .errors import PoolClosedError, PoolError
from .futures import CALLBACKS, PoolFuture
from .messages import ShardRequest, SignatureInfo, WorkerReady, WorkerStats
from .process import allowed_cpus, bootstrapping_worker, default_workers, make_context
from .runtimes.resolve import check_options as check_runtime_options

log = logging.getLogger("pool")

#: ``shutdown()`` waits at most this long for callers' done-callbacks to finish running.
CALLBACK_FLUSH_SECONDS = 30.0

Model = str | os.PathLike | Callable[[], Callable]
Prediction = np.ndarray | dict[str, np.ndarray]
#: ``imap(progress=)``: ``False``, ``True`` (a tqdm bar) or a callable taking a row count.
Progress = bool | Callable[[int], Any]


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
        max_batch_rows: int = 256,
        max_batch_bytes: int = 4 << 20,
        batch_timeout_micros: int = 0,
        max_queued_requests: int | None = None,
        cluster: Any = None,
        runtime: str = "tensorflow",
        precision: str = "f32",
        runtime_tolerance: float | None = None,
        runtime_sample: Any = None,
    ) -> None:
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        if not isinstance(model, str) and not callable(model):
            raise TypeError(
                "model must be a SavedModel path, a TF Hub handle or a factory callable, "
                f"got {type(model).__name__}"
            )
        cpus = allowed_cpus() if cluster is None else None
        if pin_cpus and cluster is not None:
            raise ValueError(
                "pin_cpus does not apply with cluster=: Dask workers are placed by the cluster"
            )
        if pin_cpus and cpus is None:
            raise ValueError("pin_cpus=True, but this OS has no CPU affinity API (e.g. macOS)")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if isinstance(batch_timeout_micros, bool) or not isinstance(batch_timeout_micros, int):
            raise ValueError(
                f"batch_timeout_micros must be an int >= 0, got {batch_timeout_micros!r}"
            )
        if batch_timeout_micros < 0:
            raise ValueError(
                f"batch_timeout_micros must be an int >= 0, got {batch_timeout_micros!r}"
            )
        check_runtime_options(runtime, precision, runtime_tolerance)
        workers = None if workers is None else positive("workers", workers)
        if workers is None and cluster is None:
            workers = default_workers()
        if cluster is None:
            check_factory(model)
            warn_oversubscribed(workers or 1, threads_per_worker, cpus)
        self._settings = Settings(
            model=model,
            workers=workers or 0,
            signature=signature,
            output=output,
            threads_per_worker=positive("threads_per_worker", threads_per_worker),
            inter_op_threads=positive("inter_op_threads", inter_op_threads),
            pin_cpus=(cpus is not None if pin_cpus is None else bool(pin_cpus))
            and cpus is not None,
            allowed_cpus=None if cpus is None else tuple(cpus),
            shard_size=None if shard_size is None else positive("shard_size", shard_size),
            start_method=make_context(start_method).get_start_method()
            if cluster is None
            else start_method,
            start_timeout=start_timeout,
            limits=Limits(
                max_retries=max_retries,
                timeout=None if timeout is None else positive("timeout", timeout),
                max_worker_memory=None
                if max_worker_memory is None
                else positive("max_worker_memory", max_worker_memory),
                max_shards_per_worker=None
                if max_shards_per_worker is None
                else positive("max_shards_per_worker", max_shards_per_worker),
            ),
            batching=Batching(
                max_batch_rows=positive("max_batch_rows", max_batch_rows),
                max_batch_bytes=positive("max_batch_bytes", max_batch_bytes),
                batch_timeout_micros=batch_timeout_micros,
                max_queued_requests=None
                if max_queued_requests is None
                else positive("max_queued_requests", max_queued_requests),
            ),
            runtime=runtime,
            precision=precision,
            runtime_tolerance=runtime_tolerance,
            runtime_sample=runtime_sample,
        )
        self._cluster = cluster
        self._max_in_flight = (
            None if max_in_flight is None else positive("max_in_flight", max_in_flight)
        )
        self._backend: Backend | None = None
        self._signature: SignatureInfo | None = None
        self._ready: list[WorkerReady] = []
        self._final_stats: list[WorkerStats] = []
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None
        self.startup_seconds: float | None = None

    # --- options, as validated ---------------------------------------------------------------
    @property
    def workers(self) -> int:
        """Worker processes (for a cluster: the Dask workers when the pool started)."""
        return self._settings.workers or len(self._ready)

    @property
    def shard_size(self) -> int | None:
        return self._settings.shard_size

    @property
    def max_in_flight(self) -> int:
        return self._max_in_flight or 4 * max(1, self.workers)

    @property
    def start_method(self) -> str | None:
        """How worker processes start: ``forkserver``/``spawn`` as asked (``spawn`` for the
        workers of a converted ``runtime=``, once started), ``None`` on a cluster."""
        info = self.runtime_info() if self._backend is not None and self._cluster is None else {}
        method = info.get("start_method") or self._settings.start_method
        return None if method is None else str(method)

    @property
    def pin_cpus(self) -> bool:
        return self._settings.pin_cpus

    @property
    def threads_per_worker(self) -> int:
        return self._settings.threads_per_worker

    @property
    def signature_name(self) -> str:
        return self._settings.signature

    @property
    def model(self) -> str | Callable[[], Callable]:
        """The model as given: a SavedModel directory, a TF Hub handle or a factory."""
        return self._settings.model

    @property
    def output(self) -> str | None:
        return self._settings.output

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> PredictionPool:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.shutdown(kill=exc_type is not None)

    def start(self) -> PredictionPool:
        """Start every worker, load the model in all of them at once, and warm them up."""
        if bootstrapping_worker():
            # A script without the __main__ guard, re-imported by a worker: end the worker
            # quietly (no multiprocessing traceback); the parent's start() raises
            # ModelLoadError naming the guard.
            raise SystemExit(1)
        with self._lock:
            if self._backend is not None:
                return self
            started = time.perf_counter()
            backend = self._new_backend()
            self._ready = backend.start()  # on failure the backend has stopped its workers
            if len({r.signature for r in self._ready}) != 1:
                backend.shutdown(kill=True)
                from .errors import ModelLoadError

                raise ModelLoadError("workers loaded models with different signatures")
            self._signature = self._ready[0].signature
            self._backend = backend
            # Dropped without shutdown(): the workers drain and stop on their own. (At
            # interpreter exit the dispatcher's own hook kills them, before multiprocessing's.)
            self._finalizer = weakref.finalize(self, _abandon, backend)
            self._finalizer.atexit = False
            self.startup_seconds = time.perf_counter() - started
            log.info(
                "pool started: %d workers (%s, %s, %d intra-op threads each) in %.2f s",
                len(self._ready),
                self.start_method if self._cluster is None else "cluster",
                self._ready[0].runtime,
                self._ready[0].intra_op_threads,
                self.startup_seconds,
            )
            return self

    def _new_backend(self) -> Backend:
        if self._cluster is None:
            from .local import LocalBackend

            return LocalBackend(self._settings)
        # The cluster backend is an optional edge (``pip install 'prediction-pool[dask]'``):
        # named only here, imported only when asked for, never by ``import pool``.
        cluster = importlib.import_module("pool.cluster")
        return cluster.DaskBackend(self._settings, self._cluster)

    def shutdown(self, kill: bool = False) -> None:
        """Stop all workers. Waits for queued shards unless ``kill``; idempotent."""
        with self._lock:
            backend, self._backend = self._backend, None
            if backend is None:
                return
            if self._finalizer is not None:
                self._finalizer.detach()
            try:
                backend.shutdown(kill=kill)
            finally:
                try:
                    self._final_stats = [_without_rss(s) for s in backend.stats()]
                except PoolError:  # a forked child: the workers are its parent's
                    self._final_stats = []
            # Callers' callbacks of the calls just answered or failed have run when this returns
            # (unless one blocks: then after CALLBACK_FLUSH_SECONDS, shutdown returns anyway).
            waits = not kill and not CALLBACKS.in_thread()  # a callback cannot wait for itself
            if waits and not CALLBACKS.flush(CALLBACK_FLUSH_SECONDS):
                log.warning("shutdown: done-callbacks still running; not waiting for them")
            log.info("pool shut down%s", " (workers killed)" if kill else "")

    close = shutdown

    # --- calls -----------------------------------------------------------------------------
    @property
    def signature(self) -> SignatureInfo:
        """The model's inputs and outputs as the workers loaded them."""
        return self._running()[1]

    def _running(self) -> tuple[Backend, SignatureInfo]:
        backend, signature = self._backend, self._signature
        if backend is None or signature is None:
            raise PoolClosedError(
                "the pool is not running: use `with PredictionPool(...) as pool:` or call start()"
            )
        return backend, signature

    def predict(
        self,
        inputs: Any,
        *,
        shard_size: int | None = None,
        check_finite: bool = False,
    ) -> Prediction:
        """Answer every row of ``inputs``; row ``i`` of the result answers input row ``i``.

        ``inputs``: an array (single-input signature), a dict of arrays (several inputs), or a
        list/array of ``str``/``bytes`` (``tf.string`` input). ``check_finite`` refuses NaN and
        infinity in floating-point inputs before anything is dispatched. Data frames and Arrow
        tables go through :func:`pool.etl.predict` (docs/etl.md).
        """
        return self.submit(inputs, shard_size=shard_size, check_finite=check_finite).result()

    def submit(
        self,
        inputs: Any,
        *,
        shard_size: int | None = None,
        check_finite: bool = False,
    ) -> Future:
        """Like :meth:`predict`, but return a ``concurrent.futures.Future`` at once."""
        backend, signature = self._running()
        arrays, rows = sharding.prepare(inputs, signature, check_finite)
        return self._dispatch(backend, signature, arrays, rows, shard_size)[0]

    # --- asyncio ---------------------------------------------------------------------------
    def asubmit(
        self,
        inputs: Any,
        *,
        shard_size: int | None = None,
        check_finite: bool = False,
    ) -> asyncio.Future[Prediction]:
        """Like :meth:`submit`, but return an ``asyncio.Future`` of the running event loop.

        Call it from a coroutine. The inputs are validated and queued at once (bad inputs
        raise ``ValueError``/``TypeError`` here, a full queue ``QueueFullError``); awaiting the
        future gives the result or raises the call's error. Cancelling it (or the task
        awaiting it, e.g. through ``asyncio.wait_for``) cancels the call: its shards still
        waiting for a worker are dropped from the queue; shards a worker has taken finish.
        The event loop never blocks: the dispatcher thread completes the call and the loop is
        woken once, with the result."""
        loop = asyncio.get_running_loop()
        call = self.submit(inputs, shard_size=shard_size, check_finite=check_finite)
        return _CallWaiter(call, loop)

    async def apredict(
        self,
        inputs: Any,
        *,
        shard_size: int | None = None,
        check_finite: bool = False,
    ) -> Prediction:
        """``await pool.apredict(inputs)``: :meth:`predict` for asyncio code (a FastAPI or
        Starlette handler, for example); concurrent awaits are combined into model calls like
        concurrent ``submit`` calls. Cancelling the awaiting task (a client gone,
        ``asyncio.wait_for``'s timeout) drops the call's shards still waiting for a worker;
        errors are raised as :meth:`predict` raises them."""
        return await self.asubmit(inputs, shard_size=shard_size, check_finite=check_finite)

    def imap(
        self,
        batches: Iterable[Any],
        *,
        shard_size: int | None = None,
        max_in_flight: int | None = None,
        check_finite: bool = False,
        progress: Progress = False,
    ) -> Iterator[Prediction]:
        """Predict each batch of ``batches``, yielding results in input order.

        At most ``max_in_flight`` shards are submitted ahead of the one being yielded (a batch
        is never split across that bound), so an endless generator runs in flat memory. If the
        iterable or one of its batches raises, every earlier result is yielded first.
        ``progress``: ``True`` for a tqdm bar counting rows on stderr (when it is a terminal
        and tqdm is installed), or a callable called with each result's row count as it is
        yielded (``tqdm(total=n).update``, a logger...).
        """
        results = self._imap_ordered(batches, shard_size, max_in_flight, check_finite)
        yield from _counted(results, progress, lambda result: result)

    def imap_unordered(
        self,
        batches: Iterable[Any],
        *,
        shard_size: int | None = None,
        max_in_flight: int | None = None,
        check_finite: bool = False,
        progress: Progress = False,
    ) -> Iterator[tuple[int, Prediction]]:
        """Predict each batch of ``batches``, yielding ``(index, result)`` as each batch is
        answered: ``index`` is the batch's position in ``batches`` (0-based), so a caller can
        reorder or write results where they belong. A slow batch holds back none of the others.

        Memory is bounded as in :meth:`imap`: at most ``max_in_flight`` shards are submitted
        and not yet yielded (a batch is never split across that bound). If the iterable or
        one of its batches raises, every batch submitted before is answered and yielded first;
        if the model fails on a batch, its error is raised when that batch is answered and
        the batches still waiting are cancelled. ``progress`` as in :meth:`imap`.
        """
        results = self._imap_unordered(batches, shard_size, max_in_flight, check_finite)
        yield from _counted(results, progress, lambda pair: pair[1])

    def _imap_unordered(
        self,
        batches: Iterable[Any],
        shard_size: int | None,
        max_in_flight: int | None,
        check_finite: bool,
    ) -> Iterator[tuple[int, Prediction]]:
        backend, signature = self._running()
        bound = (
            self.max_in_flight
            if max_in_flight is None
            else positive("max_in_flight", max_in_flight)
        )
        pending: dict[Future, tuple[int, list[Future]]] = {}
        in_flight = 0
        iterator = iter(batches)
        index = 0
        failure: BaseException | None = None
        exhausted = False
        try:
            while True:
                while not exhausted and failure is None and (in_flight < bound or not pending):
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        exhausted = True
                        break
                    except BaseException as exc:  # answer what was submitted, then re-raise
                        failure = exc
                        break
                    try:
                        arrays, rows = sharding.prepare(batch, signature, check_finite)
                    except (ValueError, TypeError) as exc:
                        failure = exc
                        break
                    future, parts = self._dispatch(
                        backend, signature, arrays, rows, shard_size, bounded=False
                    )
                    pending[future] = (index, parts)
                    in_flight += len(parts)
                    index += 1
                if not pending:
                    break
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: pending[f][0]):
                    position, parts = pending.pop(future)
                    in_flight -= len(parts)
                    yield position, future.result()
            if failure is not None:
                raise failure
        finally:  # the consumer stopped early or something failed: drop what was not asked for
            for _, parts in pending.values():
                for part in parts:
                    part.cancel()

    def _imap_ordered(
        self,
        batches: Iterable[Any],
        shard_size: int | None,
        max_in_flight: int | None,
        check_finite: bool,
    ) -> Iterator[Prediction]:
        backend, signature = self._running()
        bound = (
            self.max_in_flight
            if max_in_flight is None
            else positive("max_in_flight", max_in_flight)
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
                future, parts = self._dispatch(
                    backend, signature, arrays, rows, shard_size, bounded=False
                )
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

    def _dispatch(
        self,
        backend: Backend,
        signature: SignatureInfo,
        arrays: sharding.Inputs,
        rows: int,
        shard_size: int | None,
        bounded: bool = True,
    ) -> tuple[Future, list[Future]]:
        """Submit the shards of one call; return its combined future and the shards' futures."""
        if rows == 0:
            empty = sharding.empty_outputs(signature)
            if empty is not None:
                future: Future = PoolFuture()
                future.set_result(sharding.unwrap(empty, signature))
                return future, []
        size = shard_size or self.shard_size
        size = (
            positive("shard_size", size)
            if size
            else sharding.auto_shard_size(arrays, rows, self.workers)
        )
        bounds = sharding.split(rows, size) or [(0, 0)]
        shards = [ShardRequest(a, b, sharding.take(arrays, a, b)) for a, b in bounds]
        if len(shards) == 1:  # the shard's future is the call's: no second future to chain
            parts = backend.submit(shards, bounded, partial(sharding.unwrap, signature=signature))
            return parts[0], parts
        parts = backend.submit(shards, bounded)
        return _combine(parts, signature), parts

    # --- insight ---------------------------------------------------------------------------
    def stats(self) -> list[WorkerStats]:
        """One record per worker: pid, load_seconds, loads, shards, batches, rows,
        busy_seconds, rss_bytes, restarts, retries, cpus (a snapshot; the pool keeps counting).

        After shutdown, the final counts (with ``rss_bytes`` 0) stay available."""
        backend = self._backend
        if backend is None:
            if not self._final_stats:
                self._running()  # raises: never started
            return [replace(s) for s in self._final_stats]
        return backend.stats()

    def worker_pids(self) -> list[int]:
        """The pids of every live worker process."""
        backend, _ = self._running()
        return backend.worker_pids()

    def queued_requests(self) -> int:
        """Calls with shards still waiting for a worker (what ``max_queued_requests`` bounds)."""
        backend, _ = self._running()
        return backend.queued_requests()

    def transport_info(self) -> dict[str, Any]:
        """How batches reached the workers: ``arena_bytes`` (each worker's shared-memory arena;
        0 where the socket carries everything), ``batches_in_arena``, ``batches_on_socket``, and
        ``copies_per_shard`` (user-space copies of a shard's data there and back, averaged over
        those batches: 3 through the arena, 6 through the socket; ``None`` before any batch;
        the snapshot of the inputs made when a call is accepted is not counted).
        Empty for a backend that does not say (a cluster)."""
        backend, _ = self._running()
        info = getattr(backend, "transport_info", None)
        return info() if info is not None else {}

    def runtime_info(self) -> dict[str, Any]:
        """What runs the model: ``runtime`` (never ``"auto"``), ``requested``, and for a converted
        runtime its ``artifact``, ``precision``, the measured ``differences`` to TensorFlow per
        output (``max_abs``, ``max_rel``, ``scale``) and the ``tolerance``; with ``"auto"`` the
        ``timings_rows_per_second`` it chose by, or the ``fallback`` reason (docs/runtimes.md)."""
        backend, _ = self._running()
        info = getattr(backend, "runtime_info", None)
        return info() if info is not None else {"runtime": "tensorflow"}

    @property
    def backend(self) -> Backend:
        """The running backend (``pool.local.LocalBackend``, or ``pool.cluster.DaskBackend``
        with ``cluster=``): what the package's edges build on. Raises ``PoolClosedError`` when
        the pool is not running."""
        return self._running()[0]

    @property
    def ready_info(self) -> list[WorkerReady]:
        """What each worker reported when the pool started (threads, CPUs, load time)."""
        return list(self._ready)


def _abandon(backend: Backend) -> None:
    """A started pool was garbage-collected without ``shutdown()``."""
    abandon = getattr(backend, "abandon", None)
    if abandon is not None:
        abandon()


def _without_rss(stats: WorkerStats) -> WorkerStats:
    return replace(stats, rss_bytes=0)


class CallFuture(PoolFuture):
    """The future of one call. ``cancel()`` drops the call's shards that wait in the queue
    (they never run) and succeeds if there was one; when every shard has already reached a
    worker, the call is running and ``cancel()`` returns ``False``, as for any ``Future``."""

    def __init__(self, parts: list[Future]) -> None:
        super().__init__()
        self.parts = parts
        self.cancelling = False

    def cancel(self) -> bool:
        if self.done():
            return super().cancel()
        self.cancelling = True
        dropped = [p for p in reversed(self.parts) if p.cancel() or p.cancelled()]
        self.cancelling = False
        return super().cancel() if dropped else False


class _CallWaiter(asyncio.Future):
    """The asyncio side of one call (what :meth:`PredictionPool.asubmit` returns): completed on
    its event loop with the call's result or error, from the thread that completes the call,
    with one wake-up of the loop. Cancelling it (the awaiting task cancelled, ``wait_for``'s
    timeout) cancels the call. Leaner than ``asyncio.wrap_future``: no callback on this side
    (cancel is overridden), an inline callback on the pool's side."""

    def __init__(self, call: Future, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._call = call

        def settle(_: Future) -> None:  # quick, never blocks, never raises
            try:
                loop.call_soon_threadsafe(self._settle)
            except RuntimeError:  # the loop is closed: nobody waits for the answer any more
                pass

        if isinstance(call, PoolFuture):
            call.add_inline_callback(settle)
        else:  # a plain Future runs its callbacks in the completing thread as well
            call.add_done_callback(settle)

    def _settle(self) -> None:
        if self.done():  # cancelled meanwhile
            return
        call = self._call
        if call.cancelled():
            super().cancel()
            return
        error = call.exception()
        if error is not None:
            self.set_exception(error)
        else:
            self.set_result(call.result())

    def cancel(self, msg: Any = None) -> bool:
        if self.done():
            return False
        self._call.cancel()  # drops the call's shards still waiting for a worker
        return super().cancel(msg)


def rows_of(result: Prediction) -> int:
    """The rows of one result: its length, or the length of its first output."""
    if isinstance(result, dict):
        return len(next(iter(result.values()))) if result else 0
    return len(result)


def _counted(
    results: Iterator[Any], progress: Progress, prediction: Callable[[Any], Prediction]
) -> Iterator[Any]:
    """Yield ``results``, reporting each one's rows to ``progress`` (see :meth:`imap`)."""
    if progress is False or progress is None:
        yield from results
        return
    bar: Any = None
    if progress is True:
        try:
            from tqdm import tqdm  # optional: the ``etl`` extra, or ``pip install tqdm``
        except ImportError:
            log.warning(
                "progress=True needs tqdm (pip install tqdm, or 'prediction-pool[etl]'); "
                "showing no progress"
            )
            yield from results
            return
        bar = tqdm(unit=" rows", unit_scale=True, disable=None, mininterval=0.5)
        update: Callable[[int], Any] = bar.update
    elif callable(progress):
        update = progress
    else:
        raise TypeError(
            f"progress must be a bool or a callable taking a row count, got {progress!r}"
        )
    try:
        for item in results:
            update(rows_of(prediction(item)))
            yield item
    finally:
        if bar is not None:
            bar.close()


def check_factory(model: Any) -> None:
    """A factory must reach the workers by pickle: refuse one that cannot (a lambda, a function
    defined inside another), naming the fix, before any worker starts."""
    if isinstance(model, str):
        return
    try:
        pickle.dumps(model)
    except Exception as exc:  # PicklingError, AttributeError ("Can't pickle local object")
        raise TypeError(
            f"the model factory {model!r} cannot be sent to the worker processes "
            f"({type(exc).__name__}: {exc}): use a function defined at the top level of a "
            "module (or functools.partial of one), not a lambda or a nested function"
        ) from None


def warn_oversubscribed(workers: int, threads_per_worker: Any, cpus: list[int] | None) -> None:
    """Log a warning when ``workers × threads_per_worker`` exceeds the CPUs this process may
    use: the workers then compete for cores and each model call gets slower."""
    available = len(cpus) if cpus else (os.cpu_count() or 1)
    if not isinstance(threads_per_worker, int) or workers * threads_per_worker <= available:
        return
    log.warning(
        "workers=%d x threads_per_worker=%d = %d threads on %d CPU(s): the workers will compete "
        "for cores and run slower; keep workers x threads_per_worker <= CPUs (docs/guide.md)",
        workers,
        threads_per_worker,
        workers * threads_per_worker,
        available,
    )


def _combine(parts: list[Future], signature: SignatureInfo) -> Future:
    """A future for the whole call: the shards' outputs gathered in order, or the first error.

    Cancelling it cancels the shards still waiting in the queue (they are dropped, never run).
    No reference cycle outlives the call, so its inputs and outputs are freed at once rather than
    at the next garbage collection (it matters when streaming): each shard future's callback
    refers to the list of shard futures, which is emptied when the call completes, and the
    combined future's own callback refers to it only as its argument. These callbacks are the
    pool's own: they run inline (on the dispatcher); a caller's callbacks on the combined future
    are handed to the callback thread (:mod:`pool.futures`)."""
    combined = CallFuture(parts)
    pending = list(parts)
    remaining = [len(parts)]
    lock = threading.Lock()

    def finish(call: CallFuture, cancelling: bool = False) -> list[Future]:
        with lock:
            if (call.done() and not cancelling) or not pending:
                return []
            taken = pending[:]
            pending.clear()
            call.parts = []
            return taken

    def settle(result: Any = None, exc: BaseException | None = None) -> None:
        try:
            if exc is not None:
                combined.set_exception(exc)
            else:
                combined.set_result(result)
        except InvalidStateError:  # the caller cancelled the call meanwhile
            pass

    def on_part_done(part: Future) -> None:
        if part.cancelled() and combined.cancelling:
            return  # the caller is cancelling the whole call
        if part.cancelled() or part.exception() is not None:
            others = finish(combined)
            if not others:
                return
            settle(
                exc=PoolClosedError("a shard of this call was cancelled")
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
        done = finish(combined)
        if not done:
            return
        try:
            result = sharding.unwrap(sharding.gather([p.result() for p in done]), signature)
        except Exception as exc:
            settle(exc=exc)
            return
        settle(result)

    def on_combined_done(future: Any) -> None:  # refers to the call only as its argument
        if future.cancelled():
            finish(future, cancelling=True)

    combined.add_inline_callback(on_combined_done)
    for part in parts:
        if isinstance(part, PoolFuture):
            part.add_inline_callback(on_part_done)
        else:  # a backend's plain Future (the cluster's)
            part.add_done_callback(on_part_done)
    return combined
