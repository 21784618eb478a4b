"""Parent-side handle of one worker process: a single-worker ``ProcessPoolExecutor``.

One executor per worker (rather than one N-worker executor) is what lets each worker be pinned
to its own CPUs, be counted in its own stats, and be replaced alone when it dies: a dead worker
breaks only its own executor. See docs/design.md.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing.context import BaseContext

import psutil

from . import worker
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


class WorkerProcess:
    """One worker: its executor, its stats, and the shards it holds (owned by the dispatcher)."""

    def __init__(self, index: int, config: WorkerConfig, context: BaseContext) -> None:
        self.index = index
        self.config = config
        self.executor = ProcessPoolExecutor(
            max_workers=1,
            mp_context=context,
            initializer=worker.initialize,
            initargs=(config,),
        )
        self.ready_future: Future[WorkerReady] = self.executor.submit(worker.describe)
        self.stats = WorkerStats(worker=index, pid=0, load_seconds=0.0, loads=0, cpus=config.cpus)
        self.shards_done = 0  # by this process (stats.shards counts across replacements)

    def mark_ready(self, ready: WorkerReady) -> None:
        self.stats.pid = ready.pid
        self.stats.load_seconds = ready.load_seconds
        self.stats.loads = ready.loads

    def pids(self) -> list[int]:
        processes = getattr(self.executor, "_processes", None) or {}
        return list(processes)

    def rss_bytes(self) -> int:
        try:
            return psutil.Process(self.stats.pid).memory_info().rss if self.stats.pid else 0
        except psutil.Error:
            return 0

    def alive(self) -> bool:
        """Whether the worker process still runs (a zombie or a vanished pid does not)."""
        for pid in self.pids():
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return True
            except psutil.Error:
                pass
        return False

    def kill(self) -> None:
        """Kill the worker process now (it may be mid-shard); its futures fail."""
        processes = []
        for pid in self.pids():
            try:
                process = psutil.Process(pid)
                process.kill()
                processes.append(process)
            except psutil.Error:
                pass
        psutil.wait_procs(processes, timeout=5)
        self.release_result_pipe()

    def release_result_pipe(self) -> None:
        """Close the parent's copy of the write end of the executor's result pipe.

        CPython's ``ProcessPoolExecutor`` keeps that copy open, so when a worker dies halfway
        through sending a result, the executor's thread waits forever for the rest of the
        message and never reports the death. Call this only once the worker is dead: the
        reader then gets end-of-file, and the executor breaks as it does for any other death.
        """
        result_queue = getattr(self.executor, "_result_queue", None)
        writer = getattr(result_queue, "_writer", None)
        if writer is not None:
            writer.close()

    def shutdown(self, kill: bool = False, wait: bool = True) -> None:
        if kill:
            self.kill()
        self.executor.shutdown(wait=wait, cancel_futures=True)


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
