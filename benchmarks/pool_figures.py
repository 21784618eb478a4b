"""Figures read from a running ``PredictionPool`` and from this process, in one place.

Used by both runners (``scaling_runner.py``, ``requests_runner.py``):

- :func:`parent_cpu`: this process's CPU seconds (user, system) from ``getrusage``; the
  difference of two readings divided by the shards or requests answered in between is the
  parent's CPU per shard or per request;
- :func:`call_counts` / :func:`model_calls` / :func:`settled_model_calls`: the pool's rows and
  model calls between two ``stats()`` snapshots (``batches`` counts model calls, combined
  shards counting once);
- :func:`copies_per_shard` and :func:`transport_info`: what the pool's transport reports it did,
  read from ``pool.transport_info()`` when the pool has that method, else None.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Mapping, Sequence
from typing import Any


def parent_cpu() -> dict[str, float]:
    """CPU seconds this process (every thread of it, not its children) has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"user": usage.ru_utime, "system": usage.ru_stime}


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    user, system = after["user"] - before["user"], after["system"] - before["system"]
    return {"user_seconds": user, "system_seconds": system, "seconds": user + system}


def call_counts(stats: Sequence[Any]) -> dict[str, int]:
    """Totals over the workers of one ``pool.stats()`` snapshot."""
    return {
        "rows": sum(s.rows for s in stats),
        "shards": sum(s.shards for s in stats),
        "batches": sum(getattr(s, "batches", 0) for s in stats),
    }


def model_calls(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """Rows and model calls between two :func:`call_counts`; ``rows_per_model_call``.

    A model call is a ``batch`` in ``stats()``. A core that does not count batches yet
    (``batches`` stays 0 while rows grow) calls the model once per shard: then shards are
    counted instead, and ``model_calls_counted_from`` says so."""
    rows = after["rows"] - before["rows"]
    batches = after["batches"] - before["batches"]
    shards = after["shards"] - before["shards"]
    source = "batches"
    if batches == 0 and rows > 0:
        batches, source = shards, "shards"
    return {
        "rows": rows,
        "shards": shards,
        "model_calls": batches,
        "model_calls_counted_from": source,
        "rows_per_model_call": rows / batches if batches else None,
    }


def settled_model_calls(
    pool: Any, before: dict[str, int], rows: int, timeout: float = 2.0
) -> dict[str, Any]:
    """:func:`model_calls` since ``before``, once ``stats()`` counts at least ``rows`` rows
    (a shard's count may land just after its result) or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        after = call_counts(pool.stats())
        if after["rows"] - before["rows"] >= rows or time.monotonic() > deadline:
            return model_calls(before, after)
        time.sleep(0.01)


def transport_info(pool: Any) -> Any:
    """What ``pool.transport_info()`` returns, as plain JSON-able data; None if the pool has
    no such method."""
    method = getattr(pool, "transport_info", None)
    if not callable(method):
        return None
    return _plain(method())


def copies_per_shard(pool: Any) -> float | None:
    """User-space copies of a shard's data per shard, as the pool's transport reports them in
    ``pool.transport_info()`` (a mapping or object with ``copies_per_shard``); None if the
    pool does not report it."""
    info = transport_info(pool)
    if isinstance(info, Mapping) and info.get("copies_per_shard") is not None:
        return float(info["copies_per_shard"])
    return None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # NumPy scalars
        return value.item()
    if hasattr(value, "__dict__"):
        return _plain(vars(value))
    return repr(value)
