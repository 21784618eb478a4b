"""The pool's futures, and where their done-callbacks run.

The dispatcher thread completes the pool's futures. A plain ``concurrent.futures.Future`` runs
its done-callbacks in the thread that completes it, so a caller's callback would run *on the
dispatcher*: one that calls ``predict()`` waits for the very thread it blocks (a deadlock), and
one that raises ``SystemExit`` (any ``BaseException``: ``Future`` only catches ``Exception``)
ends it. :class:`PoolFuture` runs a callback added before the future completes on one callback
thread per process instead; the pool's own callbacks, added with
:meth:`PoolFuture.add_inline_callback`, stay inline, and so does asyncio's bridge
(``asyncio.wrap_future``), which only schedules onto its event loop::

    dispatcher ──set_result──▶ PoolFuture ──inline──▶ pool's callbacks, asyncio's bridge
                                          └─queue──▶ pool-callbacks thread ──▶ caller's callbacks

A future with no caller's callback (``predict``, ``imap``, the server) costs nothing more: no
hand-off, no wake-up of another thread. A callback added once the future is done runs at once
in the thread that adds it, as for any ``Future``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from queue import SimpleQueue
from typing import Any

log = logging.getLogger("pool")

Callback = Callable[[Future], object]


class CallbackThread:
    """One daemon thread per process that runs handed-off callbacks in order; whatever a
    callback raises (``SystemExit`` included) is logged and the thread goes on."""

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):  # a forked child starts with no thread, no queue
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._queue: SimpleQueue[tuple[Callback, Any]] = SimpleQueue()
        self._thread: threading.Thread | None = None

    def post(self, fn: Callback, future: Any) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    thread = threading.Thread(target=self._run, name="pool-callbacks", daemon=True)
                    thread.start()
                    self._thread = thread
        self._queue.put((fn, future))

    def _run(self) -> None:
        queue = self._queue
        while True:
            fn, future = queue.get()
            try:
                fn(future)
            except BaseException:  # a caller's callback must not end the thread
                log.exception("exception calling callback for %r", future)
            del fn, future

    def in_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every callback posted so far has run (``False``: timed out, or called
        from a callback, which cannot wait for itself)."""
        if self._thread is None:
            return True
        if self.in_thread():
            return False
        done = threading.Event()
        self.post(lambda _: done.set(), None)
        return done.wait(timeout)


CALLBACKS = CallbackThread()


def _is_asyncio_bridge(fn: Callback) -> bool:
    """``asyncio.wrap_future``'s callback: it only schedules onto its event loop, never blocks."""
    return getattr(fn, "__module__", None) == "asyncio.futures" and getattr(
        fn, "__qualname__", ""
    ).endswith("._call_set_state")


class _HandOff:
    """A caller's callback, run on the callback thread when the future completes."""

    __slots__ = ("fn", "adder", "registered")

    def __init__(self, fn: Callback) -> None:
        self.fn = fn
        self.adder = threading.get_ident()
        self.registered = False

    def __call__(self, future: Future) -> None:
        if not self.registered and threading.get_ident() == self.adder:
            self.fn(future)  # the future was done already: at once, in the adding thread
        else:
            CALLBACKS.post(self.fn, future)


class PoolFuture(Future):
    """A ``concurrent.futures.Future`` whose callers' callbacks never run on the dispatcher."""

    def add_done_callback(self, fn: Callback) -> None:
        if _is_asyncio_bridge(fn):
            super().add_done_callback(fn)
            return
        handoff = _HandOff(fn)
        super().add_done_callback(handoff)
        handoff.registered = True

    def add_inline_callback(self, fn: Callback) -> None:
        """For the pool's own callbacks: run in the thread that completes the future (often the
        dispatcher), so they must be quick, never block and never raise."""
        super().add_done_callback(fn)
