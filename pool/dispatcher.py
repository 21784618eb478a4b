"""The dispatcher: one manager thread that owns every shard and every worker slot.

Callers and executor callbacks never touch its state: they put events on its queue.

    caller ──Submit──▶ ┌──────────────┐ ──run_shard──▶ worker slot 0 (1-process executor)
    caller ──Cancel──▶ │ manager loop │ ──run_shard──▶ worker slot 1
    executors ──Done─▶ │  pending     │ ◀──Done─────── (future callbacks)
    restarts ──Ready─▶ └──────────────┘ ──set_result──▶ caller's Future (one per shard)

Each shard goes to the ready slot holding the fewest shards. A slot holds enough shards to
cover ``queued_seconds`` of its recent shard time (at least two: one running, one queued in
the pipe), so a worker never waits for the parent even when shards take well under a
millisecond, and long shards are still handed out one at a time for balance. A slot whose
process died (``BrokenProcessPool``), ran past ``timeout`` or outgrew its limits is replaced by a
new process that loads the model once; the shards it held go back to the front of the queue.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from . import worker
from .backend import Settings
from .errors import ModelLoadError, PoolClosedError, WorkerCrashedError
from .messages import ShardRequest, ShardResult
from .process import WorkerProcess

log = logging.getLogger("pool")

#: Seconds between checks of shard deadlines when a timeout is set...
TICK_SECONDS = 0.05
#: ...and between checks that busy workers are still alive.
HEALTH_SECONDS = 0.25


@dataclass
class Task:
    """One shard of one caller's request, until its result reaches the caller."""

    request: ShardRequest
    future: Future
    attempts: int = 0  # worker deaths this shard caused
    started: float = 0.0  # when it became the running shard of its worker


@dataclass
class Slot:
    """A worker position; its process is replaced on death, keeping index and counters."""

    process: WorkerProcess
    status: str = "ready"  # starting | ready | retiring | dead
    held: deque[Task] = field(default_factory=deque)  # in submission (= execution) order
    shard_seconds: float = 0.0  # moving average of the worker's time per shard
    timed_out: bool = False


@dataclass(frozen=True)
class _Submit:
    task: Task


@dataclass(frozen=True)
class _Done:
    slot: Slot
    process: WorkerProcess
    task: Task
    future: Future


@dataclass(frozen=True)
class _Ready:
    slot: Slot
    process: WorkerProcess


@dataclass(frozen=True)
class _Stop:
    kill: bool


@dataclass(frozen=True)
class Limits:
    """The reliability options of a pool, validated once by the pool."""

    depth: int = 2  # shards a slot holds at least
    max_depth: int = 16  # ... and at most
    queued_seconds: float = 0.005  # work to keep queued per slot, by its recent shard time
    max_retries: int = 2
    timeout: float | None = None
    max_worker_memory: int | None = None
    max_shards_per_worker: int | None = None


def room(limits: Limits, shard_seconds: float, shards_done: int) -> int:
    """How many shards one worker process may hold: ``depth``, or enough to cover
    ``queued_seconds`` of its recent time per shard (at most ``max_depth``); never more than its
    ``max_shards_per_worker`` leaves, so a recycled process takes no shard it cannot run."""
    depth = limits.depth
    if shard_seconds > 0:
        wanted = math.ceil(limits.queued_seconds / shard_seconds) + 1
        depth = max(depth, min(limits.max_depth, wanted))
    if limits.max_shards_per_worker is None:
        return depth
    return min(depth, limits.max_shards_per_worker - shards_done)


class Dispatcher:
    def __init__(
        self,
        processes: list[WorkerProcess],
        settings: Settings,
        restart: Callable[[WorkerProcess], WorkerProcess],
    ) -> None:
        self.slots = [Slot(process=p) for p in processes]
        self._limits = _limits(settings.limits)
        self._restart = restart
        self._pending: deque[Task] = deque()
        self.retired: list[WorkerProcess] = []  # replaced processes, still exiting
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._last_health = 0.0
        self._thread = threading.Thread(target=self._run, name="pool-dispatcher", daemon=True)
        self._thread.start()

    # --- called from any thread -------------------------------------------------------------
    def submit(self, requests: list[ShardRequest]) -> list[Future]:
        if self._closed:
            raise PoolClosedError("the pool is shut down; start a new PredictionPool")
        futures = []
        for request in requests:
            task = Task(request=request, future=Future())
            self._events.put(_Submit(task))
            futures.append(task.future)
        return futures

    def queued_requests(self) -> int:
        return len(self._pending)

    def stop(self, kill: bool) -> None:
        """Stop the manager: after all queued shards are answered, or at once with ``kill``."""
        self._closed = True
        self._events.put(_Stop(kill=kill))
        self._thread.join()

    # --- the manager thread -----------------------------------------------------------------
    def _run(self) -> None:
        stopping: _Stop | None = None
        while True:
            wait = TICK_SECONDS if self._limits.timeout is not None else HEALTH_SECONDS
            try:
                event = self._events.get(timeout=wait)
            except queue.Empty:
                event = None
            try:
                if isinstance(event, _Stop):
                    stopping = event
                elif event is not None:
                    self._handle(event, stopping is not None)
                if stopping is not None and (stopping.kill or self._idle()):
                    self._fail_all(PoolClosedError("the pool was shut down before this shard ran"))
                    return
                self._check_deadlines()
                self._check_health()
                self._pump()
            except Exception:  # never let the manager die silently: fail every caller
                log.exception("pool dispatcher failed")
                self._fail_all(PoolClosedError("the pool's dispatcher failed; see the log"))
                return

    def _idle(self) -> bool:
        return not self._pending and not any(s.held for s in self.slots)

    def _handle(self, event: object, stopping: bool) -> None:
        if isinstance(event, _Submit):
            self._pending.append(event.task)
        elif isinstance(event, _Done):
            self._on_done(event, stopping)
        elif isinstance(event, _Ready):
            self._on_ready(event)

    def _pump(self) -> None:
        while self._pending:
            ready = [s for s in self.slots if s.status == "ready" and len(s.held) < self._room(s)]
            if not ready:
                return
            slot = min(ready, key=lambda s: (len(s.held), s.process.index))
            task = self._pending.popleft()
            if task.future.cancelled():
                continue
            if not task.future.running() and not task.future.set_running_or_notify_cancel():
                continue
            process = slot.process
            try:
                future = process.executor.submit(worker.run_shard, task.request)
            except (BrokenProcessPool, RuntimeError):
                self._pending.appendleft(task)
                self._on_death(slot)
                continue
            if not slot.held:
                task.started = time.monotonic()
            slot.held.append(task)
            future.add_done_callback(
                lambda f, s=slot, p=process, t=task: self._events.put(_Done(s, p, t, f))
            )

    def _room(self, slot: Slot) -> int:
        return room(self._limits, slot.shard_seconds, slot.process.shards_done)

    def _on_done(self, event: _Done, stopping: bool) -> None:
        slot, task, future = event.slot, event.task, event.future
        if event.process is not slot.process:  # a late callback from a replaced process
            return
        exc = future.exception()
        if isinstance(exc, BrokenProcessPool):
            self._on_death(slot)
            return
        if task not in slot.held:  # already failed by a shutdown
            return
        slot.held.remove(task)
        if slot.held:
            slot.held[0].started = time.monotonic()
        if exc is not None:
            task.future.set_exception(exc)
        else:
            result: ShardResult = future.result()
            stats = slot.process.stats
            stats.shards += 1
            stats.rows += task.request.stop - task.request.start
            stats.busy_seconds += result.busy_seconds
            slot.process.shards_done += 1
            slot.shard_seconds = (
                result.busy_seconds
                if slot.shard_seconds == 0
                else 0.8 * slot.shard_seconds + 0.2 * result.busy_seconds
            )
            task.future.set_result(result.outputs)
        self._maybe_retire(slot, stopping)

    def _maybe_retire(self, slot: Slot, stopping: bool) -> None:
        limits, stats = self._limits, slot.process.stats
        if slot.status == "ready" and not stopping:
            too_many = limits.max_shards_per_worker is not None and (
                slot.process.shards_done >= limits.max_shards_per_worker
            )
            too_big = limits.max_worker_memory is not None and (
                slot.process.rss_bytes() > limits.max_worker_memory
            )
            if too_many or too_big:
                log.info(
                    "retiring worker %d (pid %d): %s",
                    slot.process.index,
                    stats.pid,
                    "max_shards_per_worker" if too_many else "max_worker_memory",
                )
                slot.status = "retiring"
        if slot.status == "retiring" and not slot.held:
            old = slot.process
            old.shutdown(wait=False)  # exits once idle; joined by the pool's shutdown
            self._replace(slot, old)

    def _on_death(self, slot: Slot) -> None:
        """The slot's process died: requeue what it held (the culprit counts an attempt)."""
        if slot.status == "dead" or slot.status == "starting":
            return
        old = slot.process
        culprit = slot.held[0] if slot.held else None
        log.warning(
            "worker %d (pid %d) %s; restarting it",
            old.index,
            old.stats.pid,
            "ran past the timeout" if slot.timed_out else "died",
        )
        for task in reversed(slot.held):
            if task is culprit:
                task.attempts += 1
                if task.attempts > self._limits.max_retries:
                    task.future.set_exception(self._give_up(task, slot.timed_out))
                    continue
                old.stats.retries += 1
            self._pending.appendleft(task)
        slot.held.clear()
        slot.timed_out = False
        old.shutdown(kill=True, wait=False)
        self._replace(slot, old)

    def _give_up(self, task: Task, timed_out: bool) -> Exception:
        r = task.request
        tries = task.attempts
        if timed_out:
            return TimeoutError(
                f"rows {r.start}:{r.stop} ran past the timeout of {self._limits.timeout} s "
                f"on {tries} worker(s) (max_retries={self._limits.max_retries})"
            )
        return WorkerCrashedError(
            f"rows {r.start}:{r.stop} killed their worker process {tries} time(s) "
            f"(max_retries={self._limits.max_retries}); the pool has replaced the worker"
        )

    def _replace(self, slot: Slot, old: WorkerProcess) -> None:
        self.retired.append(old)
        if self._closed:  # shutting down: the other workers finish what is queued
            slot.status = "dead"
            if all(s.status == "dead" for s in self.slots):
                self._fail_all(PoolClosedError("every worker stopped while the pool shut down"))
            return
        new = self._restart(old)
        new.stats.restarts = old.stats.restarts + 1
        new.stats.retries = old.stats.retries
        new.stats.shards, new.stats.rows = old.stats.shards, old.stats.rows
        new.stats.busy_seconds = old.stats.busy_seconds
        slot.process = new
        slot.status = "starting"
        new.ready_future.add_done_callback(lambda f: self._events.put(_Ready(slot, new)))

    def _on_ready(self, event: _Ready) -> None:
        slot, process = event.slot, event.process
        if process is not slot.process:
            return
        exc = process.ready_future.exception()
        if exc is None:
            process.mark_ready(process.ready_future.result())
            slot.status = "ready"
            return
        log.error("a replacement worker could not load the model: %s", exc)
        slot.status = "dead"
        process.shutdown(kill=True, wait=False)
        self.retired.append(process)
        if all(s.status == "dead" for s in self.slots):
            self._fail_all(ModelLoadError(f"no worker could reload the model: {exc}"))

    def _check_deadlines(self) -> None:
        timeout = self._limits.timeout
        if timeout is None:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.status in ("ready", "retiring") and slot.held and not slot.timed_out:
                if now - slot.held[0].started > timeout:
                    slot.timed_out = True
                    slot.process.kill()  # its futures fail with BrokenProcessPool -> _on_death

    def _check_health(self) -> None:
        """A busy worker found dead whose executor has not said so is stuck on a half-sent
        result: release it, so the executor breaks and the shards are re-run."""
        now = time.monotonic()
        if now - self._last_health < HEALTH_SECONDS:
            return
        self._last_health = now
        for slot in self.slots:
            if slot.status in ("ready", "retiring") and slot.held and not slot.process.alive():
                slot.process.release_result_pipe()

    def _fail_all(self, exc: Exception) -> None:
        tasks = list(self._pending) + [t for s in self.slots for t in s.held]
        self._pending.clear()
        for slot in self.slots:
            slot.held.clear()
        for task in tasks:
            if not task.future.done():
                if task.future.cancel():
                    continue
                task.future.set_exception(exc)


def _limits(limits) -> Limits:
    return Limits(
        max_retries=limits.max_retries,
        timeout=limits.timeout,
        max_worker_memory=limits.max_worker_memory,
        max_shards_per_worker=limits.max_shards_per_worker,
    )
