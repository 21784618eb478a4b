"""Model factories for tests/test_cluster.py (Dask workers import them by name)."""

from __future__ import annotations

import os
import pickle
import time

import factories
from distributed.diagnostics.plugin import SchedulerPlugin


def slow_double(seconds: float = 8.0):
    """A factory that takes ``seconds`` to load, then doubles its input."""
    time.sleep(seconds)
    return factories.plain_double()


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
