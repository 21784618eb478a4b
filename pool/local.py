"""The local backend: worker processes on this machine, scheduled by one dispatcher thread.

``LocalBackend.start`` starts one worker process per position (pinned to its CPUs), waits for
every one to load the model at once, then hands them to the :class:`pool.dispatcher.Dispatcher`.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import replace

import psutil

from .backend import Settings, local_model_path
from .dispatcher import Dispatcher
from .errors import ModelLoadError
from .messages import ShardRequest, WorkerConfig, WorkerReady, WorkerStats
from .process import WorkerProcess, cpus_for, make_context

log = logging.getLogger("pool")


class LocalBackend:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._context = make_context(settings.start_method)
        self._dispatcher: Dispatcher | None = None

    def start(self) -> list[WorkerReady]:
        settings = self._settings
        model = local_model_path(settings.model)
        if isinstance(model, str) and "://" in model:
            from . import model as model_module  # imports TensorFlow: remote handles only

            model = model_module.resolve(model)
        me = psutil.Process()
        config = settings.worker_config(model, me.pid, me.create_time())
        processes: list[WorkerProcess] = []
        try:
            for index in range(settings.workers):
                processes.append(self._new_process(index, config))
            ready = self._wait_ready(processes)
        except BaseException:
            for p in processes:
                p.shutdown(kill=True)
            raise
        for p, r in zip(processes, ready, strict=True):
            p.mark_ready(r)
        self._dispatcher = Dispatcher(processes, settings, self._restart)
        return ready

    def _new_process(self, index: int, config: WorkerConfig) -> WorkerProcess:
        s = self._settings
        if s.pin_cpus and s.allowed_cpus:
            config = replace(config, cpus=cpus_for(index, s.threads_per_worker, s.allowed_cpus))
        return WorkerProcess(index, config, self._context)

    def _restart(self, old: WorkerProcess) -> WorkerProcess:
        return WorkerProcess(old.index, old.config, self._context)

    def _wait_ready(self, processes: list[WorkerProcess]) -> list[WorkerReady]:
        futures = [p.ready_future for p in processes]
        timeout = self._settings.start_timeout
        done, _ = wait_futures(futures, timeout=timeout, return_when="FIRST_EXCEPTION")
        for f in futures:
            if f in done and f.exception() is not None:
                exc = f.exception()
                if isinstance(exc, ModelLoadError):
                    raise ModelLoadError(str(exc)) from None
                raise ModelLoadError(
                    f"a worker process exited while loading the model ({exc}). In a script, "
                    'create the pool under `if __name__ == "__main__":`: with the '
                    f"{self._context.get_start_method()} start method every worker re-imports "
                    "the main module (docs/guide.md, 'Start methods')"
                ) from exc
        if len(done) < len(futures):
            raise ModelLoadError(f"workers did not load the model within start_timeout={timeout} s")
        return [f.result() for f in futures]

    def submit(self, requests: list[ShardRequest]) -> list[Future]:
        assert self._dispatcher is not None
        return self._dispatcher.submit(requests)

    def stats(self) -> list[WorkerStats]:
        assert self._dispatcher is not None
        records = []
        for slot in self._dispatcher.slots:
            record = replace(slot.process.stats)
            record.rss_bytes = slot.process.rss_bytes()
            records.append(record)
        return records

    def worker_pids(self) -> list[int]:
        assert self._dispatcher is not None
        return [pid for slot in self._dispatcher.slots for pid in slot.process.pids()]

    def queued_requests(self) -> int:
        assert self._dispatcher is not None
        return self._dispatcher.queued_requests()

    def shutdown(self, kill: bool) -> None:
        dispatcher = self._dispatcher
        if dispatcher is None:
            return
        try:
            dispatcher.stop(kill=kill)
        finally:
            for process in [s.process for s in dispatcher.slots] + dispatcher.retired:
                process.shutdown(kill=kill)
