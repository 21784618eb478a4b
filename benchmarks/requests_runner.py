"""One configuration of the concurrent-requests benchmark, in a fresh process of its own.

``concurrent_requests.py`` starts ``python requests_runner.py SPEC.json`` once per
configuration and repeat. The runner starts its kind of model server, then for each client
count runs that many threads, each sending one-row requests back to back (a closed loop)::

    clients ──▶ barrier ──▶ warm-up (warmup_seconds) ──▶ window (seconds) ──▶ stop, drain
                              untimed                      timed: a request counts if it
                                                           ends inside the window

Kinds (what a user would write to answer requests from many threads):

- ``global``: ``hub.load`` once into a global, called from the client threads themselves,
  with TensorFlow's default thread pools (recorded in the result);
- ``executor``: a plain spawn ``ProcessPoolExecutor`` (workers = cores, one intra-op thread
  each) whose initializer loads the model; ``submit(...).result()`` per request;
- ``pool``: ``PredictionPool(model, workers=cores)`` with its defaults; ``predict`` per
  request;
- ``pool_auto``: the same with ``runtime="auto"`` (issue 14; the image models).

Per client count it writes: requests answered in the window, req/s, latency percentiles, the
parent's CPU seconds in the window (``getrusage(RUSAGE_SELF)``: all the compute for
``global``, only the parent's share for the others) and, for the pool, its rows and model
calls from ``stats()`` deltas. It also keeps the outputs of the first ``rows`` requests of
each client count (each row once) for the driver to compare with the global model's; a
``reference`` spec also answers every row alone, one call each, before anything is timed.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import baselines
import numpy as np
import pool_figures

Outputs = dict[str, np.ndarray]

#: Percentiles reported for every client count.
PERCENTILES = (50, 90, 99, 99.9)


def log(message: str) -> None:
    print(f"    [{os.getpid()}] {message}", file=sys.stderr, flush=True)


class Server:
    """One kind of model server: ``call(row) -> {output: array}`` answers one request."""

    kind = ""

    def call(self, row: int) -> Outputs:
        raise NotImplementedError

    def counts(self) -> dict[str, int] | None:
        """Rows and model calls so far (the pool's stats), or None: one call per request."""
        return None

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class GlobalModel(Server):
    """``hub.load`` once into a global of this process; client threads call it directly."""

    kind = "global"

    def __init__(self, spec: dict, requests: list[dict[str, np.ndarray]]) -> None:
        self.threads = baselines.set_threads(None, None)  # TensorFlow's defaults, as a user has
        self.model = baselines.load(spec["model"])
        self.requests = requests
        self.call(0)

    def call(self, row: int) -> Outputs:
        return self.model(self.requests[row])

    def describe(self) -> dict[str, Any]:
        return {"threads": self.threads, "processes": 1}


class Executor(Server):
    """The standard-library idiom: spawn, an initializer that loads the model, ``submit``."""

    kind = "executor"

    def __init__(self, spec: dict, requests: list[dict[str, np.ndarray]]) -> None:
        self.workers = spec["workers"]
        self.executor = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=baselines.init_worker,
            initargs=(spec["model"], 1, 1),
        )
        self.requests = requests
        answered: set[int] = set()
        deadline = time.monotonic() + 600
        while len(answered) < self.workers and time.monotonic() < deadline:
            answered |= set(self.executor.map(baselines.pid_after, [0.2] * self.workers))
        for pid, _ in self.executor.map(baselines.run_shard, requests[: 4 * self.workers]):
            answered.add(pid)
        self.answered = len(answered)

    def call(self, row: int) -> Outputs:
        return self.executor.submit(baselines.run_shard, self.requests[row]).result()[1]

    def describe(self) -> dict[str, Any]:
        return {
            "threads": {"intra_op_threads": 1, "inter_op_threads": 1},
            "processes": self.workers,
            "workers_answered": self.answered,
        }

    def close(self) -> None:
        self.executor.shutdown()


class Pool(Server):
    """``PredictionPool`` with its defaults; ``predict`` on one row per request."""

    kind = "pool"
    runtime = "tensorflow"

    def __init__(self, spec: dict, requests: list[dict[str, np.ndarray]]) -> None:
        from pool import PredictionPool

        self.pool = PredictionPool(
            spec["model"], workers=spec["workers"], runtime=self.runtime
        ).start()
        signature = self.pool.signature
        self.output = signature.single_output
        # what a user passes: the array itself for a one-input signature, else a dict
        if len(requests[0]) == 1:
            self.requests = [next(iter(r.values())) for r in requests]
        else:
            self.requests = requests
        for row in range(min(len(requests), 4 * self.pool.workers)):
            self.call(row)

    def call(self, row: int) -> Outputs:
        out = self.pool.predict(self.requests[row])
        return out if isinstance(out, dict) else {self.output or "output_0": out}

    def counts(self) -> dict[str, int]:
        return pool_figures.call_counts(self.pool.stats())

    def describe(self) -> dict[str, Any]:
        return {
            "threads": {
                "intra_op_threads": self.pool.threads_per_worker,
                "inter_op_threads": 1,
            },
            "processes": self.pool.workers,
            "start_method": self.pool.start_method,
            "ready_seconds": self.pool.startup_seconds,
            "runtime_info": self.pool.runtime_info(),
        }

    def close(self) -> None:
        self.pool.shutdown()


class AutoPool(Pool):
    """``PredictionPool(model, workers=cores, runtime="auto")``: the fastest runtime that
    converts and verifies (the driver resolved it before anything ran: the cache holds the
    artifact and the timings)."""

    kind = "pool_auto"
    runtime = "auto"


KINDS: dict[str, Callable[[dict, list], Server]] = {
    "global": GlobalModel,
    "executor": Executor,
    "pool": Pool,
    "pool_auto": AutoPool,
}


def run_clients(
    server: Server, clients: int, seconds: float, warmup: float, rows: int
) -> tuple[dict[str, Any], dict[int, Outputs]]:
    """``clients`` threads send one-row requests back to back; measure a ``seconds`` window
    after ``warmup`` seconds. Returns the figures and the outputs of the first ``rows``
    requests (``{row: outputs}``)."""
    sequence = itertools.count()  # next() on a count is atomic under the GIL
    stop = threading.Event()
    start = threading.Barrier(clients + 1)
    times: list[list[tuple[float, float]]] = [[] for _ in range(clients)]
    samples: dict[int, Outputs] = {}
    errors: list[BaseException] = []

    def client(k: int) -> None:
        done = times[k]
        start.wait()
        try:
            while not stop.is_set():
                i = next(sequence)
                row = i % rows
                t0 = time.perf_counter()
                out = server.call(row)
                done.append((t0, time.perf_counter()))
                if i < rows:
                    samples[row] = out
        except BaseException as exc:  # reported by the main thread, which then exits non-zero
            errors.append(exc)
            stop.set()

    threads = [
        threading.Thread(target=client, args=(k,), name=f"client-{k}", daemon=True)
        for k in range(clients)
    ]
    for t in threads:
        t.start()
    start.wait()
    stop.wait(warmup)
    counts_before = server.counts()
    cpu_before = pool_figures.parent_cpu()
    begin = time.perf_counter()
    stop.wait(seconds)
    end = time.perf_counter()
    cpu_after = pool_figures.parent_cpu()
    counts_after = server.counts()
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    latencies = np.array([t1 - t0 for done in times for t0, t1 in done if begin <= t1 <= end])
    requests = int(latencies.size)
    if not requests:
        raise RuntimeError(f"{clients} clients: no request completed in the {seconds} s window")
    cpu = pool_figures.cpu_delta(cpu_before, cpu_after)
    figures: dict[str, Any] = {
        "clients": clients,
        "requests": requests,
        "requests_started": next(sequence),
        "window_seconds": end - begin,
        "requests_per_second": requests / (end - begin),
        "latency_seconds": {
            **{f"p{p:g}": float(np.percentile(latencies, p)) for p in PERCENTILES},
            "mean": float(latencies.mean()),
            "max": float(latencies.max()),
        },
        "parent_cpu": cpu,
        "parent_cpu_seconds_per_request": cpu["seconds"] / requests,
    }
    if counts_before is not None and counts_after is not None:
        figures["model_calls"] = pool_figures.model_calls(counts_before, counts_after)
        figures["rows_per_model_call"] = figures["model_calls"]["rows_per_model_call"]
    else:
        figures["rows_per_model_call"] = 1.0  # one request, one row, one model call
    return figures, samples


def stack(samples: dict[int, Outputs]) -> Outputs:
    rows = sorted(samples)
    names = samples[rows[0]]
    out = {name: np.concatenate([samples[r][name] for r in rows]) for name in names}
    out["__rows__"] = np.array(rows, dtype=np.int64)
    return out


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    inputs = {name: np.load(path, allow_pickle=True) for name, path in spec["inputs"].items()}
    rows = len(next(iter(inputs.values())))
    requests = [{name: a[i : i + 1] for name, a in inputs.items()} for i in range(rows)]
    started = time.perf_counter()
    server = KINDS[spec["kind"]](spec, requests)
    startup = time.perf_counter() - started
    log(f"{server.kind}: ready and warm after {startup:.2f} s")
    outputs: dict[str, Outputs] = {}
    levels = []
    try:
        if spec.get("reference"):  # every row alone, before anything is timed
            outputs["reference"] = stack({r: server.call(r) for r in range(rows)})
        for clients in spec["clients"]:
            figures, samples = run_clients(
                server, clients, spec["seconds"], spec["warmup_seconds"], rows
            )
            outputs[str(clients)] = stack(samples)
            levels.append(figures)
            log(
                f"{server.kind} x{clients} clients: {figures['requests_per_second']:.0f} req/s, "
                f"p50 {figures['latency_seconds']['p50'] * 1e3:.2f} ms, "
                f"p99 {figures['latency_seconds']['p99'] * 1e3:.2f} ms, "
                f"{figures['rows_per_model_call']:.2f} rows per model call"
            )
        transport = pool_figures.transport_info(getattr(server, "pool", None))
        copies = pool_figures.copies_per_shard(getattr(server, "pool", None))
        described = server.describe()
    finally:
        server.close()
    np.savez(
        spec["outputs_path"],
        **{f"{key}/{name}": a for key, out in outputs.items() for name, a in out.items()},
    )
    entry = {
        "kind": server.kind,
        "pid": os.getpid(),
        "startup_seconds": startup,
        **described,
        "transport_info": transport,
        "copies_per_shard": copies,
        "levels": levels,
    }
    with open(spec["result_path"], "w") as f:
        json.dump({"entries": [entry]}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
