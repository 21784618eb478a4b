"""Model factories for tests/test_cluster.py (Dask workers import them by name)."""

from __future__ import annotations

import time

import factories


def slow_double(seconds: float = 8.0):
    """A factory that takes ``seconds`` to load, then doubles its input."""
    time.sleep(seconds)
    return factories.plain_double()
