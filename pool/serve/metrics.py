"""Prometheus metrics of one served model, at ``/monitoring/prometheus/metrics`` (TF Serving's
path), with ``prometheus-client``. Each app has its own registry, so several apps (or tests)
in one process never share counters.

Counted by the app, per request:

- ``pool_serve_requests_total{api, code}``: requests answered, by API and HTTP status (499 is a
  client that went away before its answer);
- ``pool_serve_request_seconds{api}``: latency histogram, from the request's arrival to its
  answer;
- ``pool_serve_request_rows{api}``: rows per prediction request;
- ``pool_serve_requests_in_flight``: requests received and not yet answered.

Read from the pool at each scrape (``PredictionPool.stats()`` and ``queued_requests()``):

- ``pool_model_calls_total{worker}`` and ``pool_model_rows_total{worker}``: model calls and the
  rows they answered; the pool's dynamic batching combines concurrent requests, so
  ``rate(pool_model_rows_total[1m]) / rate(pool_model_calls_total[1m])`` is the batch size;
- ``pool_shards_total{worker}``, ``pool_worker_busy_seconds_total{worker}``;
- ``pool_worker_restarts_total{worker}`` (dead, hung or recycled workers replaced) and
  ``pool_shard_retries_total{worker}``;
- ``pool_queued_requests``: calls waiting for a worker (what ``--max-queued-requests`` bounds);
- ``pool_workers`` and ``pool_worker_rss_bytes{worker}``.

The per-request counters are plain integers and lists updated on the event loop (no lock, no
label lookup in ``prometheus-client``'s thread-safe values: a few hundred nanoseconds per
request instead of several microseconds) and turned into metric families at scrape time.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..errors import PoolError

#: Media type of the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class PoolCollector(Collector):
    """Exports the pool's own counters at scrape time (nothing is kept twice)."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._pool.stats()
        except PoolError:  # never started: nothing to report
            return
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "calls": CounterMetricFamily(
                "pool_model_calls", "Model calls (batches) answered", labels=["worker"]
            ),
            "rows": CounterMetricFamily(
                "pool_model_rows", "Rows answered by model calls", labels=["worker"]
            ),
            "shards": CounterMetricFamily(
                "pool_shards", "Shards answered (a call may combine several)", labels=["worker"]
            ),
            "busy": CounterMetricFamily(
                "pool_worker_busy_seconds", "Seconds spent in model calls", labels=["worker"]
            ),
            "restarts": CounterMetricFamily(
                "pool_worker_restarts", "Worker processes replaced", labels=["worker"]
            ),
            "retries": CounterMetricFamily(
                "pool_shard_retries", "Shards re-run after their worker died", labels=["worker"]
            ),
            "rss": GaugeMetricFamily(
                "pool_worker_rss_bytes", "Resident memory of the worker process", labels=["worker"]
            ),
        }
        for record in stats:
            worker = [str(record.worker)]
            families["calls"].add_metric(worker, record.batches)
            families["rows"].add_metric(worker, record.rows)
            families["shards"].add_metric(worker, record.shards)
            families["busy"].add_metric(worker, record.busy_seconds)
            families["restarts"].add_metric(worker, record.restarts)
            families["retries"].add_metric(worker, record.retries)
            families["rss"].add_metric(worker, record.rss_bytes)
        yield from families.values()
        yield GaugeMetricFamily("pool_workers", "Worker processes of the pool", value=len(stats))
        try:
            queued = self._pool.queued_requests()
        except PoolError:  # shut down: nothing waits
            queued = 0
        yield GaugeMetricFamily("pool_queued_requests", "Calls waiting for a worker", value=queued)


class _Histogram:
    """One label set's histogram: a count per bucket (the last is ``+Inf``) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bucket ``le`` holds value <= le
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        counts = list(self.counts)  # a snapshot (the loop may count on meanwhile)
        out, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            total += count
            out.append((floatToGoString(bound), float(total)))
        return out


class _Histograms:
    """Histograms by label (``labels(api).observe(value)``, as with ``prometheus-client``)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.children: dict[str, _Histogram] = {}

    def labels(self, label: str) -> _Histogram:
        child = self.children.get(label)
        if child is None:
            child = self.children[label] = _Histogram(self.bounds)
        return child


class _Gauge:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


class _Count:
    __slots__ = ("counts", "key")

    def __init__(self, counts: dict[tuple[str, int], int], key: tuple[str, int]) -> None:
        self.counts = counts
        self.key = key

    def inc(self, amount: int = 1) -> None:
        self.counts[self.key] = self.counts.get(self.key, 0) + amount


class _Counts:
    """``requests.labels(api, code).inc()``, as with ``prometheus-client`` (for other front
    ends counting into the same metrics); :meth:`Metrics.observe` is the quicker way."""

    def __init__(self, counts: dict[tuple[str, int], int]) -> None:
        self.counts = counts

    def labels(self, api: str, code: int | str) -> _Count:
        return _Count(self.counts, (api, int(code)))


class _RequestCollector(Collector):
    """Exports the app's per-request counters at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        requests = CounterMetricFamily(
            "pool_serve_requests",
            "Requests answered, by API and HTTP status",
            labels=["api", "code"],
        )
        for (api, code), count in list(m.counts.items()):
            requests.add_metric([api, str(code)], count, created=m.created)
        yield requests
        for histograms, name, documentation in (
            (
                m.latency,
                "pool_serve_request_seconds",
                "Seconds from a request's arrival to its answer",
            ),
            (m.rows, "pool_serve_request_rows", "Rows per prediction request"),
        ):
            family = HistogramMetricFamily(name, documentation, labels=["api"])
            for api, child in list(histograms.children.items()):
                family.add_metric([api], child.buckets(), child.sum)
            yield family
        yield GaugeMetricFamily(
            "pool_serve_requests_in_flight",
            "Requests received and not yet answered",
            value=m.in_flight.value,
        )


class Metrics:
    """The app's counters and the pool's, in one registry of their own. The per-request
    methods are meant for the event loop's thread (they take no lock); :meth:`render` may run
    in any thread."""

    def __init__(self, pool: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.created = time.time()
        self.counts: dict[tuple[str, int], int] = {}
        self.requests = _Counts(self.counts)
        self.latency = _Histograms(LATENCY_BUCKETS)
        self.rows = _Histograms(tuple(float(b) for b in ROW_BUCKETS))
        self.in_flight = _Gauge()
        self.registry.register(_RequestCollector(self))
        self.registry.register(PoolCollector(pool))

    def observe(self, api: str, code: int, seconds: float) -> None:
        """One request answered with HTTP status ``code`` after ``seconds``."""
        key = (api, code)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        self.latency.labels(api).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
