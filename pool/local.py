"""The local backend: worker processes on this machine, scheduled by one dispatcher thread.

``LocalBackend.start`` resolves the model once (a remote TF Hub handle is downloaded here, in
the parent, so N workers never download N times), starts one worker process per position,
pinned to its own CPUs, and waits until every one has loaded the model.

One ``LocalBackend`` is one *generation* of workers serving one model:
``PredictionPool.reload`` starts a second one beside it, swaps it in once every new worker is
ready, and stops the first (docs/design.md, "Model generations"). ``shutdown()`` from another
thread while ``start()`` waits kills the workers loading and makes ``start()`` raise
``PoolClosedError``.
"""

from __future__ import annotations

import multiprocessing
import pickle
import threading
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import psutil

from . import transport
from .backend import Settings, local_model_path
from .dispatcher import Dispatcher
from .errors import PoolClosedError
from .messages import ShardRequest, WorkerConfig, WorkerReady, WorkerStats
from .process import cpus_for, make_context
from .runtimes.resolve import Resolution
from .sharding import describe_model


class LocalBackend:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._context = make_context(settings.start_method)
        self._dispatcher: Dispatcher | None = None
        self.runtime: Resolution | None = None
        # A start may be cancelled from another thread (``shutdown()`` while a reload loads a
        # new generation): the lock orders the cancel against the dispatcher being created.
        self._lock = threading.Lock()
        self._loading: Dispatcher | None = None
        self._cancelled = False

    def _check_cancelled(self) -> None:
        if self._cancelled:
            raise PoolClosedError(
                "the pool was shut down while its workers were loading "
                f"{describe_model(self._settings.model)}"
            )

    def start(self) -> list[WorkerReady]:
        settings = self._settings
        model = local_model_path(settings.model, settings.signature, settings.output)
        if isinstance(model, str) and "://" in model:
            from . import model as model_module  # imports TensorFlow: remote handles only

            model = model_module.resolve(model)
        me = psutil.Process()
        config = settings.worker_config(model, me.pid, me.create_time())
        if settings.runtime != "tensorflow":
            config = self._resolve_runtime(config)

        def config_for(index: int) -> WorkerConfig:
            if settings.pin_cpus and settings.allowed_cpus:
                cpus = cpus_for(index, settings.threads_per_worker, list(settings.allowed_cpus))
                return replace(config, cpus=cpus)
            return config

        self._check_cancelled()
        try:
            dispatcher = Dispatcher(settings, self._context, config_for)
        except (pickle.PicklingError, AttributeError) as exc:  # the workers could not get it
            if isinstance(exc, AttributeError) and "pickle" not in str(exc):
                raise
            raise TypeError(
                "model must be a SavedModel path, a TF Hub handle or a factory the workers can "
                f"import by name (a top-level function, not a lambda or a local function), got "
                f"{settings.model!r}: {exc}"
            ) from exc
        with self._lock:
            if self._cancelled:
                dispatcher.stop(kill=True)
                self._check_cancelled()
            self._loading = dispatcher
        try:
            ready = dispatcher.wait_ready(settings.start_timeout)
            with self._lock:
                self._loading = None
                self._check_cancelled()  # shut down meanwhile: its workers are being killed
                self._dispatcher = dispatcher
        except BaseException:
            dispatcher.stop(kill=True)
            raise
        return ready

    def _resolve_runtime(self, config: WorkerConfig) -> WorkerConfig:
        """Convert (or find in the cache) and verify the model for ``runtime=``; workers of a
        converted model start with ``spawn``: the fork server has TensorFlow imported."""
        from .runtimes.resolve import for_workers

        self.runtime, config = for_workers(self._settings, config)
        if config.runtime != "tensorflow" and self._context.get_start_method() != "spawn":
            self._context = multiprocessing.get_context("spawn")
        return config

    def runtime_info(self) -> dict[str, object]:
        """What runs the model and what was measured on the way (docs/runtimes.md)."""
        from .runtimes.resolve import describe

        if self.runtime is None:
            return describe(None)
        return describe(self.runtime, start_method=self._context.get_start_method())

    def _running(self) -> Dispatcher:
        if self._dispatcher is None:
            raise RuntimeError("the local backend is not started")
        self._dispatcher.check_process()  # PoolClosedError in a forked child
        return self._dispatcher

    def submit(
        self, requests: list[ShardRequest], bounded: bool = True, finish: Any = None
    ) -> list[Future]:
        return self._running().submit(requests, bounded, finish)

    def stats(self) -> list[WorkerStats]:
        """One record per worker; while the workers load (a reload), their ``starting``
        records."""
        dispatcher = self._dispatcher or self._loading
        if dispatcher is None:
            return []
        dispatcher.check_process()
        records = []
        for slot in dispatcher.slots:
            record = replace(slot.process.stats, state=slot.state.value, error=slot.failure)
            record.rss_bytes = slot.process.rss_bytes()
            records.append(record)
        return records

    def worker_pids(self) -> list[int]:
        dispatcher = self._dispatcher or self._loading
        if dispatcher is None:
            return []
        dispatcher.check_process()
        return [pid for slot in dispatcher.slots for pid in slot.process.pids()]

    def queued_requests(self) -> int:
        return self._running().queued_requests()

    def transport_info(self) -> dict[str, object]:
        """How batches travelled: counts through the shared arena and through the socket."""
        dispatcher = self._running()
        arena, socket = dispatcher.batches_in_arena, dispatcher.batches_on_socket
        copies = (arena * transport.COPIES_VIA_ARENA + socket * transport.COPIES_VIA_SOCKET) / max(
            1, arena + socket
        )
        return {
            "arena_bytes": [
                s.process.arena.size if s.process.arena else 0 for s in dispatcher.slots
            ],
            "batches_in_arena": arena,
            "batches_on_socket": socket,
            "copies_per_shard": copies if arena + socket else None,
        }

    def shutdown(self, kill: bool) -> None:
        """Stop the workers (a no-op in a forked child: they are its parent's). Workers still
        loading (a reload's new generation) are killed, and that ``start()`` raises
        ``PoolClosedError``. Idempotent; may be called from several threads at once."""
        with self._lock:
            self._cancelled = True
            loading, dispatcher = self._loading, self._dispatcher
        if loading is not None:
            loading.stop(kill=True)
        if dispatcher is not None:
            dispatcher.stop(kill=kill)

    def abandon(self) -> None:
        """The pool was garbage-collected without ``shutdown()``: drain what is queued, then
        stop the workers and free everything, on the dispatcher's own thread (never blocks)."""
        if self._dispatcher is not None:
            # Called by the garbage collector, maybe while this very thread holds one of the
            # pool's locks: ask from a thread of its own, which takes them later.
            threading.Thread(
                target=self._dispatcher.close, args=(False,), name="pool-abandon", daemon=True
            ).start()
