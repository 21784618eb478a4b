"""What the server lets a request hold: bytes of request bodies being parsed at once.

    request ─ reserve Content-Length bytes ──▶ wait in FIFO order while the budget is full
              (at most until the request's deadline; then 503)
            ─ read the body, gunzip it ─ grow the reservation as bytes arrive (chunked bodies,
              decompression); growth never waits: past the budget, 503
            ─ parse JSON into arrays ─ release: the next waiter goes

JSON parsing takes several times a body's size in memory (Python objects for every number and
string before they become arrays: measured 4-17x for ordinary bodies, ~27x for a body made of
one-value lists; docs/serving.md "Limits"), so the server's parse memory is bounded by bounding
the bytes being parsed at once (``max_parse_bytes``), whatever the number of clients. Bodies
wait before they are read, so a waiting request holds no more than what the kernel and uvicorn
buffer for its connection (64 KiB).

The budget is used from the event loop; :meth:`Reservation.grow_to` may also be called from a
worker thread (decompression runs there), hence the lock.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

#: Defaults of :func:`pool.serve.create_app`, :func:`pool.serve.serve` and ``python -m pool
#: serve`` (here, where the command line can import them without a web framework).
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_MAX_BODY_BYTES = 64 << 20
DEFAULT_MAX_CONCURRENT_REQUESTS = 256
DEFAULT_BODY_TIMEOUT = 30.0


class ParseBudget:
    """At most ``limit`` bytes of request bodies held for parsing at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    def try_take(self, size: int) -> bool:
        """Take ``size`` bytes now if they fit (any thread)."""
        with self._lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            return True

    async def take(self, size: int, timeout: float | None) -> bool:
        """Take ``size`` bytes, waiting behind earlier requests for at most ``timeout``
        seconds (``None``: no bound); ``False`` if they could not be had in time."""
        if size > self.limit:
            return False
        if not self._waiting and self.try_take(size):
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiting.append(entry)
        granted = False
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
            granted = True
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            if not granted:  # timed out, or the request was cancelled while it waited
                if future.done() and not future.cancelled():  # granted meanwhile: give back
                    with self._lock:
                        self.used -= size
                future.cancel()
                if entry in self._waiting:
                    self._waiting.remove(entry)
                self._grant()  # it may have been blocking smaller requests behind it

    def give(self, size: int) -> None:
        """Give back ``size`` bytes (event loop) and let the waiters that now fit go."""
        if size:
            with self._lock:
                self.used -= size
            self._grant()

    def _grant(self) -> None:
        while self._waiting:
            size, future = self._waiting[0]
            if future.done():
                self._waiting.popleft()
                continue
            if not self.try_take(size):
                return
            self._waiting.popleft()
            future.set_result(None)


class Reservation:
    """One request's share of a :class:`ParseBudget`: taken, grown, and given back once."""

    def __init__(self, budget: ParseBudget) -> None:
        self.budget = budget
        self.held = 0
        self._lock = threading.Lock()

    async def take(self, size: int, timeout: float | None) -> bool:
        if not await self.budget.take(size, timeout):
            return False
        self.held += size
        return True

    def grow_to(self, size: int) -> bool:
        """Hold at least ``size`` bytes in all; ``False`` (nothing taken) if they do not fit.
        Never waits: the caller holds bytes already, and waiting on others could deadlock."""
        with self._lock:
            more = size - self.held
            if more <= 0:
                return True
            if not self.budget.try_take(more):
                return False
            self.held = size
            return True

    def release(self) -> None:
        with self._lock:
            held, self.held = self.held, 0
        self.budget.give(held)
