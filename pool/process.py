"""Parent-side handle of one worker process: the process, its socket and its arena.

One process per worker position, each with its own channel, is what lets each worker be pinned
to its own CPUs, be counted in its own stats, and be replaced alone when it dies. The start
method never forks a process that has TensorFlow loaded. See docs/design.md.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from multiprocessing.context import BaseContext

import psutil

from . import transport, worker
from .messages import WorkerConfig, WorkerReady, WorkerStats

log = logging.getLogger("pool")

START_METHODS = ("forkserver", "spawn")


def default_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def make_context(start_method: str | None) -> BaseContext:
    """A multiprocessing context that never forks a process with TensorFlow loaded."""
    method = start_method or default_start_method()
    if method not in START_METHODS:
        raise ValueError(
            f"start_method must be one of {START_METHODS} (fork is not safe with TensorFlow), "
            f"got {method!r}"
        )
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        # Import TensorFlow once in the fork server, before any TensorFlow runtime starts there,
        # so each worker forks with it already imported. No effect if the server already runs.
        context.set_forkserver_preload(["pool._forkserver_preload"])
    return context


#: The name of worker process ``i`` is ``f"{WORKER_NAME}{i}"`` (multiprocessing sets it in the
#: child before the child re-imports the main module).
WORKER_NAME = "pool-worker-"


def bootstrapping_worker() -> bool:
    """Whether this process is one of the pool's workers, i.e. a pool is being started while a
    worker re-imports a main module that has no ``if __name__ == "__main__":`` guard."""
    return multiprocessing.current_process().name.startswith(WORKER_NAME)


class WorkerProcess:
    """One worker process, its end of the socket pair, its arena, and its stats.

    Owned by the dispatcher's manager thread: nothing else sends on ``conn``."""

    def __init__(
        self, index: int, config: WorkerConfig, context: BaseContext, arena_bytes: int
    ) -> None:
        self.index = index
        self.config = config
        self.conn, child = context.Pipe(duplex=True)
        try:
            self.process = context.Process(  # type: ignore[attr-defined]
                target=worker.main, args=(config, child), name=f"{WORKER_NAME}{index}", daemon=True
            )
            self.process.start()
        except BaseException:  # EMFILE, a factory that cannot be pickled...: leave nothing open
            self.conn.close()
            child.close()
            raise
        self.pid: int = self.process.pid
        child.close()
        # Kept so that the dispatcher can stop watching them after they are closed.
        self.conn_fd: int = self.conn.fileno()
        self.sentinel_fd: int = self.process.sentinel
        self.arena = transport.create(arena_bytes) if arena_bytes else None
        if self.arena is not None:
            try:
                transport.send_arena(self.conn, self.arena, self.pid)
            except OSError:  # the process died at once: noticed through its sentinel
                pass
        self.stats = WorkerStats(worker=index, pid=self.process.pid, load_seconds=0.0, loads=0)
        self.stats.cpus = config.cpus
        self.shards_done = 0  # by this process (stats.shards counts across replacements)
        self.ready: WorkerReady | None = None

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    def mark_ready(self, ready: WorkerReady) -> None:
        self.ready = ready
        self.stats.pid = ready.pid
        self.stats.load_seconds = ready.load_seconds
        self.stats.loads = ready.loads

    def pids(self) -> list[int]:
        return [self.pid] if self.alive() else []

    def rss_bytes(self) -> int:
        try:
            return psutil.Process(self.pid).memory_info().rss if self.alive() else 0
        except (psutil.Error, OSError):  # gone, or no descriptor left to read /proc (EMFILE)
            return 0

    def alive(self) -> bool:
        try:
            return self.process.exitcode is None and self.process.is_alive()
        except ValueError:  # closed: it was reaped
            return False

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the process to exit (no-op once reaped)."""
        if self.alive():
            self.process.join(timeout)

    def kill(self) -> None:
        """Kill the worker process now (it may be mid-batch) and reap it."""
        if self.alive():
            try:
                self.process.kill()
            except (OSError, ValueError):
                pass
            self.process.join(5)

    def ask_to_exit(self) -> None:
        """Tell the worker to exit once idle (it reads ``None`` after what it holds)."""
        if self.alive():
            try:
                transport.send(self.conn, None)
            except (OSError, ValueError):
                pass

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the worker to exit once idle, wait for it (then kill it), free everything."""
        if self.alive():
            self.ask_to_exit()
            self.process.join(timeout)
        self.kill()
        self.close()

    def release(self) -> None:
        """Close the parent's socket end and arena; the process may still be exiting.
        Idempotent."""
        self.conn.close()
        if self.arena is not None:
            self.arena.close()
            self.arena = None

    def close(self) -> None:
        """Release everything: socket end, arena, and (once it has exited) the process's own
        handles. Idempotent."""
        self.release()
        if not self.alive():
            try:
                self.process.close()
            except ValueError:
                pass


def cpus_for(index: int, threads: int, allowed: list[int]) -> tuple[int, ...]:
    """The CPUs of worker ``index``: ``threads`` consecutive allowed CPUs, wrapping around."""
    return tuple(allowed[(index * threads + k) % len(allowed)] for k in range(threads))


def allowed_cpus() -> list[int] | None:
    """CPUs this process may run on, or ``None`` where the OS has no affinity API."""
    if not hasattr(psutil.Process, "cpu_affinity") or sys.platform == "darwin":
        return None
    try:
        return sorted(psutil.Process().cpu_affinity())
    except (psutil.Error, OSError):
        return None


def default_workers() -> int:
    """Physical cores this process may use: the affinity mask, capped by physical cores."""
    allowed = allowed_cpus()
    usable = len(allowed) if allowed else (psutil.cpu_count(logical=True) or 1)
    physical = psutil.cpu_count(logical=False) or usable
    logical = psutil.cpu_count(logical=True) or usable
    # With hyper-threading, `usable` logical CPUs hold about usable * physical / logical cores.
    return max(1, min(usable, round(usable * physical / logical)))
