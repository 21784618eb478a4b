"""The worker side of the Dask backend: code that runs inside Dask worker processes.

::

    client ──register_plugin(ModelPlugin)──▶ scheduler ──▶ every worker, now and later
                                                           (a Nanny-restarted one too)
        ModelPlugin.setup   starts the load in a thread; the event loop keeps heartbeating
    client ──run(wait_ready)──▶ every worker: await that load, answer WorkerReady
    client ──submit(run_shard, ShardRequest, key)──▶ a worker's task thread:
        run_shard           waits for the load (or raises its real reason), calls the model,
                            counts the shard; with a timeout, the call runs in a helper thread,
                            and past it the task raises ShardTimedOut and the worker exits
                            once the error has reached the client (the Nanny restarts it)

The plugin carries only the :class:`pool.messages.WorkerConfig` (the scheduler stores it
pickled and sends it to every worker that joins), never a loaded model. The model is loaded by
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
from dataclasses import dataclass, replace
from typing import Any

import psutil
from distributed import get_client, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from .. import sharding
from ..errors import ModelLoadError, PoolClosedError, WorkerCrashedError
from ..messages import ShardRequest, WorkerConfig, WorkerReady

log = logging.getLogger("pool")

#: A worker whose shard ran past its timeout exits (its Nanny starts a new one) once the error
#: has reached the client, or at the latest this many seconds after the timeout.
EXIT_AFTER_TIMEOUT_SECONDS = 30.0


def load_topic(plugin_name: str) -> str:
    """The scheduler event topic where each worker logs one event per model load."""
    return f"{plugin_name}-loads"


def suspect_topic(plugin_name: str, shard_id: str) -> str:
    """The event topic where the runs of one suspect shard log their starts (see run_shard)."""
    return f"{plugin_name}-suspect-{shard_id}"


class ShardTimedOut(TimeoutError):
    """A shard ran past ``timeout`` on the worker at ``worker`` (which then exits)."""

    def __init__(self, message: str, worker: str) -> None:
        super().__init__(message, worker)
        self.worker = worker

    def __str__(self) -> str:
        return self.args[0]


@dataclass
class _Counts:
    shards: int = 0
    rows: int = 0
    busy_seconds: float = 0.0


class ModelPlugin(WorkerPlugin):
    """Loads the pool's model once in each Dask worker, in a thread, and holds it there."""

    def __init__(self, config: WorkerConfig, name: str, load_timeout: float | None) -> None:
        self.config = config
        self.name = name
        self.load_timeout = load_timeout
        self._fresh()

    def _fresh(self) -> None:
        self._loaded = threading.Event()
        self._lock = threading.Lock()
        self._model: Any = None
        self.ready: WorkerReady | None = None
        self.error: str | None = None
        self.closed = False
        self.counts = _Counts()
        self.address = ""

    # The scheduler keeps the pickled plugin and sends it to every new worker: only the
    # configuration travels, never a model, a thread or a lock.
    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "name": self.name, "load_timeout": self.load_timeout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fresh()

    def setup(self, worker: Any) -> None:
        """Runs on the worker's event loop: start the load and return at once."""
        self.address = worker.address
        threading.Thread(
            target=self._load, args=(worker,), name=f"{self.name}-load", daemon=True
        ).start()

    def teardown(self, worker: Any) -> None:
        """The pool shut down (or the worker is closing): drop the model."""
        with self._lock:
            self.closed = True
            self._model = None

    def _load(self, worker: Any) -> None:
        try:
            config = self.config
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

    def count(self, request: ShardRequest, busy_seconds: float) -> None:
        with self._lock:
            self.counts.shards += 1
            self.counts.rows += request.stop - request.start
            self.counts.busy_seconds += busy_seconds


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
        "rows": counts.rows,
        "busy_seconds": counts.busy_seconds,
        "rss_bytes": rss,
    }


# --- the task --------------------------------------------------------------------------------


def run_shard(
    request: ShardRequest,
    key: str,
    *,
    plugin_name: str,
    shard_timeout: float | None,
    suspect: str | None,
    max_retries: int,
) -> dict[str, Any]:
    """One shard on a Dask worker, as the task ``key``: ``{output name: array}`` for its rows.

    ``suspect`` is set for a shard Dask gave up on (``KilledWorker``): such a run first logs its
    start on that topic and refuses to run once ``max_retries`` earlier runs died while running
    it, so only the shard that kills workers fails, not the shards queued next to it.
    """
    from ..worker import call_model

    worker = get_worker()
    plugin = loaded_plugin(plugin_name, worker)
    model = plugin.model()
    name = sharding.describe_model(plugin.config.model)
    if suspect is not None:
        _log_suspect_start(suspect, request, max_retries, worker.address)
    if shard_timeout is None:
        result = call_model(model, request, name)
    else:
        result = _call_with_timeout(model, request, name, shard_timeout, worker, key)
    plugin.count(request, result.busy_seconds)
    return result.outputs


def _log_suspect_start(topic: str, request: ShardRequest, max_retries: int, address: str) -> None:
    client = get_client()
    died = len(client.get_events(topic))
    if died > max_retries:
        raise WorkerCrashedError(
            f"rows {request.start}:{request.stop} killed their Dask worker {died} time(s) while "
            f"running (max_retries={max_retries}), after Dask gave up on them (KilledWorker); "
            "the Nannies have restarted the workers"
        )
    client.log_event(topic, {"worker": address, "pid": os.getpid()})


def _call_with_timeout(
    model: Any, request: ShardRequest, name: str, timeout: float, worker: Any, key: str
) -> Any:
    """Call the model in a daemon thread; past ``timeout`` raise ``ShardTimedOut``.

    Nothing can stop the call itself, so this worker process then exits: as soon as its task's
    error has reached the client (the scheduler has had the client release ``key``, so the
    worker forgets it), or ``EXIT_AFTER_TIMEOUT_SECONDS`` later at the latest. Its Nanny starts
    a new worker, which loads the model again; Dask re-runs the other shards it held."""
    from ..worker import call_model

    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["result"] = call_model(model, request, name)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=call, name="pool-shard", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        threading.Thread(
            target=_exit_once_reported, args=(worker, key), name="pool-timeout-exit", daemon=True
        ).start()
        raise ShardTimedOut(
            f"rows {request.start}:{request.stop} ran past the timeout of {timeout} s on Dask "
            f"worker {worker.address}",
            worker.address,
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _exit_once_reported(worker: Any, key: str) -> None:
    deadline = time.monotonic() + EXIT_AFTER_TIMEOUT_SECONDS
    while key in worker.state.tasks and time.monotonic() < deadline:
        time.sleep(0.05)
    log.error("Dask worker %s exits: a shard ran past its timeout", worker.address)
    os._exit(1)
