"""``PredictionPool``: the pool's lifecycle and its public methods.

Options are validated once into a :class:`pool.backend.Settings`; start-up hands them to a
backend (:class:`pool.local.LocalBackend`, or the Dask backend with ``cluster=``) that loads
the model in every worker at once and returns when all are warm. Calls are validated and
split into shards here, answered by the backend, and gathered back in input order. This
module never imports TensorFlow.
"""

from __future__ import annotations

import asyncio
import enum
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
from .backend import Backend, Batching, Limits, Settings, model_name, positive
from .errors import ModelLoadError, PoolClosedError, PoolError
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


class _Keep(enum.Enum):
    """``reload()``'s default for options that may be ``None``: as the pool has it."""

    KEEP = "keep"


KEEP = _Keep.KEEP


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
        model = _model_ref(model)
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
        # What callers validate against and submit to, swapped in one assignment by reload():
        # a call reads both at once, so it is validated against the model that answers it.
        self._live: tuple[Backend, SignatureInfo] | None = None
        #: The model generation serving calls: 1 at start, +1 per successful reload().
        self._generation = 1
        # Other generations resident while a reload runs (the one loading, the one draining),
        # each with its generation number and model, for stats() and shutdown().
        self._resident: dict[Backend, tuple[int, Model]] = {}
        self._reloading = threading.Lock()
        self._reload_started: tuple[float, str] | None = None
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
        """The model as given: a SavedModel directory, a TF Hub handle or a factory; after a
        :meth:`reload`, the model that calls now go to."""
        return self._settings.model

    @property
    def generation(self) -> int:
        """Which model generation answers new calls: 1 for the model the pool started with,
        one more per successful :meth:`reload` (``stats()`` says it per worker)."""
        return self._generation

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
                raise ModelLoadError("workers loaded models with different signatures")
            self._signature = self._ready[0].signature
            self._backend = backend
            self._live = (backend, self._signature)
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
            self._live = None
            if self._finalizer is not None:
                self._finalizer.detach()
            try:
                # A reload's generations: the one loading is killed (its reload() raises
                # PoolClosedError), the one draining drains (or is killed) like this one.
                for other in list(self._resident):
                    other.shutdown(kill=kill)
                backend.shutdown(kill=kill)
            finally:
                try:
                    self._final_stats = [
                        _without_rss(s)
                        for s in _labelled(backend.stats(), self._generation, self.model)
                    ]
                except PoolError:  # a forked child: the workers are its parent's
                    self._final_stats = []
            # Callers' callbacks of the calls just answered or failed have run when this returns
            # (unless one blocks: then after CALLBACK_FLUSH_SECONDS, shutdown returns anyway).
            waits = not kill and not CALLBACKS.in_thread()  # a callback cannot wait for itself
            if waits and not CALLBACKS.flush(CALLBACK_FLUSH_SECONDS):
                log.warning("shutdown: done-callbacks still running; not waiting for them")
            log.info("pool shut down%s", " (workers killed)" if kill else "")

    close = shutdown

    # --- reload ----------------------------------------------------------------------------
    def reload(
        self,
        model: Model,
        *,
        signature: str | None = None,
        output: str | None | _Keep = KEEP,
        runtime: str | None = None,
        precision: str | None = None,
        runtime_tolerance: float | None | _Keep = KEEP,
        runtime_sample: Any = KEEP,
        allow_signature_change: bool = False,
        timeout: float | None | _Keep = KEEP,
    ) -> int:
        """Swap the model without dropping a call; return the new generation number.

        ``model`` is what the constructor takes (a SavedModel path, a TF Hub handle or a
        factory). ``signature``, ``output``, ``runtime``, ``precision``, ``runtime_tolerance``
        and ``runtime_sample`` may change with it (left out: as the pool has them); every
        other option (workers, threads, batching, limits) stays. Checked here, in the caller,
        before any worker starts, as the constructor checks them.

        A new generation of workers (as many as the pool has, pinned to the same CPUs) loads
        the new model while the old ones keep answering; once *every* new worker is ready,
        new calls go to the new generation, all at once. Calls already accepted by the old
        generation (queued or running) are answered there: a call is answered by exactly one
        model. Then the old workers drain, stop and are reaped, and ``reload`` returns.

        If the new model fails to load in any worker (or its runtime conversion or
        verification fails, or it is not ready within ``timeout`` seconds, by default the
        pool's ``start_timeout``), ``ModelLoadError`` names the model and the reason; the old
        model keeps serving and nothing of the failed generation is left. A new model whose
        signature (inputs, dtypes, shapes, outputs) differs from the serving one is refused
        the same way unless ``allow_signature_change=True``: then calls are validated against
        the new signature from the moment traffic moves.

        Only one reload runs at a time: another one meanwhile raises ``PoolError``.
        ``shutdown()`` during a reload kills the generation loading (``reload`` raises
        ``PoolClosedError``); ``reload`` of a pool not running raises ``PoolClosedError``.
        A cluster pool (``cluster=``) cannot reload: ``NotImplementedError``."""
        if self._cluster is not None:
            raise NotImplementedError(
                "reload() is not implemented for a cluster pool (cluster=...): start a new "
                "PredictionPool(new_model, cluster=...) and shut this one down once it has "
                "started (docs/guide.md, 'Swapping the model: reload')"
            )
        model = _model_ref(model)
        current = self._settings
        runtime = current.runtime if runtime is None else runtime
        precision = current.precision if precision is None else precision
        tolerance = (
            current.runtime_tolerance
            if isinstance(runtime_tolerance, _Keep)
            else (runtime_tolerance)
        )
        check_runtime_options(runtime, precision, tolerance)
        if not isinstance(allow_signature_change, bool):
            raise TypeError(
                f"allow_signature_change must be True or False, got {allow_signature_change!r}"
            )
        load_timeout = (
            current.start_timeout
            if isinstance(timeout, _Keep)
            else None
            if timeout is None
            else positive("timeout", timeout)
        )
        check_factory(model)
        settings = replace(
            current,
            model=model,
            signature=current.signature if signature is None else signature,
            output=current.output if isinstance(output, _Keep) else output,
            runtime=runtime,
            precision=precision,
            runtime_tolerance=tolerance,
            runtime_sample=current.runtime_sample
            if isinstance(runtime_sample, _Keep)
            else runtime_sample,
        )
        if not self._reloading.acquire(blocking=False):
            since, given = self._reload_started or (time.monotonic(), "?")
            raise PoolError(
                f"reload({sharding.describe_model(model)}) called while reload({given}) is "
                f"still running (for {time.monotonic() - since:.1f} s); expected one reload at "
                "a time: wait for the first to return"
            )
        try:
            self._reload_started = (time.monotonic(), sharding.describe_model(model))
            return self._reload(settings, load_timeout, allow_signature_change)
        finally:
            self._reload_started = None
            self._reloading.release()

    def _reload(
        self, settings: Settings, timeout: float | None, allow_signature_change: bool
    ) -> int:
        from .local import LocalBackend

        with self._lock:
            old, old_signature = self._running()  # PoolClosedError after shutdown
            old.queued_requests()  # PoolClosedError in a child made with os.fork()
            old_generation, old_model = self._generation, self._settings.model
            generation = old_generation + 1
            new = LocalBackend(replace(settings, start_timeout=timeout))
            self._resident[new] = (generation, settings.model)
        name = sharding.describe_model(settings.model)
        serving = f"{sharding.describe_model(old_model)} (generation {old_generation})"
        started = time.perf_counter()
        log.info("reload: generation %d loading %s while %s serves", generation, name, serving)
        try:
            try:
                ready = new.start()  # raises with the workers of the new generation stopped
            except ModelLoadError as exc:
                reason = str(exc)
                if reason.startswith("workers did not load the model within"):
                    reason = f"its workers did not load it within timeout={timeout} s"
                raise ModelLoadError(
                    f"reload to {name} failed, {serving} keeps serving: {reason}"
                ) from None
            signatures = {r.signature for r in ready}
            if len(signatures) != 1:
                raise ModelLoadError(
                    f"reload to {name} failed, {serving} keeps serving: its workers loaded "
                    "models with different signatures"
                )
            (signature,) = signatures
            if signature != old_signature and not allow_signature_change:
                raise ModelLoadError(
                    f"reload to {name} refused, {serving} keeps serving: its signature differs "
                    f"from the serving model's; expected inputs {old_signature.describe_inputs()} "
                    f"and outputs {_describe_outputs(old_signature)}, got inputs "
                    f"{signature.describe_inputs()} and outputs {_describe_outputs(signature)}. "
                    "Pass allow_signature_change=True to switch validation to the new signature "
                    "when traffic moves"
                )
        except BaseException:
            new.shutdown(kill=True)  # idempotent: nothing of the failed generation is left
            with self._lock:
                self._resident.pop(new, None)
            raise
        with self._lock:
            self._resident.pop(new, None)
            if self._backend is not old:  # shut down while it loaded (start() usually sees it)
                new.shutdown(kill=True)
                raise PoolClosedError(
                    f"the pool was shut down while reload() was loading {name}; nothing of it "
                    "was kept"
                )
            # Traffic moves here: one assignment hands callers the new backend and signature.
            self._live = (new, signature)
            self._backend, self._signature = new, signature
            self._settings = replace(settings, start_timeout=self._settings.start_timeout)
            self._generation = generation
            self._ready = ready
            self._resident[old] = (old_generation, old_model)
            if self._finalizer is not None:
                self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _abandon, new)
            self._finalizer.atexit = False
        moved = time.perf_counter() - started
        log.info(
            "reload: traffic moved to generation %d (%s) after %.2f s", generation, name, moved
        )
        try:
            old.shutdown(kill=False)  # answers what it accepted, then stops; reaped
        finally:
            with self._lock:
                self._resident.pop(old, None)
        log.info(
            "reload: generation %d stopped %.2f s after traffic moved",
            old_generation,
            time.perf_counter() - started - moved,
        )
        return generation

    # --- calls -----------------------------------------------------------------------------
    @property
    def signature(self) -> SignatureInfo:
        """The model's inputs and outputs as the workers loaded them."""
        return self._running()[1]

    def _running(self) -> tuple[Backend, SignatureInfo]:
        live = self._live
        if live is None:
            raise PoolClosedError(
                "the pool is not running: use `with PredictionPool(...) as pool:` or call start()"
            )
        return live

    def _submit_validated(
        self,
        inputs: Any,
        check_finite: bool,
        shard_size: int | None,
        bounded: bool = True,
    ) -> tuple[Future, list[Future]]:
        """Validate ``inputs`` against the serving generation's signature and submit them, whole,
        to that generation. If a :meth:`reload` moved traffic in between (the old generation
        refuses: it is draining), the call goes to the new one, validated again against its
        signature when it differs: a call is always answered by the model it was validated for,
        and by one model only."""
        backend, signature = self._running()
        arrays, rows = sharding.prepare(inputs, signature, check_finite)
        while True:
            try:
                return self._dispatch(backend, signature, arrays, rows, shard_size, bounded)
            except PoolClosedError:
                live = self._live
                if live is None or live[0] is backend:
                    raise  # shut down, not reloaded
            backend, previous = live
            if previous != signature:
                signature = previous
                arrays, rows = sharding.prepare(inputs, signature, check_finite)

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
        return self._submit_validated(inputs, check_finite, shard_size)[0]

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
        self._running()
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
                    try:  # each batch goes to the generation serving when it is submitted
                        future, parts = self._submit_validated(
                            batch, check_finite, shard_size, bounded=False
                        )
                    except (ValueError, TypeError) as exc:
                        failure = exc
                        break
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
        self._running()
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
                try:  # each batch goes to the generation serving when it is submitted
                    future, parts = self._submit_validated(
                        batch, check_finite, shard_size, bounded=False
                    )
                except (ValueError, TypeError):
                    while window:
                        yield window.popleft()[0].result()
                    raise
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
        records = _labelled(backend.stats(), self._generation, self.model)
        for other, (generation, model) in list(self._resident.items()):
            records += _labelled(other.stats(), generation, model)
        return records

    def worker_pids(self) -> list[int]:
        """The pids of every live worker process (while a reload runs: of both generations)."""
        backend, _ = self._running()
        return backend.worker_pids() + [
            pid for other in list(self._resident) for pid in other.worker_pids()
        ]

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


def _describe_outputs(signature: SignatureInfo) -> str:
    if signature.outputs is None:
        return "(any: the model declares no output signature)"
    return "{" + ", ".join(t.describe() for t in signature.outputs) + "}"


def _abandon(backend: Backend) -> None:
    """A started pool was garbage-collected without ``shutdown()``."""
    abandon = getattr(backend, "abandon", None)
    if abandon is not None:
        abandon()


def _without_rss(stats: WorkerStats) -> WorkerStats:
    return replace(stats, rss_bytes=0)


def _labelled(records: list[WorkerStats], generation: int, model: Model) -> list[WorkerStats]:
    """Worker records saying which generation and model each worker serves."""
    name = model_name(os.fspath(model) if isinstance(model, os.PathLike) else model)
    return [replace(r, generation=generation, model=name) for r in records]


def _model_ref(model: Any) -> str | Callable[[], Callable]:
    """``model=`` as the pool keeps it (a path-like as a string), or ``TypeError``."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) and not callable(model):
        raise TypeError(
            "model must be a SavedModel path, a TF Hub handle or a factory callable, "
            f"got {type(model).__name__}"
        )
    return model


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
