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
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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


class Metrics:
    """The app's counters and the pool's, in one registry of their own."""

    def __init__(self, pool: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "pool_serve_requests",
            "Requests answered, by API and HTTP status",
            ["api", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pool_serve_request_seconds",
            "Seconds from a request's arrival to its answer",
            ["api"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rows = Histogram(
            "pool_serve_request_rows",
            "Rows per prediction request",
            ["api"],
            buckets=ROW_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "pool_serve_requests_in_flight",
            "Requests received and not yet answered",
            registry=self.registry,
        )
        self.registry.register(PoolCollector(pool))

    def observe(self, api: str, code: int, seconds: float) -> None:
        self.requests.labels(api, str(code)).inc()
        self.latency.labels(api).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
