"""The batch queue: shards waiting for a worker, and how they are combined into model calls.

Contract (the dispatcher's manager thread is the only one that takes from the queue):

- **What a batch is.** The longest run of waiting shards, oldest first, that fits in one model
  call: at most ``max_batch_rows`` rows and ``max_batch_bytes`` of input, inputs of the same
  dtypes and trailing shapes, and no more than a fair share of what waits (the waiting rows
  divided by the workers that could take them, never less than one shard), so that combining
  never leaves a worker idle while another holds a long batch. A shard larger than the budget
  is a batch alone; shards are never split.
- **When a batch is closed.** At once when a worker has room (``batch_timeout_micros=0``, the
  default, as TensorFlow Serving advises for CPUs): a lone caller never waits for company, and
  only work already waiting is combined. With ``batch_timeout_micros > 0``, a batch smaller
  than ``max_batch_rows`` waits until its oldest shard has waited that long.
- **Order.** Shards leave in the order they arrived (a re-run goes back to the front). Every
  shard's future receives exactly its own rows, in order, whichever batch carried it.
- **Failure isolation.** A shard that was part of a failed combined call is marked ``solo`` and
  re-run alone, so one caller's bad rows fail only that caller.
- **Overload.** ``max_queued_requests`` bounds the calls with shards waiting; past it a new
  call is refused at once with :class:`pool.errors.QueueFullError` (never blocked, never
  queued without bound).
- **Cancellation.** A cancelled shard is dropped when the queue next looks at it and never
  blocks the shards behind it; a call whose shards were all cancelled no longer counts as
  queued.
- **Futures.** Each shard's future is a :class:`pool.futures.PoolFuture`: the queue's own
  cancel callback runs inline and holds its task only weakly (a strong reference would make a
  future → callback → task → future cycle that keeps the inputs and outputs alive until the
  cycle collector runs); a caller's callbacks run on the callback thread, never on the
  dispatcher.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import Batching
from .errors import PoolClosedError, QueueFullError
from .futures import PoolFuture
from .messages import ShardRequest


def input_key(inputs: dict[str, np.ndarray]) -> tuple:
    """Shards can share a model call only when their inputs agree on this key."""
    return tuple((name, a.dtype.str, a.shape[1:]) for name, a in inputs.items())


def input_bytes(inputs: dict[str, np.ndarray]) -> int:
    """Bytes of input, counting a string as its length plus a small overhead."""
    total = 0
    for array in inputs.values():
        if array.dtype == object:
            total += sum(len(s) + 16 for s in array.flat)
        else:
            total += array.nbytes
    return total


class Call:
    """One ``submit``/``predict`` (or one ``imap`` batch): counts its shards still waiting."""

    __slots__ = ("waiting",)

    def __init__(self, shards: int) -> None:
        self.waiting = shards


@dataclass(eq=False)
class Task:
    """One shard of one call, until its result reaches the caller."""

    request: ShardRequest
    future: PoolFuture
    call: Call
    key: tuple
    rows: int
    nbytes: int
    queued_at: float = 0.0
    attempts: int = 0  # worker deaths (or timeouts) this shard caused while running alone
    solo: bool = False  # run alone: it was part of a combined call that failed
    finish: Callable[[dict[str, np.ndarray]], Any] | None = None  # applied to the outputs
    counted: bool = field(default=True)  # still counted in its call's ``waiting``


class BatchQueue:
    """Shards waiting for a worker, in arrival order; thread-safe ``put``, one taker."""

    def __init__(self, options: Batching, wake: Callable[[], None]) -> None:
        self._options = options
        self._wake = wake
        self._lock = threading.Lock()
        self._inbox: list[Task] = []  # put by callers, moved to _tasks by the taker
        self._tasks: deque[Task] = deque()
        self._queued_calls = 0
        self._closed = False
        self.rows = 0  # rows in _tasks (the taker's view)
        self.nbytes = 0  # input bytes in _tasks

    # --- callers' side ----------------------------------------------------------------------
    def put(
        self,
        requests: Iterable[ShardRequest],
        bounded: bool = True,
        finish: Callable[[dict[str, np.ndarray]], Any] | None = None,
        solo: bool = False,
    ) -> list[PoolFuture]:
        """Queue the shards of one call; when ``bounded``, refuse the call whole if the queue
        is full (an unbounded call is counted all the same). ``solo``: each runs alone (a
        shard already known to have been in a failed combined call)."""
        requests = list(requests)
        call = Call(len(requests))
        now = time.monotonic()
        tasks = []
        for request in requests:
            future = PoolFuture()
            rows = request.stop - request.start
            task = Task(
                request=request,
                future=future,
                call=call,
                key=input_key(request.inputs),
                rows=rows,
                nbytes=input_bytes(request.inputs),
                queued_at=now,
                finish=finish,
                solo=solo,
            )
            future.add_inline_callback(self._on_cancel(task))
            tasks.append(task)
        limit = self._options.max_queued_requests
        with self._lock:
            if self._closed:
                raise PoolClosedError("the pool is shut down; start a new PredictionPool")
            if bounded and limit is not None and self._queued_calls >= limit:
                raise QueueFullError(
                    f"max_queued_requests={limit} calls are already waiting for a worker; "
                    "retry later"
                )
            self._queued_calls += 1
            self._inbox.extend(tasks)
        self._wake()
        return [t.future for t in tasks]

    def close(self) -> None:
        """Refuse every later ``put`` (the pool is shutting down)."""
        with self._lock:
            self._closed = True

    def queued_calls(self) -> int:
        return self._queued_calls

    def _on_cancel(self, task: Task) -> Callable[[Future], None]:
        ref = weakref.ref(task)  # the future holds this callback: no cycle through the task

        def callback(future: Future) -> None:
            if future.cancelled():
                cancelled = ref()
                if cancelled is not None:  # else it already left the queue and was released
                    self.release(cancelled)
                self._wake()

        return callback

    def release(self, task: Task) -> None:
        """The task left the queue (taken, cancelled or failed): uncount it from its call."""
        with self._lock:
            if not task.counted:
                return
            task.counted = False
            task.call.waiting -= 1
            if task.call.waiting == 0:
                self._queued_calls -= 1

    # --- the taker's side (the dispatcher's manager thread) ----------------------------------
    def collect(self) -> None:
        """Move what callers put into the queue the taker reads."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for task in inbox:
            self._tasks.append(task)
            self.rows += task.rows
            self.nbytes += task.nbytes

    def requeue_front(self, tasks: list[Task]) -> None:
        """Put re-run shards back at the front, keeping their order."""
        for task in reversed(tasks):
            self._tasks.appendleft(task)
            self.rows += task.rows
            self.nbytes += task.nbytes
            with self._lock:
                if not task.counted:
                    task.counted = True
                    task.call.waiting += 1
                    if task.call.waiting == 1:
                        self._queued_calls += 1

    def __len__(self) -> int:
        return len(self._tasks)

    def _pop_cancelled(self) -> None:
        while self._tasks and self._tasks[0].future.cancelled():
            task = self._tasks.popleft()
            self.rows -= task.rows
            self.nbytes -= task.nbytes
            self.release(task)

    def purge_cancelled(self) -> None:
        """Drop every cancelled shard now (a cancel wakes the taker to call this)."""
        if not any(t.future.cancelled() for t in self._tasks):
            return
        kept: deque[Task] = deque()
        for task in self._tasks:
            if task.future.cancelled():
                self.rows -= task.rows
                self.nbytes -= task.nbytes
                self.release(task)
            else:
                kept.append(task)
        self._tasks = kept

    def take(
        self, takers: int, max_shards: int | None = None, now: float | None = None
    ) -> list[Task] | None:
        """The next batch for one worker, or ``None`` (nothing waits, or it should wait).

        ``takers`` is how many workers could take work now (for the fair share);
        ``max_shards`` caps the shards (a worker about to be recycled)."""
        self._pop_cancelled()
        if not self._tasks or (max_shards is not None and max_shards <= 0):
            return None
        options = self._options
        tasks = self._tasks
        first = tasks.popleft()
        batch = [first]
        rows, nbytes = first.rows, first.nbytes
        if not first.solo:
            share = max(first.rows, math.ceil(self.rows / max(1, takers)))
            limit_rows = min(options.max_batch_rows, share)
            while tasks and (max_shards is None or len(batch) < max_shards):
                task = tasks[0]
                if task.future.cancelled():
                    tasks.popleft()
                    self.rows -= task.rows
                    self.nbytes -= task.nbytes
                    self.release(task)
                    continue
                if (
                    task.solo
                    or task.key != first.key
                    or rows + task.rows > limit_rows
                    or nbytes + task.nbytes > options.max_batch_bytes
                ):
                    break
                batch.append(tasks.popleft())
                rows += task.rows
                nbytes += task.nbytes
            if options.batch_timeout_micros and rows < options.max_batch_rows:
                now = time.monotonic() if now is None else now
                if now - first.queued_at < options.batch_timeout_micros / 1e6:
                    tasks.extendleft(reversed(batch))
                    return None
        self.rows -= rows
        self.nbytes -= nbytes
        for task in batch:
            self.release(task)
        return batch

    def full_batch_waiting(self) -> bool:
        """Whether what waits fills at least one batch (by rows or by bytes)."""
        return self.rows >= self._options.max_batch_rows or (
            self.nbytes >= self._options.max_batch_bytes
        )

    def next_deadline(self) -> float | None:
        """When the oldest waiting shard's batch timeout ends (``None``: no timeout set)."""
        if not self._options.batch_timeout_micros or not self._tasks:
            return None
        return self._tasks[0].queued_at + self._options.batch_timeout_micros / 1e6

    def drain(self) -> list[Task]:
        """Remove and return everything (shutdown)."""
        self.collect()
        tasks = list(self._tasks)
        self._tasks.clear()
        self.rows = 0
        self.nbytes = 0
        for task in tasks:
            self.release(task)
        return tasks
