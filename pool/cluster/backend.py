"""The client side of the Dask backend: ``PredictionPool(model, cluster=...)``.

::

    PredictionPool._dispatch ──[ShardRequest, ...]──▶ DaskBackend.submit
        │  one concurrent.futures.Future per shard, handed back at once; on the Dask
        │  client's event loop (the caller does not wait for the sending):
        │  parcels: consecutive shards, one per worker, at most max_batch_rows rows each
        │  Client.scatter(parcels, direct=True): each parcel straight into one worker's
        │  memory; the scheduler is told only keys, sizes and who holds them
        │  Client.submit(plugin.run_parcel, <parcel key>): one small task per parcel, placed
        │  on the worker that holds its data
        ▼
    Dask worker: run_parcel ──▶ ShardBatcher: waiting shards combined into model calls
        │  Dask future done ──(Dask's callback thread)──▶ queue
        ▼
    gatherer thread: Client.gather(direct=True) of every finished parcel at once, from the
    workers ──▶ each shard's Future.set_result (the parcel's copy is released with them)
        ├─ data lost      ─▶ its worker died with the scattered copy (Dask cancels the task):
        │                    scattered again from the shard the client still holds, and run
        │                    as a *suspect* (alone; plugin.run_parcel counts its deaths)
        ├─ ShardTimedOut  ─▶ (that worker exits; its Nanny restarts it) re-submit, or
        │                    TimeoutError after max_retries (a combined call: re-run alone)
        ├─ KilledWorker   ─▶ re-submit as a *suspect* run
        └─ anything else  ─▶ Future.set_exception (WorkerError, ModelLoadError, ...)

The gatherer thread owns the shards' Dask futures once submitted; callers only put events on
its queue (a cancelled Future asks it to cancel the Dask task). Each shard's ``ShardRequest``
stays in the client until its answer is in, so a lost copy can be sent again. Results keep no
Dask future alive once gathered, so the cluster releases them at once. This module never
imports TensorFlow; :mod:`pool.cluster.plugin` runs on the workers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from functools import partial
from typing import Any

import psutil
from distributed import Client, default_client
from distributed.scheduler import KilledWorker

from ..backend import Settings
from ..errors import ModelLoadError, PoolClosedError, QueueFullError, WorkerCrashedError
from ..futures import PoolFuture
from ..messages import ShardRequest, WorkerReady, WorkerStats
from ..runtimes import cache as runtime_cache
from ..runtimes.resolve import Resolution, describe, for_workers
from . import plugin as worker_side

log = logging.getLogger("pool")

#: How many times a shard's scattered copy or its result may be lost with its worker (and the
#: shard sent again) before the pool gives up on it.
MAX_LOST_RESULTS = 20

#: How many times a shard may come back as ``KilledWorker`` from its suspect runs before the
#: pool gives up on it whatever ``max_retries`` says (each suspect run counts its own deaths).
MAX_SUSPECT_ROUNDS = 5


#: Seconds to wait for a TCP connection to a scheduler address before giving up on it.
CONNECT_SECONDS = 5.0


def check_reachable(address: str) -> None:
    """Raise :class:`pool.ModelLoadError` at once if nothing listens at a ``tcp://`` or
    ``tls://`` scheduler address: Dask's client would retry a refused connection for
    ``distributed.comm.timeouts.connect`` (30 s) before failing. Other schemes are left to
    Dask."""
    scheme, _, rest = address.partition("://")
    if scheme not in ("tcp", "tls") or not rest:
        return
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as exc:
        raise ModelLoadError(
            f"no Dask scheduler answers at {address!r}: {exc}. Start one (`dask scheduler`) "
            "or give the address it prints"
        ) from None


def connect(cluster: Any) -> tuple[Client, bool]:
    """``(client, owned)`` for ``cluster=``: a Client as given (not owned), or a new Client to a
    scheduler address or a cluster object (owned: closed by the pool's shutdown).

    A new Client becomes the process's default Dask client when there is none, as
    ``Client(cluster)`` would: ``map_partitions(...).compute()`` then runs on the pool's
    cluster, as it does with ``cluster=client``. It stops being the default when the pool
    shuts down (the Client is closed); an existing default client is left as it is."""
    if isinstance(cluster, Client):
        return cluster, False
    if isinstance(cluster, str):
        check_reachable(cluster)
    if isinstance(cluster, str) or hasattr(cluster, "scheduler_address"):
        return Client(cluster, set_as_default=_default_client() is None), True
    if hasattr(cluster, "get_client"):
        return cluster.get_client(), False
    raise TypeError(
        "cluster must be a distributed.Client, a scheduler address such as "
        "'tcp://10.0.0.5:8786', or a cluster object (LocalCluster, KubeCluster, ...), "
        f"got {type(cluster).__name__}"
    )


def _default_client() -> Client | None:
    try:
        return default_client()
    except ValueError:  # no default client
        return None


def check_options(settings: Settings) -> None:
    """Refuse the local-pool options that a Dask cluster does another way (docs/scale-out.md)."""
    refused = {
        "max_worker_memory": (
            settings.limits.max_worker_memory,
            "give the Dask workers a memory_limit (the Nanny restarts a worker past 95%)",
        ),
        "max_shards_per_worker": (
            settings.limits.max_shards_per_worker,
            "recycle Dask workers with distributed.worker.lifetime",
        ),
        "start_method": (
            settings.start_method,
            "Dask starts its workers itself (distributed.worker.multiprocessing-method)",
        ),
    }
    for name, (value, instead) in refused.items():
        if value is not None:
            raise ValueError(f"{name}={value!r} does not apply with cluster=: {instead}")


def cluster_model_path(model: Any) -> Any:
    """The model reference sent to the workers: an existing local directory made absolute; any
    other string (a path that only the workers can see, a TF Hub handle) or factory as given."""
    if isinstance(model, str) and "://" not in model and os.path.isdir(model):
        return os.path.abspath(model)
    return model


@dataclass(eq=False)
class _Call:
    remaining: int


@dataclass(eq=False)
class _Shard:
    request: ShardRequest
    future: PoolFuture
    call: _Call
    shard_id: str
    parcel: _Parcel | None = None  # how it travels now
    finish: Callable[[Any], Any] | None = None  # applied to the outputs (one-shard calls)
    timeouts: int = 0
    suspect_rounds: int = 0
    lost: int = 0
    solo: bool = False  # re-run alone: its combined model call ran past the timeout
    suspect: bool = False  # it was on a worker that died: its runs log their starts


@dataclass(eq=False)
class _Parcel:
    """Consecutive shards of one call sent to one worker as one scattered copy and one task
    (a re-sent shard travels alone)."""

    shards: list[_Shard]
    dask_future: Any = None
    data: Any = None  # the Dask future of the scattered copy

    def done(self) -> bool:
        return all(s.future.done() for s in self.shards)

    def forget(self) -> None:
        self.dask_future = None
        self.data = None
        for shard in self.shards:
            if shard.parcel is self:
                shard.parcel = None


_STOP = object()

#: Seconds between refreshes of the client's list of Dask workers (parcels are spread over it).
WORKERS_REFRESH_SECONDS = 2.0

#: Seconds a scatter waits for the workers it picked to be running (then it picks again).
SCATTER_WAIT = 2.0

#: Seconds to keep scattering again while the workers picked die under it.
SCATTER_RETRY_SECONDS = 60.0

#: The end of a scattered copy's Dask key (its task's key + this): not a hex digit, so no task's
#: key (the pool's tag + a hex counter) can equal a copy's; a task keyed like a live copy would
#: be answered with the copy.
COPY_SUFFIX = "s"

#: Input bytes scattered in one ``Client.scatter`` call (straight to the workers).
SCATTER_BYTES = 64 << 20


class DaskBackend:
    """The workers of a Dask cluster behind a :class:`pool.PredictionPool` (see the module doc)."""

    def __init__(self, settings: Settings, cluster: Any) -> None:
        check_options(settings)
        self._settings = settings
        self._cluster = cluster
        self.name = f"pool-{uuid.uuid4().hex[:12]}"
        # The parcels' Dask keys: <tag><n in hex> for a task, <tag><n in hex>COPY_SUFFIX for its
        # scattered copy.
        self._tag = f"p{uuid.uuid4().hex[:10]}-"
        self._keys = 0
        self._workers: list[str] = []
        self._workers_at = 0.0
        self._turn = 0
        self.runtime: Resolution | None = None  # a converted runtime=, resolved at start()
        self._client: Client | None = None
        self._owns_client = False
        self._lock = threading.Lock()
        self._open_calls = 0
        self._live: set[_Shard] = set()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._gatherer: threading.Thread | None = None
        self._closed = False
        self._index: dict[str, int] = {}
        self._final_stats: list[WorkerStats] | None = None
        self.ready: list[WorkerReady] = []

    @property
    def client(self) -> Client:
        assert self._client is not None, "the backend has not started"
        return self._client

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> list[WorkerReady]:
        s = self._settings
        self._client, self._owns_client = connect(self._cluster)
        registered = False
        try:
            wanted = max(1, s.workers)
            try:
                self.client.wait_for_workers(wanted, timeout=s.start_timeout)
            except TimeoutError:
                raise ModelLoadError(
                    f"fewer than {wanted} Dask worker(s) joined the cluster within "
                    f"start_timeout={s.start_timeout} s"
                ) from None
            me = psutil.Process()
            config = s.worker_config(cluster_model_path(s.model), me.pid, me.create_time())
            artifact_files = None
            if s.runtime != "tensorflow":
                # Converted here, once (a subprocess: this process never imports TensorFlow).
                # The plugin carries the verified artifact's files: a worker that does not
                # see the client's cache path installs them into its own runtime cache,
                # checking the manifest's hashes, instead of converting (docs/scale-out.md).
                self.runtime, config = for_workers(s, config)
                if config.artifact is not None:
                    artifact_files = runtime_cache.pack_entry(config.artifact)
            model_plugin = worker_side.ModelPlugin(
                config, self.name, s.start_timeout, s.batching, artifact_files, s.limits
            )
            self.client.register_plugin(model_plugin, name=self.name)
            registered = True
            answers = self.client.run(
                worker_side.wait_ready, self.name, s.start_timeout, on_error="return"
            )
            failures = {a: r for a, r in answers.items() if isinstance(r, BaseException)}
            if failures:
                address, error = sorted(failures.items())[0]
                raise ModelLoadError(
                    f"{len(failures)} of {len(answers)} Dask worker(s) could not load the "
                    f"model; {address}: {error}"
                ) from None
            self._remember_workers()
        except BaseException:
            self._release(unregister=registered)
            raise
        self.ready = [answers[a] for a in sorted(answers)]
        log.info("model registered as %s on %d Dask worker(s)", self.name, len(self.ready))
        self._gatherer = threading.Thread(target=self._gather_loop, name=f"{self.name}-gather")
        self._gatherer.daemon = True
        self._gatherer.start()
        return self.ready

    def runtime_info(self) -> dict[str, Any]:
        """What runs the model and what was measured on the way (docs/runtimes.md)."""
        return describe(self.runtime)

    def shutdown(self, kill: bool) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live = list(self._live)
        if kill:
            for shard in live:
                self._settle(shard, error=PoolClosedError("the pool was shut down"))
                self._events.put(("cancel", shard))
        else:
            for shard in live:  # answered, failed or cancelled: the gatherer goes on meanwhile
                try:
                    shard.future.exception()
                except BaseException:
                    pass
        self._events.put(_STOP)
        if self._gatherer is not None:
            self._gatherer.join()
        try:
            self._final_stats = self._collect_stats()
        except Exception as exc:  # the cluster is gone: no final counts
            log.warning("could not read the Dask workers' final stats: %s", exc)
            self._final_stats = []
        self._release(unregister=True)

    def _release(self, unregister: bool) -> None:
        client = self._client
        if client is None:
            return
        if unregister:
            try:
                client.unregister_worker_plugin(self.name)
            except Exception as exc:
                log.warning("could not unregister %s from the Dask workers: %s", self.name, exc)
        if self._owns_client:
            client.close()

    # --- calls -----------------------------------------------------------------------------
    def submit(
        self,
        requests: list[ShardRequest],
        bounded: bool = True,
        finish: Callable[[Any], Any] | None = None,
    ) -> list[Future]:
        limit = self._settings.batching.max_queued_requests
        with self._lock:
            if self._closed:
                raise PoolClosedError("the pool was shut down")
            if bounded and limit is not None and self._open_calls >= limit:
                raise QueueFullError(
                    f"{self._open_calls} calls are already running on the cluster "
                    f"(max_queued_requests={limit}); retry later"
                )
            self._open_calls += 1
            call = _Call(remaining=len(requests))
            shards = [
                _Shard(r, PoolFuture(), call, f"pool-shard-{uuid.uuid4().hex}", finish=finish)
                for r in requests
            ]
            self._live.update(shards)
        for shard in shards:
            # Inline (quick, never raises) and holding the shard only weakly: a strong reference
            # would make a future -> callback -> shard -> future cycle keeping the arrays alive.
            shard.future.add_inline_callback(partial(self._on_answered_future, weakref.ref(shard)))
        self._run_on_loop(self._send_all(shards))
        return [s.future for s in shards]

    def _run_on_loop(self, coroutine: Any) -> None:
        """Run ``coroutine`` on the Dask client's event loop without waiting for it: the
        caller (an ``imap`` window, a server's request) goes on while the shards are
        scattered, and several calls' scatters overlap."""
        try:
            loop = self.client.loop.asyncio_loop  # type: ignore[union-attr]  # tornado's loop
            asyncio.run_coroutine_threadsafe(coroutine, loop)
        except BaseException:
            coroutine.close()
            raise

    async def _send_all(
        self, shards: list[_Shard], suspect: bool = False, priority: int = 0
    ) -> None:
        """Send one call's shards, group after group; a failure settles what is left."""
        pending = list(shards)
        try:
            for group in _groups(shards):
                await self._send(group, suspect, priority)
                del pending[: len(group)]
        except BaseException as exc:
            for shard in pending:
                self._settle(shard, error=exc)

    async def _send(self, group: list[_Shard], suspect: bool = False, priority: int = 0) -> None:
        """Scatter the shards' inputs straight to the workers, in parcels of consecutive shards
        (one per worker, at most ``max_batch_rows`` rows each), then submit one small task per
        parcel on its data: the scheduler is told keys, sizes and who holds them, never the
        data."""
        workers = await self._worker_list()
        parcels = [_Parcel(part) for part in self._parcels(group, len(workers))]
        keys = [self._key() for _ in parcels]
        data = await self._scatter(
            {
                k + COPY_SUFFIX: [s.request for s in p.shards]
                for k, p in zip(keys, parcels, strict=True)
            },
            len(parcels),
        )
        extra: tuple = ()
        if suspect:
            extra = (worker_side.suspect_topic(self.name, group[0].shard_id), True)
        elif group[0].solo:
            extra = (None, True)
        # Each task's spec is short (its data's key, the plugin's name, rarely two flags):
        # the scheduler relays it to the worker and its size is most of a parcel's cost there.
        for key, parcel, copy in zip(keys, parcels, data, strict=True):
            parcel.data = copy
            dask_future = self.client.submit(
                worker_side.run_parcel, copy, self.name, *extra, key=key, priority=priority
            )
            for shard in parcel.shards:
                shard.parcel = parcel
            self._watch(parcel, dask_future)

    def _parcels(self, group: list[_Shard], workers: int) -> list[list[_Shard]]:
        """Consecutive, near-equal runs of ``group``: one per worker (as far as there are
        shards), more when that is needed to keep each at most ``max_batch_rows`` rows."""
        if len(group) == 1:
            return [group]
        rows = sum(s.request.stop - s.request.start for s in group)
        count = max(
            min(len(group), max(1, workers)),
            -(-rows // self._settings.batching.max_batch_rows),
        )
        count = min(count, len(group))
        size, extra = divmod(len(group), count)
        parts, start = [], 0
        for i in range(count):
            stop = start + size + (1 if i < extra else 0)
            parts.append(group[start:stop])
            start = stop
        return parts

    async def _worker_list(self, refresh: bool = False) -> list[str]:
        """The Dask workers (cached for ``WORKERS_REFRESH_SECONDS``: the scheduler's answer
        grows with the cluster, so it is not asked once per call). On the client's loop."""
        now = time.monotonic()
        if refresh or not self._workers or now - self._workers_at >= WORKERS_REFRESH_SECONDS:
            scheduler: Any = self.client.scheduler
            self._workers = sorted(await scheduler.ncores())
            self._workers_at = now
        return self._workers

    def _targets(self, count: int) -> list[str] | None:
        """``count`` workers, taken in turn from the cached list (``None``: let Dask pick)."""
        workers = self._workers
        if not workers:
            return None
        first, self._turn = self._turn, self._turn + count
        return sorted({workers[(first + i) % len(workers)] for i in range(count)})

    def _key(self) -> str:
        """A short key unique on the cluster (keys ride in most of the scheduler's messages)."""
        with self._lock:
            self._keys += 1
            return f"{self._tag}{self._keys:x}"

    async def _scatter(self, parcels: dict[str, list[ShardRequest]], count: int) -> list[Any]:
        """``Client.scatter(direct=True)`` onto ``count`` workers taken in turn (Dask asks the
        scheduler only about those), again while a worker it picked has just died (the
        scheduler drops a dead worker within moments)."""
        deadline = time.monotonic() + SCATTER_RETRY_SECONDS
        while True:
            try:
                copies = await self.client._scatter(
                    parcels, workers=self._targets(count), direct=True, timeout=SCATTER_WAIT
                )
                return [copies[key] for key in parcels]
            except (OSError, TimeoutError) as exc:  # CommClosedError: a worker went away
                if time.monotonic() > deadline or self.client.status != "running":
                    raise
                log.debug("scattering %d parcel(s) failed (%s): again", len(parcels), exc)
                await asyncio.sleep(0.1)
                await self._worker_list(refresh=True)

    def _resubmit(self, shard: _Shard, suspect: bool) -> None:
        """Send the shard again, alone, from the copy the client holds (its scattered copy may
        have died with its worker), ahead of later shards as the local pool re-runs at the
        front."""
        shard.parcel = None
        shard.suspect = shard.suspect or suspect
        try:
            self._run_on_loop(self._send_all([shard], suspect=shard.suspect, priority=1))
        except Exception as exc:  # the cluster is gone
            self._settle(shard, error=exc)

    def _watch(self, parcel: _Parcel, dask_future: Any) -> None:
        parcel.dask_future = dask_future
        dask_future.add_done_callback(lambda f, p=parcel: self._events.put(("done", p, f)))
        if any(s.future.cancelled() for s in parcel.shards):  # before its future was known
            self._events.put(("cancel", parcel.shards[0]))

    def _on_answered(self, shard: _Shard) -> None:
        """A shard's Future is done (answered, failed or cancelled by the pool)."""
        if shard.future.cancelled():
            self._events.put(("cancel", shard))
        with self._lock:
            self._live.discard(shard)
            shard.call.remaining -= 1
            if shard.call.remaining == 0:
                self._open_calls -= 1

    def _on_answered_future(self, ref: weakref.ref[_Shard], future: Future) -> None:
        shard = ref()
        if shard is not None:  # else it was answered and released already
            self._on_answered(shard)

    def _settle(
        self, shard: _Shard, result: Any = None, error: BaseException | None = None
    ) -> None:
        try:
            if error is None and shard.finish is not None:
                try:
                    result = shard.finish(result)
                except Exception as exc:
                    error = exc
            if error is not None:
                shard.future.set_exception(error)
            else:
                shard.future.set_result(result)
        except InvalidStateError:  # cancelled by the pool, or settled by a kill
            pass

    # --- the gatherer thread ---------------------------------------------------------------
    def _gather_loop(self) -> None:
        stopping = False
        while True:
            items = [self._events.get()]
            while True:
                try:
                    items.append(self._events.get_nowait())
                except queue.Empty:
                    break
            stopping = stopping or any(item is _STOP for item in items)
            try:
                self._handle([item for item in items if item is not _STOP])
            except Exception:  # never let the thread die: callers would wait forever
                log.exception("the Dask gatherer failed on a batch of shards")
            # Drop the batch's Dask futures now, not at the next event: the cluster releases a
            # shard once no future refers to it (a timed-out worker waits for that to exit).
            items = []
            if stopping and self._events.empty():
                return

    def _handle(self, items: list[tuple]) -> None:
        cancels, finished = [], []
        for kind, item, *rest in items:
            if kind == "cancel":  # a shard's Future is done: drop its parcel once all are
                parcel = item.parcel
                if parcel is not None and parcel.done():
                    if parcel.dask_future is not None:
                        cancels.append(parcel.dask_future)
                    parcel.forget()
                continue
            parcel, dask_future = item, rest[0]
            if dask_future is not parcel.dask_future:
                continue  # stale: cancelled or re-sent since
            if parcel.done():
                cancels.append(dask_future)
                parcel.forget()
            elif dask_future.status == "finished":
                finished.append(parcel)
            else:
                self._failed(parcel, dask_future)
        if cancels:
            try:
                self.client.cancel(cancels)
            except Exception as exc:
                log.debug("could not cancel %d Dask task(s): %s", len(cancels), exc)
        if finished:
            futures = [p.dask_future for p in finished]
            try:  # straight from the workers' memory, not through the scheduler
                results = self.client.gather(futures, direct=True)
            except Exception as exc:  # one of them failed or was lost meanwhile
                log.debug("gathering %d parcel(s) failed (%s): one by one", len(futures), exc)
                results = [self._gather_one(f) for f in futures]
            for parcel, dask_future, value in zip(finished, futures, results, strict=True):
                if isinstance(value, list):  # run_parcel's outcome per shard
                    parcel.forget()
                    for shard, outcome in zip(parcel.shards, value, strict=True):
                        self._outcome(shard, outcome)
                elif dask_future.status == "error":
                    self._failed(parcel, dask_future)
                else:  # its worker died before it was gathered: send the shards again
                    parcel.forget()
                    for shard in parcel.shards:
                        self._lost(shard, suspect=False)

    def _gather_one(self, dask_future: Any) -> Any:
        try:
            return self.client.gather(dask_future, direct=True)
        except Exception:
            return None

    def _outcome(self, shard: _Shard, outcome: Any) -> None:
        if shard.future.done():
            return
        if isinstance(outcome, dict):  # {output name: array}
            self._settle(shard, result=outcome)
        elif outcome == worker_side.NOT_RUN:  # its parcel was cut short by a timeout
            self._resubmit(shard, suspect=False)
        elif isinstance(outcome, BaseException):
            self._error(shard, outcome)
        else:
            self._settle(shard, error=WorkerCrashedError(f"unexpected answer {outcome!r}"))

    def _lost(self, shard: _Shard, suspect: bool) -> None:
        """The shard's scattered copy (or its result) died with its worker: send it again."""
        if shard.future.done():
            return
        self._workers_at = 0.0  # a worker is gone: ask the scheduler before the next scatter
        shard.lost += 1
        if shard.lost > MAX_LOST_RESULTS:
            r = shard.request
            self._settle(
                shard,
                error=WorkerCrashedError(
                    f"rows {r.start}:{r.stop}: they were lost with their Dask worker "
                    f"{shard.lost} times"
                ),
            )
            return
        self._resubmit(shard, suspect=suspect)

    def _failed(self, parcel: _Parcel, dask_future: Any) -> None:
        parcel.forget()
        if dask_future.status == "cancelled":
            # Not cancelled by the pool (that forgets the future first): the scheduler dropped
            # the task because the worker holding its scattered copy died. It may have been
            # running there: its shards' next runs are suspects.
            for shard in parcel.shards:
                self._lost(shard, suspect=True)
            return
        exc = dask_future.exception()
        for shard in parcel.shards:
            if not shard.future.done():
                self._error(shard, exc)

    def _error(self, shard: _Shard, exc: BaseException) -> None:
        r = shard.request
        limits = self._settings.limits
        if isinstance(exc, worker_side.ShardTimedOut) and exc.combined:
            shard.solo = True  # not counted: which shard of the call hung is not known yet
            self._resubmit(shard, suspect=False)
            return
        if isinstance(exc, worker_side.ShardTimedOut):
            shard.timeouts += 1
            if shard.timeouts > limits.max_retries:
                self._settle(
                    shard,
                    error=TimeoutError(
                        f"rows {r.start}:{r.stop} ran past the timeout of {limits.timeout} s on "
                        f"{shard.timeouts} Dask worker(s) (max_retries={limits.max_retries}); "
                        "each such worker exits and its Nanny starts a new one"
                    ),
                )
            else:
                self._resubmit(shard, suspect=False)
            return
        if isinstance(exc, KilledWorker):
            shard.suspect_rounds += 1
            if shard.suspect_rounds > MAX_SUSPECT_ROUNDS:
                self._settle(
                    shard,
                    error=WorkerCrashedError(
                        f"rows {r.start}:{r.stop}: Dask gave up on them {shard.suspect_rounds} "
                        f"times (KilledWorker: {exc})"
                    ),
                )
            else:
                log.warning(
                    "rows %d:%d were on Dask workers that died %d times (KilledWorker); "
                    "re-running them as a suspect",
                    r.start,
                    r.stop,
                    exc.allowed_failures + 1,
                )
                self._resubmit(shard, suspect=True)
            return
        self._settle(shard, error=exc)

    # --- insight ---------------------------------------------------------------------------
    def _remember_workers(self) -> None:
        names = self.client.run(_worker_name, on_error="return")
        for name in sorted((n for n in names.values() if isinstance(n, str)), key=_natural):
            self._index.setdefault(name, len(self._index))

    def _collect_stats(self) -> list[WorkerStats]:
        answers = self.client.run(worker_side.worker_stats, self.name, on_error="return")
        loads: dict[str, list[int]] = {}
        for _, event in self.client.get_events(worker_side.load_topic(self.name)):
            loads.setdefault(str(event["name"]), []).append(int(event["pid"]))
        records = []
        for answer in answers.values():
            if not isinstance(answer, dict):
                continue  # the plugin is absent there, or the worker failed to answer
            name = answer["name"]
            pids = loads.get(name, [])
            count = len(pids) + (1 if answer["loaded"] and answer["pid"] not in pids else 0)
            records.append(
                WorkerStats(
                    worker=self._index.setdefault(name, len(self._index)),
                    pid=answer["pid"],
                    load_seconds=answer["load_seconds"],
                    loads=count,
                    shards=answer["shards"],
                    batches=answer["batches"],
                    rows=answer["rows"],
                    busy_seconds=answer["busy_seconds"],
                    rss_bytes=answer["rss_bytes"],
                    restarts=max(0, len(set(pids) | {answer["pid"]}) - 1),
                    retries=0,
                    cpus=None,
                )
            )
        return sorted(records, key=lambda s: s.worker)

    def stats(self) -> list[WorkerStats]:
        if self._final_stats is not None:
            return self._final_stats
        return self._collect_stats()

    def worker_pids(self) -> list[int]:
        answers = self.client.run(os.getpid, on_error="return")  # a dying worker answers an error
        return sorted(pid for pid in answers.values() if isinstance(pid, int))

    def queued_requests(self) -> int:
        with self._lock:
            return self._open_calls


def _groups(shards: list[_Shard]) -> list[list[_Shard]]:
    """Consecutive groups of shards of at most ``SCATTER_BYTES`` of inputs (at least one
    each): one ``Client.scatter`` and one ``Client.map`` each."""
    groups: list[list[_Shard]] = []
    size = SCATTER_BYTES
    for shard in shards:
        nbytes = sum(a.nbytes for a in shard.request.inputs.values())
        if size + nbytes > SCATTER_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(shard)
        size += nbytes
    return groups


def _worker_name(dask_worker: Any) -> str:
    return str(dask_worker.name)


def _natural(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)
