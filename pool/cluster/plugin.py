"""The worker side of the Dask backend: code that runs inside Dask worker processes.

::

    client ──register_plugin(ModelPlugin)──▶ scheduler ──▶ every worker, now and later
                                                           (a Nanny-restarted one too)
        ModelPlugin.setup   starts the load in a thread; the event loop keeps heartbeating
                            (a converted runtime's artifact travels inside the plugin and is
                            installed in the worker's own runtime cache when the client's
                            path is not whole there)
    client ──scatter([ShardRequest, ...], direct=True)──▶ a worker's memory (a parcel; never
                                                          through the scheduler)
    client ──submit(run_parcel, <key of that parcel>)──▶ the task, on the worker holding it:
        run_parcel          waits for the load (or raises its real reason), hands the shards
                            to the worker's ShardBatcher, secedes from Dask's thread pool (so
                            the next parcel queued there can join the queue) and waits for
                            each shard's rows (or the exception that ended it)
        ShardBatcher        one model thread per worker: pool.batching.BatchQueue combines the
                            waiting shards (max_batch_rows / max_batch_bytes); a combined call
                            that fails is re-run shard by shard; with a timeout, the tasks of a
                            call that runs past it raise ShardTimedOut and the worker exits
                            once the error has reached the client (the Nanny restarts it)
    client ◀──gather(direct=True)── the result, from the worker's memory

The plugin carries only the :class:`pool.messages.WorkerConfig`, the batching options and the
limits (``timeout``, ``max_retries``) (the
scheduler stores it pickled and sends it to every worker that joins), plus a converted
runtime's artifact files, never a loaded model. The model is loaded by
:func:`pool.worker.load_model`, which sizes TensorFlow's thread pools before TensorFlow's
runtime starts and pins nothing (``cpus`` is ``None`` on a cluster).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from distributed import get_client, get_worker, secede
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.utils import thread_state

from .. import sharding
from ..backend import Batching, Limits
from ..batching import BatchQueue, Task
from ..errors import ModelLoadError, PoolClosedError, WorkerCrashedError, WorkerError
from ..futures import PoolFuture
from ..messages import ShardRequest, WorkerConfig, WorkerReady

log = logging.getLogger("pool")

#: A worker whose shard ran past its timeout exits (its Nanny starts a new one) once the error
#: has reached the client, or at the latest this many seconds after the timeout.
EXIT_AFTER_TIMEOUT_SECONDS = 30.0


def load_topic(plugin_name: str) -> str:
    """The scheduler event topic where each worker logs one event per model load."""
    return f"{plugin_name}-loads"


def suspect_topic(plugin_name: str, shard_id: str) -> str:
    """The event topic where the runs of one suspect shard log their starts (see run_parcel)."""
    return f"{plugin_name}-suspect-{shard_id}"


class ShardTimedOut(TimeoutError):
    """A shard's model call ran past ``timeout`` on the worker at ``worker`` (which then exits).
    ``combined``: the call carried other shards too (the shard is re-run alone, uncounted)."""

    def __init__(self, message: str, worker: str, combined: bool = False) -> None:
        super().__init__(message, worker, combined)
        self.worker = worker
        self.combined = combined

    def __str__(self) -> str:
        return self.args[0]


@dataclass
class _Counts:
    shards: int = 0
    batches: int = 0  # model calls: combined shards count once
    rows: int = 0
    busy_seconds: float = 0.0


class ModelPlugin(WorkerPlugin):
    """Loads the pool's model once in each Dask worker, in a thread, and holds it there."""

    def __init__(
        self,
        config: WorkerConfig,
        name: str,
        load_timeout: float | None,
        batching: Batching | None = None,
        artifact_files: dict[str, bytes] | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self.load_timeout = load_timeout
        self.batching = batching or Batching()
        self.limits = limits or Limits()
        #: a converted runtime's cache entry (``pool.runtimes.cache.pack_entry``), installed
        #: in this worker's runtime cache when the client's path is not whole here
        self.artifact_files = artifact_files
        self._fresh()

    def _fresh(self) -> None:
        self._loaded = threading.Event()
        self._lock = threading.Lock()
        self._model: Any = None
        self._batcher: ShardBatcher | None = None
        self.ready: WorkerReady | None = None
        self.error: str | None = None
        self.closed = False
        self.counts = _Counts()
        self.address = ""
        self.artifact = ""  # where this worker loaded a converted model from
        self.worker: Any = None

    # The scheduler keeps the pickled plugin and sends it to every new worker: only the
    # configuration (and a converted artifact's files) travels, never a model, a thread or a
    # lock.
    def __getstate__(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "name": self.name,
            "load_timeout": self.load_timeout,
            "batching": self.batching,
            "limits": self.limits,
            "artifact_files": self.artifact_files,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fresh()

    def setup(self, worker: Any) -> None:
        """Runs on the worker's event loop: start the load and return at once."""
        self.address = worker.address
        self.worker = worker
        threading.Thread(
            target=self._load, args=(worker,), name=f"{self.name}-load", daemon=True
        ).start()

    def teardown(self, worker: Any) -> None:
        """The pool shut down (or the worker is closing): drop the model."""
        with self._lock:
            self.closed = True
            self._model = None
            batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.stop()

    def _load(self, worker: Any) -> None:
        try:
            config = self._local_artifact(self.config)
            if isinstance(config.model, str) and "://" in config.model:
                from .. import model as model_module  # imports TensorFlow: remote handles only

                config = replace(config, model=model_module.resolve(config.model))
            from ..worker import load_model

            model, ready = load_model(config, loads=1)
        except BaseException as exc:
            self.error = f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}"
            log.error("Dask worker %s could not load the model: %s", worker.address, exc)
        else:
            with self._lock:
                if not self.closed:
                    self._model, self.ready = model, ready
            worker.log_event(
                load_topic(self.name),
                {"name": str(worker.name), "pid": ready.pid, "load_seconds": ready.load_seconds},
            )
        finally:
            self._loaded.set()

    def _local_artifact(self, config: WorkerConfig) -> WorkerConfig:
        """A converted model's artifact where this worker can read it: the client's path if
        it is whole here (shared storage), else installed from the files the plugin carries
        into this worker's runtime cache (``$POOL_RUNTIME_CACHE``; every file checked against
        the manifest's hashes), once per machine and cache."""
        if config.runtime == "tensorflow" or config.artifact is None:
            return config
        from ..runtimes import cache

        if cache.valid_manifest(Path(config.artifact)) is not None or not self.artifact_files:
            self.artifact = config.artifact
            return config
        installed = cache.install_entry(
            self.artifact_files, cache.cache_root(), Path(config.artifact).name
        )
        self.artifact_files = None  # installed: this worker needs the bytes no more
        self.artifact = str(installed)
        return replace(config, artifact=str(installed))

    def loaded(self) -> bool:
        """Whether the load has finished (successfully or not)."""
        return self._loaded.is_set()

    def wait(self) -> bool:
        """Block until the load has finished (or ``load_timeout`` passed); True if finished."""
        return self._loaded.wait(self.load_timeout)

    def model(self) -> Any:
        """The loaded model; waits for the load; raises its real reason if it failed."""
        if not self.wait():
            raise ModelLoadError(
                f"Dask worker {self.address} did not load the model within "
                f"start_timeout={self.load_timeout} s"
            )
        with self._lock:
            model = self._model
        if model is None:
            if self.closed:
                raise PoolClosedError(f"the pool {self.name} was shut down")
            raise ModelLoadError(
                f"Dask worker {self.address} (pid {os.getpid()}) could not load the model: "
                f"{self.error or 'unknown reason'}"
            )
        return model

    def batcher(self) -> ShardBatcher:
        """This worker's batcher (its model thread starts with the first shard)."""
        with self._lock:
            if self.closed:
                raise PoolClosedError(f"the pool {self.name} was shut down")
            if self._batcher is None:
                self._batcher = ShardBatcher(self)
            return self._batcher

    def count(self, request: ShardRequest, busy_seconds: float, shards: int = 1) -> None:
        with self._lock:
            self.counts.shards += shards
            self.counts.batches += 1
            self.counts.rows += request.stop - request.start
            self.counts.busy_seconds += busy_seconds


@dataclass(eq=False)
class _Waiting:
    """What the batcher knows of one waiting shard besides its :class:`pool.batching.Task`."""

    future: PoolFuture
    key: str
    rows: int
    nbytes: int
    before_call: Callable[[], None] | None  # a suspect's start check (run right before)
    taken: bool = False


@dataclass(eq=False)
class _Running:
    started: float
    shards: frozenset[int]  # id() of the shards' futures
    keys: frozenset[str]  # their Dask tasks' keys


class ShardBatcher:
    """One model thread per Dask worker fed by the parcel tasks (:func:`run_parcel`).

    Waiting shards are combined by :class:`pool.batching.BatchQueue` under the pool's
    ``max_batch_rows`` / ``max_batch_bytes`` / ``batch_timeout_micros``, as the local pool
    combines them; a combined call that raises (or whose outputs cannot be split by rows) is
    re-run shard by shard, so only the guilty shard fails. A shard whose Dask task was
    cancelled is dropped before it runs. The tasks keep at most about one full batch waiting
    beyond the one running: past that, a task holds Dask's thread slot (so Dask starts no more
    of them) until the batcher takes work."""

    def __init__(self, plugin: ModelPlugin) -> None:
        self._plugin = plugin
        self._options = plugin.batching
        self._cond = threading.Condition()
        self._queue = BatchQueue(self._options, wake=self._wake)
        self._waiting: dict[int, _Waiting] = {}  # id(future) -> its shard
        self._rows = 0  # rows and bytes put and not yet taken
        self._bytes = 0
        self._stopped = False
        self.running: _Running | None = None
        self.exiting = False
        self._thread = threading.Thread(
            target=self._run, name=f"{plugin.name}-batcher", daemon=True
        )
        self._thread.start()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # --- the tasks' side --------------------------------------------------------------------
    def put(
        self,
        requests: list[ShardRequest],
        key: str,
        solo: bool = False,
        before_call: Callable[[], None] | None = None,
    ) -> list[PoolFuture]:
        """Queue one task's shards at once (so a parcel's shards can share a model call)."""
        from ..batching import input_bytes

        with self._cond:
            if self._stopped:
                raise PoolClosedError(f"the pool {self._plugin.name} was shut down")
            futures = self._queue.put(requests, bounded=False, solo=solo)
            for request, future in zip(requests, futures, strict=True):
                rows, nbytes = request.stop - request.start, input_bytes(request.inputs)
                self._waiting[id(future)] = _Waiting(future, key, rows, nbytes, before_call)
                self._rows += rows
                self._bytes += nbytes
            self._cond.notify_all()
        return futures

    def wait_for_room(self, futures: list[PoolFuture]) -> None:
        """Hold the caller (and so Dask's thread slot) while a full batch waits besides the
        one running, unless its own shards were all taken."""
        options = self._options
        with self._cond:
            while not self._stopped:
                mine = [self._waiting.get(id(f)) for f in futures if not f.done()]
                if all(w is None or w.taken for w in mine):
                    return
                if self._rows < options.max_batch_rows and self._bytes < options.max_batch_bytes:
                    return
                self._cond.wait(0.5)

    def results(self, futures: list[PoolFuture], timeout: float | None, worker: Any) -> list[Any]:
        """Each shard's outputs, or the exception that ended it. Past ``timeout`` of a model
        call that carries some of them: ``ShardTimedOut`` for those, :data:`NOT_RUN` for the
        ones still waiting, and this worker exits once the answer has been reported."""
        outcomes: list[Any] = []
        for index, future in enumerate(futures):
            while True:
                try:
                    outcomes.append(future.result(timeout=None if timeout is None else 0.1))
                    break
                except FutureTimeout:
                    pass
                except CancelledError:
                    outcomes.append(PoolClosedError("the shard was cancelled"))
                    break
                except Exception as exc:
                    outcomes.append(exc)
                    break
                running = self.running
                assert timeout is not None
                if (
                    running is not None
                    and id(future) in running.shards
                    and time.monotonic() - running.started > timeout
                ):
                    self._timed_out(running, worker)
                    return outcomes + [
                        _timed_out_outcome(f, running, timeout, worker.address)
                        for f in futures[index:]
                    ]
        return outcomes

    def _timed_out(self, running: _Running, worker: Any) -> None:
        with self._cond:
            if self.exiting:
                return
            self.exiting = True
        threading.Thread(
            target=_exit_once_reported,
            args=(worker, running.keys),
            name="pool-timeout-exit",
            daemon=True,
        ).start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # --- the model thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                batch = self._next()
                if batch is None:  # stopped
                    for task in self._queue.drain():
                        _settle(task, error=PoolClosedError("the pool was shut down"))
                    self._waiting.clear()
                    return
                shards = [self._waiting.pop(id(t.future)) for t in batch]
                for shard in shards:
                    shard.taken = True
                    self._rows -= shard.rows
                    self._bytes -= shard.nbytes
                self.running = _Running(
                    time.monotonic(),
                    frozenset(id(s.future) for s in shards),
                    frozenset(s.key for s in shards),
                )
                self._cond.notify_all()
            try:
                self._call(batch, shards)
            except BaseException as exc:  # never let the thread die: its tasks would hang
                log.exception("the batcher of %s failed", self._plugin.name)
                for task in batch:
                    _settle(task, error=exc)
            finally:
                self.running = None

    def _next(self) -> list[Task] | None:
        """The next batch (called with the condition held); None once stopped."""
        while not self._stopped:
            self._queue.collect()
            self._drop_cancelled()
            batch = self._queue.take(1)
            if batch:
                return batch
            deadline = self._queue.next_deadline()
            self._cond.wait(1.0 if deadline is None else max(0.0, deadline - time.monotonic()))
        return None

    def _drop_cancelled(self) -> None:
        """Cancel the shards whose Dask task the client cancelled (or the worker forgot)."""
        worker = self._plugin.worker
        if worker is None:
            return
        tasks = worker.state.tasks
        dropped = False
        for waiting in list(self._waiting.values()):
            state = getattr(tasks.get(waiting.key), "state", None)
            if state in (None, "cancelled", "released", "forgotten"):
                if waiting.future.cancel():
                    self._waiting.pop(id(waiting.future), None)
                    self._rows -= waiting.rows
                    self._bytes -= waiting.nbytes
                    dropped = True
        if dropped:
            self._queue.purge_cancelled()

    def _requeue_alone(self, tasks: list[Task], shards: list[_Waiting]) -> None:
        with self._cond:
            again = []
            for task, shard in zip(tasks, shards, strict=True):
                if task.future.done():
                    continue
                task.solo = True
                shard.taken = False
                self._waiting[id(task.future)] = shard
                self._rows += shard.rows
                self._bytes += shard.nbytes
                again.append(task)
            self._queue.requeue_front(again)

    def _call(self, batch: list[Task], shards: list[_Waiting]) -> None:
        from ..worker import call_model

        plugin = self._plugin
        model = plugin.model()
        name = sharding.describe_model(plugin.config.model)
        if len(batch) == 1:
            (task,) = batch
            before = shards[0].before_call
            if before is not None:
                try:
                    before()
                except Exception as exc:
                    _settle(task, error=exc)
                    return
            request = task.request
        else:
            first = batch[0].request.inputs
            rows = sum(t.rows for t in batch)
            inputs = {
                n: np.concatenate([t.request.inputs[n] for t in batch], axis=0) for n in first
            }
            request = ShardRequest(0, rows, inputs)
        try:
            result = call_model(model, request, name)
        except WorkerError as exc:
            if len(batch) > 1:  # isolate: every shard re-runs alone, in order
                self._requeue_alone(batch, shards)
            else:
                _settle(batch[0], error=exc)
            return
        outputs = result.outputs
        if len(batch) > 1 and any(np.ndim(v) == 0 for v in outputs.values()):
            # Outputs without a batch axis cannot be split between shards: run them alone.
            self._requeue_alone(batch, shards)
            return
        plugin.count(request, result.busy_seconds, shards=len(batch))
        if len(batch) == 1:
            _settle(batch[0], result=outputs)
            return
        start = 0
        for task in batch:
            stop = start + task.rows
            _settle(task, result={n: v[start:stop] for n, v in outputs.items()})
            start = stop


#: A shard of a parcel cut short by another shard's timeout: never run, send it again.
NOT_RUN = "not-run"


def _timed_out_outcome(future: PoolFuture, running: _Running, timeout: float, address: str) -> Any:
    if future.done() and not future.cancelled() and future.exception() is None:
        return future.result()
    if id(future) not in running.shards:
        return NOT_RUN
    return ShardTimedOut(
        f"a model call of {len(running.shards)} shard(s) ran past the timeout of {timeout} s "
        f"on Dask worker {address}",
        address,
        len(running.shards) > 1,
    )


def _settle(task: Task, result: Any = None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            task.future.set_exception(error)
        else:
            task.future.set_result(result)
    except Exception:  # cancelled meanwhile
        pass


def loaded_plugin(name: str, worker: Any) -> ModelPlugin:
    """This worker's plugin for the pool ``name``; PoolClosedError if it is not registered."""
    plugin = worker.plugins.get(name)
    if not isinstance(plugin, ModelPlugin):
        raise PoolClosedError(
            f"the pool {name} is not registered on Dask worker {worker.address}: it was shut down"
        )
    return plugin


# --- called by the client with Client.run (on the worker's event loop) -----------------------


async def wait_ready(plugin_name: str, timeout: float | None, dask_worker: Any) -> WorkerReady:
    """Await this worker's load without blocking its event loop; its ``WorkerReady``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        plugin = dask_worker.plugins.get(plugin_name)
        if isinstance(plugin, ModelPlugin) and plugin.loaded():
            plugin.model()  # raises the load's reason
            assert plugin.ready is not None
            return plugin.ready
        if deadline is not None and time.monotonic() > deadline:
            raise ModelLoadError(
                f"Dask worker {dask_worker.address} did not load the model within "
                f"start_timeout={timeout} s"
            )
        await asyncio.sleep(0.05)


def worker_stats(plugin_name: str, dask_worker: Any) -> dict[str, Any] | None:
    """This worker's counts for the pool, or None where the plugin is absent."""
    plugin = dask_worker.plugins.get(plugin_name)
    if not isinstance(plugin, ModelPlugin):
        return None
    ready = plugin.ready
    with plugin._lock:
        counts = replace(plugin.counts)
    try:
        rss = psutil.Process().memory_info().rss
    except psutil.Error:
        rss = 0
    return {
        "name": str(dask_worker.name),
        "pid": os.getpid(),
        "load_seconds": ready.load_seconds if ready is not None else 0.0,
        "loaded": ready is not None,
        "shards": counts.shards,
        "batches": counts.batches,
        "artifact": plugin.artifact,
        "rows": counts.rows,
        "busy_seconds": counts.busy_seconds,
        "rss_bytes": rss,
    }


# --- the task --------------------------------------------------------------------------------


def run_parcel(
    requests: list[ShardRequest],
    plugin_name: str,
    suspect: str | None = None,
    solo: bool = False,
) -> list[Any]:
    """One parcel of shards on a Dask worker: for each shard, ``{output name: array}`` for its
    rows, or the exception that ended it (or :data:`NOT_RUN`).

    ``requests`` reach the task as scattered data (``Client.scatter(direct=True)``), never
    through the scheduler; the task's own arguments are a few short strings, so that a parcel
    costs the scheduler little more than its two keys. The shards join this worker's
    :class:`ShardBatcher` (``solo``: each runs alone); the task secedes from Dask's thread pool
    while it waits, so the parcels queued behind it reach the batcher too and can share its
    model calls. The pool's ``timeout`` and ``max_retries`` come with the plugin.

    ``suspect`` is set for a shard (a parcel of one) that was on a worker that died (its
    scattered copy lost, or Dask gave up on it with ``KilledWorker``): it runs alone, logs its
    start on that topic right before its model call and refuses to run once ``max_retries``
    earlier runs died while running it, so only the shard that kills workers fails, not the
    shards queued next to it.
    """
    worker = get_worker()
    key = str(thread_state.key)
    plugin = loaded_plugin(plugin_name, worker)
    plugin.model()  # waits for the load; raises its reason
    before_call = None
    if suspect is not None:
        (request,) = requests
        before_call = partial(
            _log_suspect_start,
            get_client(),
            suspect,
            request,
            plugin.limits.max_retries,
            worker.address,
        )
    batcher = plugin.batcher()
    futures = batcher.put(requests, key, solo=solo or suspect is not None, before_call=before_call)
    batcher.wait_for_room(futures)
    if not all(f.done() for f in futures):
        secede()
    return batcher.results(futures, plugin.limits.timeout, worker)


def _log_suspect_start(
    client: Any, topic: str, request: ShardRequest, max_retries: int, address: str
) -> None:
    died = len(client.get_events(topic))
    if died > max_retries:
        raise WorkerCrashedError(
            f"rows {request.start}:{request.stop} killed their Dask worker {died} time(s) while "
            f"running (max_retries={max_retries}), after their worker died with them "
            "(KilledWorker, or their scattered copy lost); the Nannies have restarted the workers"
        )
    client.log_event(topic, {"worker": address, "pid": os.getpid()})


def _exit_once_reported(worker: Any, keys: frozenset[str]) -> None:
    """Exit this worker process (its Nanny starts a new one) once the timed-out tasks' errors
    have reached the client (the scheduler has had the client release their keys, so the
    worker forgets them), or ``EXIT_AFTER_TIMEOUT_SECONDS`` later at the latest: nothing can
    stop the stuck model call itself."""
    deadline = time.monotonic() + EXIT_AFTER_TIMEOUT_SECONDS
    while time.monotonic() < deadline and any(k in worker.state.tasks for k in keys):
        time.sleep(0.05)
    log.error("Dask worker %s exits: a model call ran past its timeout", worker.address)
    os._exit(1)
