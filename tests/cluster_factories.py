"""Model factories for tests/test_cluster.py (Dask workers import them by name)."""

from __future__ import annotations

import contextlib
import os
import pickle
import time
from collections.abc import Iterator
from typing import Any

import dask
import distributed
import factories
from distributed.diagnostics.plugin import SchedulerPlugin


def slow_double(seconds: float = 8.0):
    """A factory that takes ``seconds`` to load, then doubles its input."""
    time.sleep(seconds)
    return factories.plain_double()


class LoggedDouble:
    """A factory (for file jobs on the cluster): its model doubles its input after ``delay``
    seconds per call and, with ``log``, appends every row it saw to that file, one line
    ``PID VALUE`` per row. Its ``repr`` is stable across processes, so a resumed job names
    the same model."""

    def __init__(self, log: str | None = None, delay: float = 0.0) -> None:
        self.log, self.delay = log, delay

    def __repr__(self) -> str:
        return f"LoggedDouble({self.log!r}, {self.delay!r})"

    def __call__(self):
        import os

        import numpy as np

        log, delay = self.log, self.delay

        def double(x):
            time.sleep(delay)
            x = np.asarray(x)
            if log is not None and len(x):
                fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    pid = os.getpid()
                    os.write(fd, "".join(f"{pid} {v:.0f}\n" for v in x.ravel()).encode())
                finally:
                    os.close(fd)
            return x * 2

        return double


class GraphSizes(SchedulerPlugin):
    """On the scheduler: the pickled size of every task spec it is given, by key."""

    name = "test-graph-sizes"

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}

    def update_graph(self, scheduler, *, keys, **kwargs) -> None:
        for key in keys:
            ts = scheduler.tasks.get(key)
            if ts is not None and ts.run_spec is not None:
                self.sizes[str(key)] = len(pickle.dumps(ts.run_spec))


def graph_sizes(dask_scheduler) -> dict[str, int]:
    return dict(dask_scheduler.plugins[GraphSizes.name].sizes)


def set_runtime_cache(path: str | None) -> str | None:
    """On a worker: point ``POOL_RUNTIME_CACHE`` at ``path`` (``None``: unset); the old value."""
    previous = os.environ.get("POOL_RUNTIME_CACHE")
    if path is None:
        os.environ.pop("POOL_RUNTIME_CACHE", None)
    else:
        os.environ["POOL_RUNTIME_CACHE"] = path
    return previous


def loaded_artifact(plugin_name: str, dask_worker) -> str:
    """On a worker: where the pool's plugin loaded its converted model from."""
    return dask_worker.plugins[plugin_name].artifact


#: ``LocalCluster`` closes a worker's Nanny for good when no worker of that name is back
#: ``distributed.deploy.lost-worker-timeout`` after a death (15 s by default; SpecCluster reads
#: the value on its event loop at each removal). Every SIGKILL, poison shard and timeout in the
#: cluster tests kills a worker, so a slow restart on a loaded machine, or a check left over
#: from an earlier death of the same worker firing during a later restart, would leave a
#: 1-worker cluster. The value is held from before the cluster starts until after it is closed
#: (docs/scale-out.md).
LOST_WORKER_TIMEOUT = "24h"


@contextlib.contextmanager
def local_cluster(**config: Any) -> Iterator[tuple[distributed.LocalCluster, distributed.Client]]:
    """A LocalCluster of 2 single-threaded worker processes and a client of it (not the
    default client), with ``LOST_WORKER_TIMEOUT`` and ``config`` (Dask settings) held for the
    cluster's whole life."""
    settings = dask.config.set(
        {"distributed.deploy.lost-worker-timeout": LOST_WORKER_TIMEOUT, **config}
    )
    try:
        local = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = distributed.Client(local, set_as_default=False)
        yield local, client
        client.close()
        local.close()
    finally:
        settings.__exit__(None, None, None)
