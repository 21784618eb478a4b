"""The dispatcher: one manager thread that owns every worker, every batch in flight, every shard.

Callers only put shards on the :class:`pool.batching.BatchQueue` and wake the thread; workers
only talk to it over their sockets. It waits on all of them at once::

    callers ──BatchQueue.put──▶ ┌──────────────┐ ──Batch──▶ worker 0 (socket + arena)
              wake pipe ──────▶ │ manager loop │ ──Batch──▶ worker 1
    worker sockets ──BatchDone─▶│  (one thread)│ ◀──BatchDone / BatchFailed / WorkerReady
    process sentinels ─death──▶ └──────────────┘ ──set_result──▶ each shard's Future

Each ready worker holds up to two batches: one running and one queued behind it, so it never
waits for the parent. A batch is formed by the queue when a worker has room (see
:mod:`pool.batching` for what is combined and when). The second batch is handed out only
when its message is small (inputs in the arena): a large message goes only to an idle worker,
so the parent and a worker can never both block writing to each other.

A worker that dies (its sentinel fires, or its socket ends mid-message), runs past ``timeout``
or outgrows its limits is replaced by a new process that loads the model once; what it held
goes back to the front of the queue. Only the batch that was *running* is suspect: if it
combined several shards they are re-run alone, without counting an attempt; a shard that
kills its worker while running alone counts one, and fails after ``max_retries``.

Every output must have one row per input row: a combined call whose outputs do not is re-run
shard by shard, and a shard alone whose outputs do not fails with ``WorkerError`` naming the
model and both counts. (An output with no batch axis, a 0-d array, passes through for a shard
run alone: it cannot be split.) Shards' futures are :class:`pool.futures.PoolFuture`: a caller's
callbacks run on the callback thread, so nothing this thread completes can block or end it.

A replaced process is let go at once (socket and arena closed; reaped when its sentinel fires,
killed if it lingers). A position whose new process cannot start or load stays DEAD and
retries with backoff; while every position is DEAD, calls fail at once with the reason. The
manager thread stops the workers and closes everything itself when the pool stops; an exit
hook stops every pool still running before multiprocessing's own exit handler runs.
"""

from __future__ import annotations

import atexit
import enum
import itertools
import logging
import multiprocessing.util
import os
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from typing import Any

import numpy as np

from . import sharding, transport
from .backend import Settings
from .batching import BatchQueue, Task
from .errors import ModelLoadError, PoolClosedError, WorkerCrashedError, WorkerError
from .messages import (
    ArenaRef,
    Batch,
    BatchDone,
    BatchFailed,
    Carried,
    LoadFailed,
    WorkerConfig,
    WorkerReady,
)
from .process import WorkerProcess

log = logging.getLogger("pool")

#: Seconds between checks of batch deadlines when a ``timeout`` is set.
TICK_SECONDS = 0.05
#: A batch whose message carries more than this many bytes goes only to an idle worker.
SMALL_MESSAGE_BYTES = 64 << 10
#: The arena of a worker grows (when idle) up to this size; larger batches use the socket.
MAX_ARENA_BYTES = 1 << 30
#: A replaced worker that has not exited this long after being told to is killed.
RETIRE_SECONDS = 10.0
#: A worker position whose process could not start or load the model tries again after this
#: long, doubling on each failure up to ``RETRY_MAX_SECONDS``.
RETRY_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0

#: Dispatchers not yet stopped, stopped (workers killed) at interpreter exit.
_live: set[Dispatcher] = set()
_live_lock = threading.Lock()
_exit_hook_registered = False


def _stop_all_at_exit() -> None:
    """Kill the workers of every pool still running when the interpreter exits.

    Registered after ``multiprocessing.util`` is imported, so it runs *before* multiprocessing's
    own exit handler (``atexit`` runs last-registered first): that handler would send the
    workers SIGTERM, which they ignore, then wait for them without a timeout."""
    with _live_lock:
        dispatchers = list(_live)
    for dispatcher in dispatchers:
        if dispatcher.owner_pid == os.getpid():  # never the pools of the process we forked from
            try:
                dispatcher.stop(kill=True)
            except Exception:  # at exit: stop the others all the same
                log.exception("could not stop a pool at interpreter exit")


def _register_exit_hook() -> None:
    global _exit_hook_registered
    with _live_lock:
        if _exit_hook_registered:
            return
        _exit_hook_registered = True
    assert multiprocessing.util  # imported above: its exit handler is registered before ours
    atexit.register(_stop_all_at_exit)


class State(enum.Enum):
    """A worker position's life. Moves: STARTING→READY (loaded) or →DEAD (could not start or
    load; after start-up it tries again with backoff: DEAD→STARTING); READY→RETIRING (limits)
    →STARTING (replaced once idle); READY/RETIRING→STARTING (died or timed out: replaced at
    once); →DEAD instead of a replacement while the pool shuts down with nothing queued."""

    STARTING = "starting"
    READY = "ready"
    RETIRING = "retiring"
    DEAD = "dead"


@dataclass(eq=False)
class InFlight:
    """A batch sent to a worker and not yet answered."""

    batch_id: int
    tasks: list[Task]
    rows: int
    arena: transport.Arena | None
    region: int | None
    started: float = 0.0  # when it became the batch its worker is running


@dataclass(eq=False)
class Slot:
    """A worker position; its process is replaced on death, keeping index and counters."""

    index: int
    process: WorkerProcess
    state: State = State.STARTING
    in_flight: deque[InFlight] = field(default_factory=deque)
    timed_out: bool = False
    failure: str | None = None  # why its last process could not start or load (until READY)
    retry_at: float | None = None  # when a DEAD slot tries again
    backoff: float = 0.0  # the last wait between tries


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        context: BaseContext,
        config_for: Callable[[int], WorkerConfig],
    ) -> None:
        self._settings = settings
        self._model = sharding.describe_model(settings.model)
        self._limits = settings.limits
        self._context = context
        self._config_for = config_for
        batching = settings.batching
        self._arena_bytes = transport.REGIONS * 2 * batching.max_batch_bytes
        self.owner_pid = os.getpid()  # a forked child must not use (or stop) this pool
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._woken = False
        self._pipe_open = True
        self._wake_lock = threading.Lock()
        self.queue = BatchQueue(batching, self._wake)
        self._selector = selectors.DefaultSelector()
        self.slots: list[Slot] = []
        try:
            self._selector.register(self._wake_r, selectors.EVENT_READ, None)
            for i in range(settings.workers):  # e.g. worker k cannot be pickled: free 0..k-1
                slot = Slot(i, self._spawn(i))
                self.slots.append(slot)
                self._watch(slot.process, slot)
        except BaseException:
            for slot in self.slots:
                self._unwatch(slot.process)
                slot.process.kill()
                slot.process.close()
            self._close_handles()
            raise
        # Replaced processes still exiting, each with the time by which it is killed; reaped
        # (and forgotten) as soon as its sentinel fires.
        self.retired: dict[WorkerProcess, float] = {}
        #: Why no worker can take a call (every position failed to load), or ``None``.
        self.unavailable: str | None = None
        self.batches_in_arena = 0
        self.batches_on_socket = 0
        self._batch_ids = itertools.count()
        self._started = False
        self._startup = threading.Event()
        self._stop: bool | None = None  # None: running; False: drain then stop; True: kill
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="pool-dispatcher", daemon=True)
        _register_exit_hook()
        with _live_lock:
            _live.add(self)
        self._thread.start()

    # --- called from any thread -------------------------------------------------------------
    def wait_ready(self, timeout: float | None) -> list[WorkerReady]:
        """Block until every worker has loaded the model; raise ``ModelLoadError`` if one
        could not (with its own reason) or the time ran out."""
        if not self._startup.wait(timeout):
            raise ModelLoadError(f"workers did not load the model within start_timeout={timeout} s")
        failures = [s.failure for s in self.slots if s.failure]
        if failures:
            raise ModelLoadError(failures[0])
        self._started = True
        return [s.process.ready for s in self.slots if s.process.ready is not None]

    def check_process(self) -> None:
        """Raise ``PoolClosedError`` in a forked child: the pool's thread and workers belong
        to the process that started it (the child only has copies of its handles)."""
        if os.getpid() != self.owner_pid:
            raise PoolClosedError(
                f"this pool was started by process {self.owner_pid} and cannot be used in "
                f"process {os.getpid()}, forked from it (a fork copies the pool's handles but "
                "not its dispatcher thread or workers): start a new PredictionPool in the child"
            )

    def submit(self, requests: list, bounded: bool = True, finish: Any = None) -> list:
        self.check_process()
        if self._closed:
            raise PoolClosedError("the pool is shut down; start a new PredictionPool")
        unavailable = self.unavailable
        if unavailable is not None:
            raise ModelLoadError(unavailable)
        return self.queue.put(requests, bounded, finish)

    def queued_requests(self) -> int:
        return self.queue.queued_calls()

    def close(self, kill: bool) -> None:
        """Ask the manager thread to stop (after draining the queue, or at once with
        ``kill``) without waiting: it stops the workers and frees everything itself."""
        if os.getpid() != self.owner_pid:
            return  # a forked child: the pool is its parent's
        self._closed = True
        self.queue.close()
        self._stop = kill or bool(self._stop)
        self._wake()

    def stop(self, kill: bool) -> None:
        """Stop: after every queued shard is answered, or at once with ``kill``; return
        once every worker is gone and every handle closed. Idempotent."""
        if os.getpid() != self.owner_pid:
            return
        self.close(kill)
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _close_handles(self) -> None:
        with self._wake_lock:  # no _wake() can write to a closed (or reused) descriptor
            if not self._pipe_open:
                return
            self._pipe_open = False
            os.close(self._wake_r)
            os.close(self._wake_w)
        self._selector.close()

    def _wake(self) -> None:
        if os.getpid() != self.owner_pid:
            return  # a forked child: the pipe is its parent's
        with self._wake_lock:
            if self._woken or not self._pipe_open:
                return
            self._woken = True
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass

    # --- the manager thread -----------------------------------------------------------------
    def _spawn(self, index: int) -> WorkerProcess:
        return WorkerProcess(index, self._config_for(index), self._context, self._arena_bytes)

    def _run(self) -> None:
        try:
            while True:
                self._wait_and_handle()
                self._tend()
                if self._stop is not None and (self._stop or self._idle()):
                    break
                self._check_deadlines()
                self._pump()
        except BaseException:  # never let the manager die silently: fail every caller
            log.exception("pool dispatcher failed")
            self._closed = True
            self.queue.close()
        try:
            self._fail_all(PoolClosedError("the pool was shut down before this shard ran"))
            self._startup.set()
        finally:
            self._teardown(kill=bool(self._stop))

    def _teardown(self, kill: bool) -> None:
        """Stop every worker (idle ones are asked, the rest killed) and free every handle."""
        try:
            for slot in self.slots:
                self._unwatch(slot.process)
            for process in self.retired:
                self._unwatch(process)
            for slot in self.slots:
                slot.process.ask_to_exit()
            for slot in self.slots:
                slot.process.stop(timeout=0 if kill else 30)
            for process, deadline in self.retired.items():
                if not kill:
                    process.wait(max(0.0, deadline - time.monotonic()))
                process.kill()
                process.close()
            self.retired.clear()
        finally:
            self._close_handles()
            with _live_lock:
                _live.discard(self)

    def _idle(self) -> bool:
        self.queue.collect()
        return not len(self.queue) and not any(s.in_flight for s in self.slots)

    def _watch(self, process: WorkerProcess, slot: Slot) -> None:
        self._selector.register(process.conn_fd, selectors.EVENT_READ, (slot, process))
        self._selector.register(process.sentinel_fd, selectors.EVENT_READ, (slot, process))

    def _unwatch(self, process: WorkerProcess) -> None:
        """Stop watching ``process`` (before any of its descriptors is closed)."""
        for fd in (process.conn_fd, process.sentinel_fd):
            try:
                key = self._selector.get_key(fd)
            except (KeyError, ValueError, RuntimeError):
                continue
            if key.data is process or (isinstance(key.data, tuple) and key.data[1] is process):
                self._selector.unregister(fd)

    def _wait_and_handle(self) -> None:
        dead = []
        for key, _ in self._selector.select(self._wait_timeout()):
            if key.data is None:  # the wake pipe
                os.read(self._wake_r, 4096)
                with self._wake_lock:
                    self._woken = False
                self.queue.collect()
                self.queue.purge_cancelled()
                continue
            if isinstance(key.data, WorkerProcess):  # a replaced process exited: reap it
                self._reap(key.data)
                continue
            slot, process = key.data
            if slot.process is not process or slot.state is State.DEAD:
                continue  # replaced meanwhile
            if key.fd == process.sentinel:
                dead.append((slot, process))
            else:
                self._receive(slot)
        for slot, process in dead:
            if slot.process is process and slot.state is not State.DEAD:
                self._on_death(slot)

    def _wait_timeout(self) -> float | None:
        timeouts = []
        if self._limits.timeout is not None and any(s.in_flight for s in self.slots):
            timeouts.append(TICK_SECONDS)
        for deadline in (self.queue.next_deadline(), self._next_lifecycle_deadline()):
            if deadline is not None:
                timeouts.append(max(0.0, deadline - time.monotonic()))
        return min(timeouts) if timeouts else None

    def _receive(self, slot: Slot) -> None:
        process = slot.process
        while True:
            try:
                message = transport.recv(process.conn)
            except Exception:  # EOF or a message cut short: the worker died (mid-send)
                self._on_death(slot)
                return
            self._on_message(slot, message)
            if slot.process is not process or slot.state is State.DEAD:
                return
            try:
                if not process.conn.poll():
                    return
            except OSError:
                return

    def _on_message(self, slot: Slot, message: object) -> None:
        if isinstance(message, BatchDone):
            self._on_done(slot, message)
        elif isinstance(message, BatchFailed):
            self._on_failed(slot, message)
        elif isinstance(message, WorkerReady):
            self._on_ready(slot, message)
        elif isinstance(message, LoadFailed):
            self._on_load_failure(
                slot, f"worker {slot.process.stats.pid} could not load the model: {message.error}"
            )

    # --- start-up and replacement -----------------------------------------------------------
    def _check_startup(self) -> None:
        if not self._startup.is_set() and all(
            s.state is State.READY or s.failure for s in self.slots
        ):
            self._startup.set()

    def _on_ready(self, slot: Slot, message: WorkerReady) -> None:
        slot.process.mark_ready(message)
        slot.state = State.READY
        if slot.failure is not None:
            log.info("worker %d (pid %d) loaded the model again", slot.index, message.pid)
        slot.failure, slot.retry_at, slot.backoff = None, None, 0.0
        self._check_startup()
        self._check_available()

    def _on_load_failure(self, slot: Slot, reason: str) -> None:
        self._release(slot.process, graceful=False)
        if not self._started:
            slot.state = State.DEAD
            slot.failure = reason
            self._startup.set()
            return
        self._slot_failed(slot, reason)

    def _slot_failed(self, slot: Slot, reason: str) -> None:
        """The slot's new process could not start or load the model: leave it DEAD and try
        again later (1 s, 2 s, 4 s ... up to a minute), unless the pool is shutting down."""
        slot.state = State.DEAD
        slot.failure = reason
        if self._closed:
            slot.retry_at = None
            log.error("worker %d: %s", slot.index, reason)
        else:
            slot.backoff = min(RETRY_MAX_SECONDS, 2 * slot.backoff or RETRY_SECONDS)
            slot.retry_at = time.monotonic() + slot.backoff
            log.error("worker %d: %s; trying again in %.0f s", slot.index, reason, slot.backoff)
        self._check_available()

    def _check_available(self) -> None:
        """Fail what waits, at once, when no worker can take it: every position failed to
        start or load (later calls fail at submit until one loads), or, while shutting down,
        every position is gone."""
        failures = [s.failure for s in self.slots if s.failure is not None]
        if self.slots and len(failures) == len(self.slots):
            if self.unavailable is None:
                self.unavailable = (
                    f"no worker of the pool could load the model (every position is retrying "
                    f"with backoff; calls fail at once until one loads): {failures[-1]}"
                )
                log.error("%s", self.unavailable)
            self._fail_queued(ModelLoadError(self.unavailable))
            return
        self.unavailable = None
        if self._closed and all(s.state is State.DEAD for s in self.slots):
            self._fail_queued(
                ModelLoadError(f"no worker could load the model: {failures[-1]}")
                if failures
                else PoolClosedError("every worker stopped while the pool shut down")
            )

    def _fail_queued(self, exc: Exception) -> None:
        for task in self.queue.drain():
            _fail(task, exc)

    def _replace(self, slot: Slot, graceful: bool = False) -> None:
        """Let the slot's process go (told to exit once idle when ``graceful``, else killed)
        and start a new one in its place: while shutting down, only if work still waits."""
        self._release(slot.process, graceful)
        self.queue.collect()
        if self._closed and not len(self.queue):  # nothing left for a new worker to do
            slot.state = State.DEAD
            self._check_available()
            return
        self._start_in(slot)

    def _start_in(self, slot: Slot) -> None:
        """Start a new process at ``slot``, keeping its counters. A failure to start (EMFILE,
        ENOMEM...) leaves the slot DEAD and retrying; it never stops the dispatcher."""
        new = None
        try:
            new = self._spawn(slot.index)
            self._watch(new, slot)
        except Exception as exc:
            if new is not None:
                self._unwatch(new)
                new.kill()
                new.close()
            self._slot_failed(
                slot, f"could not start a worker process: {type(exc).__name__}: {exc}"
            )
            return
        stats, previous = new.stats, slot.process.stats
        stats.restarts = previous.restarts + 1
        stats.retries = previous.retries
        stats.shards, stats.batches = previous.shards, previous.batches
        stats.rows, stats.busy_seconds = previous.rows, previous.busy_seconds
        slot.process = new
        slot.state = State.STARTING
        slot.timed_out = False
        slot.retry_at = None

    def _release(self, process: WorkerProcess, graceful: bool) -> None:
        """Let go of a replaced process now: its socket and arena are closed at once; the
        process is reaped as soon as its sentinel fires, and killed if it is still there
        ``RETIRE_SECONDS`` later (or at once unless ``graceful``)."""
        self._unwatch(process)
        if graceful:
            process.ask_to_exit()
        else:
            process.kill()
        process.release()
        if not process.alive():
            process.close()
            return
        try:
            self._selector.register(process.sentinel_fd, selectors.EVENT_READ, process)
        except (OSError, ValueError, KeyError):  # cannot watch it: do not leave it behind
            process.kill()
            process.close()
            return
        self.retired[process] = time.monotonic() + (RETIRE_SECONDS if graceful else 5.0)

    def _reap(self, process: WorkerProcess) -> None:
        """A released process has exited (or is overdue: killed): free its last handles."""
        self._unwatch(process)
        self.retired.pop(process, None)
        process.kill()
        process.close()

    def _tend(self) -> None:
        """Lifecycle chores of each loop turn: kill overdue retired processes, try DEAD slots
        again when their backoff is over, fail what waits if no worker can take it."""
        now = time.monotonic()
        for process, deadline in list(self.retired.items()):
            if now >= deadline:
                log.warning("worker pid %d did not exit when told to; killing it", process.pid)
                self._reap(process)
        if not self._closed and self._started:
            for slot in self.slots:
                if slot.state is not State.DEAD or slot.failure is None:
                    continue
                if slot.retry_at is None:  # failed just as start-up ended: treat it as a retry
                    slot.backoff = RETRY_SECONDS
                    slot.retry_at = now + slot.backoff
                elif now >= slot.retry_at:
                    self._start_in(slot)
        if self.unavailable is not None or self._closed:
            self._check_available()

    def _next_lifecycle_deadline(self) -> float | None:
        deadlines = list(self.retired.values())
        if not self._closed:
            deadlines += [s.retry_at for s in self.slots if s.retry_at is not None]
        return min(deadlines) if deadlines else None

    def _on_death(self, slot: Slot) -> None:
        """The slot's process died: requeue what it held (only the running batch is suspect)."""
        old = slot.process
        old.kill()
        if slot.state is State.STARTING:
            code = old.process.exitcode
            hint = (
                ""
                if self._started
                else '. In a script, create the pool under `if __name__ == "__main__":`: with '
                f"the {self._context.get_start_method()} start method every worker re-imports "
                "the main module (docs/guide.md, 'Start methods')"
            )
            self._on_load_failure(
                slot, f"a worker process exited while loading the model (exit code {code}){hint}"
            )
            return
        if slot.state is State.DEAD:
            return
        log.warning(
            "worker %d (pid %d) %s; restarting it",
            slot.index,
            old.stats.pid,
            "ran past the timeout" if slot.timed_out else "died",
        )
        requeue: list[Task] = []
        for position, batch in enumerate(slot.in_flight):
            if position > 0 or not batch.tasks:
                requeue.extend(batch.tasks)
            elif len(batch.tasks) > 1:  # a combined call: find the culprit by running alone
                for task in batch.tasks:
                    task.solo = True
                old.stats.retries += 1
                requeue.extend(batch.tasks)
            else:
                (task,) = batch.tasks
                task.attempts += 1
                if task.attempts > self._limits.max_retries:
                    _fail(task, self._give_up(task, slot.timed_out))
                else:
                    old.stats.retries += 1
                    requeue.append(task)
        slot.in_flight.clear()
        self.queue.requeue_front(requeue)
        self._replace(slot)

    def _give_up(self, task: Task, timed_out: bool) -> Exception:
        r, tries, retries = task.request, task.attempts, self._limits.max_retries
        if timed_out:
            return TimeoutError(
                f"rows {r.start}:{r.stop} ran past the timeout of {self._limits.timeout} s "
                f"on {tries} worker(s) (max_retries={retries})"
            )
        return WorkerCrashedError(
            f"rows {r.start}:{r.stop} killed their worker process {tries} time(s) "
            f"(max_retries={retries}); the pool has replaced the worker"
        )

    # --- results ----------------------------------------------------------------------------
    def _finish_head(self, slot: Slot, batch_id: int) -> InFlight:
        batch = slot.in_flight.popleft()
        if batch.batch_id != batch_id:
            raise RuntimeError(f"worker answered batch {batch_id}, expected {batch.batch_id}")
        if slot.in_flight:
            slot.in_flight[0].started = time.monotonic()
        return batch

    def _on_done(self, slot: Slot, message: BatchDone) -> None:
        batch = self._finish_head(slot, message.batch_id)
        outputs: dict[str, np.ndarray] = {}
        for name, value in message.outputs.items():
            if isinstance(value, ArenaRef):
                if batch.arena is None:
                    raise RuntimeError(f"output {name!r} is in an arena this batch did not use")
                outputs[name] = batch.arena.view(value)
            else:
                outputs[name] = value
        in_arena = {name for name, value in message.outputs.items() if isinstance(value, ArenaRef)}
        tasks = {id(t) for t in batch.tasks if not t.future.done()}
        if len(batch.tasks) > 1 and any(
            np.ndim(v) == 0 or len(v) != batch.rows for v in outputs.values()
        ):
            # Outputs without a batch axis cannot be split between shards: run them alone.
            rerun = [t for t in batch.tasks if id(t) in tasks]
            for task in rerun:
                task.solo = True
            self.queue.requeue_front(rerun)
            tasks = set()
        stats = slot.process.stats
        stats.batches += 1
        stats.shards += len(batch.tasks)
        stats.rows += batch.rows
        stats.busy_seconds += message.busy_seconds
        slot.process.shards_done += len(batch.tasks)
        if len(batch.tasks) == 1 and tasks:
            (task,) = batch.tasks
            error = sharding.wrong_rows_error(outputs, task.request, self._model)
            if error is not None:
                tasks = set()
                _fail(task, error)
        start = 0
        for task in batch.tasks:
            stop = start + task.rows
            if id(task) in tasks:
                own = {}
                for name, value in outputs.items():
                    part = value if len(batch.tasks) == 1 else value[start:stop]
                    own[name] = np.array(part) if name in in_arena else part
                _resolve(task, own)
            start = stop
        del outputs
        self._maybe_retire(slot)

    def _on_failed(self, slot: Slot, message: BatchFailed) -> None:
        batch = self._finish_head(slot, message.batch_id)
        if len(batch.tasks) > 1:  # isolate: every shard re-runs alone, in order
            for task in batch.tasks:
                task.solo = True
            self.queue.requeue_front([t for t in batch.tasks if not t.future.done()])
        else:
            (task,) = batch.tasks
            r = task.request
            _fail(
                task,
                WorkerError(
                    f"rows {r.start}:{r.stop}: the model raised {message.error}",
                    message.traceback,
                    message.error_type,
                ),
            )
        self._maybe_retire(slot)

    def _maybe_retire(self, slot: Slot) -> None:
        limits, process = self._limits, slot.process
        if slot.state is State.READY:  # also while shutting down: it must not keep room 0
            too_many = limits.max_shards_per_worker is not None and (
                process.shards_done >= limits.max_shards_per_worker
            )
            too_big = limits.max_worker_memory is not None and (
                process.rss_bytes() > limits.max_worker_memory
            )
            if too_many or too_big:
                log.info(
                    "retiring worker %d (pid %d): %s",
                    slot.index,
                    process.stats.pid,
                    "max_shards_per_worker" if too_many else "max_worker_memory",
                )
                slot.state = State.RETIRING
        if slot.state is State.RETIRING and not slot.in_flight:
            self._replace(slot, graceful=True)  # told to exit; reaped when its sentinel fires

    # --- dispatch ---------------------------------------------------------------------------
    def _pump(self) -> None:
        if self._stop:
            return
        self.queue.collect()
        while len(self.queue):
            # A worker running one call takes a second only when what waits fills a whole
            # batch: then it never waits for the parent between calls. Otherwise new arrivals
            # wait for the next free worker and combine into larger calls.
            depth = transport.REGIONS if self.queue.full_batch_waiting() else 1
            open_slots = [
                s for s in self.slots if s.state is State.READY and len(s.in_flight) < depth
            ]
            if not open_slots:
                return
            slot = min(open_slots, key=lambda s: (len(s.in_flight), s.index))
            if not self._send_next(slot, takers=len(open_slots)):
                return

    def _room(self, slot: Slot) -> int | None:
        limit = self._limits.max_shards_per_worker
        if limit is None:
            return None
        held = sum(len(b.tasks) for b in slot.in_flight)
        return limit - slot.process.shards_done - held

    def _send_next(self, slot: Slot, takers: int) -> bool:
        """Form and send the next batch to ``slot``; ``False`` if nothing should go now."""
        tasks = self.queue.take(takers, max_shards=self._room(slot))
        if tasks is None:
            return False
        tasks = [t for t in tasks if t.future.running() or t.future.set_running_or_notify_cancel()]
        if not tasks:
            return True
        busy = bool(slot.in_flight)
        process = slot.process
        if not busy:
            self._grow_arena(slot, tasks)
        arena = process.arena
        region = None
        if arena is not None:
            used = {b.region for b in slot.in_flight if b.arena is arena}
            region = next(i for i in range(transport.REGIONS) if i not in used)
        inputs, carried_bytes, out_region = _pack(tasks, arena, region)
        if busy and carried_bytes > SMALL_MESSAGE_BYTES:
            self.queue.requeue_front(tasks)  # a large message waits for an idle worker
            return False
        rows = sum(t.rows for t in tasks)
        batch = InFlight(next(self._batch_ids), tasks, rows, arena, region)
        try:
            transport.send(process.conn, Batch(batch.batch_id, inputs, out_region))
        except OSError:  # the worker died: its sentinel fires next; re-run what it held
            self.queue.requeue_front(tasks)
            return False
        if carried_bytes:
            self.batches_on_socket += 1
        else:
            self.batches_in_arena += 1
        if not slot.in_flight:
            batch.started = time.monotonic()
        slot.in_flight.append(batch)
        return True

    def _grow_arena(self, slot: Slot, tasks: list[Task]) -> None:
        """Give an idle worker a larger arena when this batch would not fit its region."""
        process = slot.process
        if process.arena is None:
            return
        needed = 2 * sum(transport.align(t.nbytes) + transport.ALIGN for t in tasks)
        if needed <= process.arena.region_size:
            return
        size = transport.REGIONS * (1 << max(needed - 1, 1).bit_length())
        if size > MAX_ARENA_BYTES:
            return
        arena = transport.create(size)
        if arena is None:
            return
        try:
            transport.send_arena(process.conn, arena, process.process.pid)
        except OSError:
            arena.close()
            return
        process.arena.close()
        process.arena = arena

    def _check_deadlines(self) -> None:
        timeout = self._limits.timeout
        if timeout is None:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.state in (State.READY, State.RETIRING) and slot.in_flight:
                if not slot.timed_out and now - slot.in_flight[0].started > timeout:
                    slot.timed_out = True
                    slot.process.process.kill()  # its sentinel fires: handled as a death

    def _fail_all(self, exc: Exception) -> None:
        tasks = self.queue.drain() + [t for s in self.slots for b in s.in_flight for t in b.tasks]
        for slot in self.slots:
            slot.in_flight.clear()
        for task in tasks:  # a PoolError, never CancelledError: the caller did not cancel
            _fail(task, exc)


def _pack(
    tasks: list[Task], arena: transport.Arena | None, region: int | None
) -> tuple[dict[str, Carried], int, tuple[int, int] | None]:
    """The batch's inputs: numeric ones concatenated into the arena region when they fit,
    the rest carried in the message. Returns ``(inputs, bytes carried, output region)``."""
    first = tasks[0].request.inputs
    start, end = arena.region(region) if arena is not None and region is not None else (0, 0)
    inputs: dict[str, Carried] = {}
    carried = 0
    for name in first:
        arrays = [t.request.inputs[name] for t in tasks]
        placed = None
        if arena is not None and end and arrays[0].dtype != object:
            placed = arena.put(arrays, start, end)
        if placed is None:
            value = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
            inputs[name] = value
            carried += value.nbytes if value.dtype != object else sum(t.nbytes for t in tasks)
        else:
            inputs[name], start = placed
    return inputs, carried, ((start, end) if end else None)


def _resolve(task: Task, outputs: dict) -> None:
    if task.future.done():
        return
    if task.finish is None:
        _settle(task, outputs)
        return
    try:
        result = task.finish(outputs)
    except BaseException as exc:
        _settle(task, exc=exc)
    else:
        _settle(task, result)


def _fail(task: Task, exc: BaseException) -> None:
    if not task.future.done():
        _settle(task, exc=exc)


def _settle(task: Task, result: Any = None, exc: BaseException | None = None) -> None:
    """Complete a shard's future. Its callbacks run here only if they are the pool's own (a
    caller's are handed to the callback thread); whatever they raise, this thread goes on."""
    try:
        if exc is not None:
            task.future.set_exception(exc)
        else:
            task.future.set_result(result)
    except BaseException:
        log.exception("completing rows %d:%d failed", task.request.start, task.request.stop)
