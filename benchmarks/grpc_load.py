"""Load generator for TF Serving's gRPC ``Predict``: closed loop, ``concurrency`` requests in
flight over a few channels, in separate processes, so that its own CPU is measured apart from
the server's.

    python benchmarks/grpc_load.py --address 127.0.0.1:8500 --model text_embedding \\
        --model-name text_embedding-v1 --concurrency 16 --seconds 10 [--processes 2]

Each process runs ``grpc.aio`` with ``concurrency / processes`` coroutines over its share of
``--channels``; each coroutine sends its next request as soon as the previous one is answered
(closed loop). Requests are serialized once, before the clock starts (``PredictRequest`` bytes
made with :mod:`pool.serve.grpc_protos`, no TensorFlow), and answers are not decoded: what the
generator spends per request is gRPC's own cost, reported as ``client_cpu_us_per_request``.
The first answer of each body is decoded once, after the run, to check it is a real answer.

Prints one JSON object: requests, errors by status code, requests/s, latency percentiles in
milliseconds, the generator's CPU per request. :func:`run_load` is the same from Python (used by
``benchmarks/serving.py``); :func:`predict_bodies` makes the request bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pool.serve import grpc_codec, grpc_protos  # noqa: E402

PREDICT = "/tensorflow.serving.PredictionService/Predict"


def predict_bodies(
    model_name: str, inputs: list[dict[str, np.ndarray]], signature_name: str = ""
) -> list[bytes]:
    """Serialized ``PredictRequest`` messages, one per ``{input name: array}``."""
    bodies = []
    for item in inputs:
        request = grpc_protos.PredictRequest()
        request.model_spec.name = model_name
        if signature_name:
            request.model_spec.signature_name = signature_name
        for name, array in item.items():
            grpc_codec.from_array(np.asarray(array), request.inputs[name])
        bodies.append(request.SerializeToString())
    return bodies


async def _closed_loop(
    address: str,
    bodies: list[bytes],
    concurrency: int,
    channels: int,
    seconds: float,
    timeout: float,
    offset: int,
) -> dict[str, Any]:
    import grpc

    opened = [grpc.aio.insecure_channel(address) for _ in range(max(1, channels))]
    calls = [ch.unary_unary(PREDICT) for ch in opened]  # bytes in, bytes out
    for ch in opened:
        await asyncio.wait_for(ch.channel_ready(), 30)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    samples: dict[int, bytes] = {}
    stop_at = time.perf_counter() + seconds

    async def client(i: int) -> None:
        call = calls[i % len(calls)]
        n = offset + i
        while time.perf_counter() < stop_at:
            index = n % len(bodies)
            started = time.perf_counter()
            try:
                answer = await call(bodies[index], timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
            else:
                latencies.append(time.perf_counter() - started)
                samples.setdefault(index, answer)
            n += concurrency

    cpu = time.process_time()
    began = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - began
    cpu = time.process_time() - cpu
    for ch in opened:
        await ch.close()
    return {
        "latencies": latencies,
        "errors": dict(errors),
        "elapsed": elapsed,
        "cpu": cpu,
        "samples": samples,
    }


def _process(args: tuple) -> dict[str, Any]:
    return asyncio.run(_closed_loop(*args))


def run_load(
    address: str,
    bodies: list[bytes],
    *,
    concurrency: int = 16,
    seconds: float = 10.0,
    processes: int = 1,
    channels: int = 4,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Closed-loop load on ``address`` (``HOST:PORT``): ``concurrency`` requests in flight in
    all, split over ``processes`` processes (spawned: their CPU is theirs) and ``channels``
    channels. Returns requests, errors, req/s, p50/p90/p99 in ms, the generator's CPU per
    request in µs, and ``answers``: one ``PredictResponse`` per body answered (decoded)."""
    if concurrency < 1 or processes < 1 or seconds <= 0:
        raise ValueError("concurrency and processes must be >= 1, seconds > 0")
    processes = min(processes, concurrency)
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    per_channels = [max(1, channels // processes) for _ in range(processes)]
    jobs = [
        (address, bodies, share, ch, seconds, timeout, sum(shares[:i]))
        for i, (share, ch) in enumerate(zip(shares, per_channels, strict=True))
    ]
    with multiprocessing.get_context("spawn").Pool(processes) as workers:  # never this process
        results = workers.map(_process, jobs)
    latencies = np.array([x for r in results for x in r["latencies"]])
    errors: Counter[str] = Counter()
    samples: dict[int, bytes] = {}
    for r in results:
        errors.update(r["errors"])
        for k, v in r["samples"].items():
            samples.setdefault(k, v)
    requests = len(latencies) + sum(errors.values())
    elapsed = max(r["elapsed"] for r in results)
    cpu = sum(r["cpu"] for r in results)
    quantiles = (
        np.percentile(latencies, [50, 90, 99]) * 1e3 if len(latencies) else [float("nan")] * 3
    )
    return {
        "address": address,
        "concurrency": concurrency,
        "processes": processes,
        "channels": sum(per_channels),
        "seconds": round(elapsed, 3),
        "requests": int(requests),
        "ok": int(len(latencies)),
        "errors": dict(errors),
        "requests_per_second": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(float(quantiles[0]), 3),
        "p90_ms": round(float(quantiles[1]), 3),
        "p99_ms": round(float(quantiles[2]), 3),
        "client_cpu_us_per_request": round(cpu / requests * 1e6, 1) if requests else None,
        "answers": {k: grpc_protos.PredictResponse.FromString(v) for k, v in samples.items()},
    }


def run_grpc(
    address: str,
    bodies: list[bytes],
    *,
    connections: int,
    seconds: float,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """:func:`run_load` as a load generator of ``benchmarks/serving.py`` (the keys of
    ``wrk_load.run_wrk``'s result): ``connections`` RPCs in flight from one process over as many
    channels (at most 4), the server's CPU per request read from ``/proc``."""
    from wrk_load import process_cpu_seconds

    cpu_before = process_cpu_seconds(server_pid) if server_pid else None
    started = time.perf_counter()
    result = run_load(
        address, bodies, concurrency=connections, seconds=seconds, channels=min(4, connections)
    )
    wall = time.perf_counter() - started
    cpu_after = process_cpu_seconds(server_pid) if server_pid else None
    requests = max(1, result["requests"])
    errors = sum(result["errors"].values())
    out: dict[str, Any] = {
        "connections": connections,
        "requests": result["requests"],
        "requests_per_second": result["requests_per_second"],
        "latency_ms": {"p50": result["p50_ms"], "p90": result["p90_ms"], "p99": result["p99_ms"]},
        "errors": errors,
        "error_codes": result["errors"],
        "load_generator": "grpc_load.py (grpcio, asyncio, 1 process)",
        "load_generator_cpu_us_per_request": result["client_cpu_us_per_request"],
    }
    if cpu_before is not None and cpu_after is not None:
        out["server_cpu_us_per_request"] = (cpu_after - cpu_before) / requests * 1e6
        out["server_cpu_cores"] = (cpu_after - cpu_before) / wall
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:8500", help="HOST:PORT of the server")
    parser.add_argument(
        "--model",
        default="text_embedding",
        help="reference model whose inputs to send (benchmarks/common.py REFERENCE_INPUTS)",
    )
    parser.add_argument("--model-name", help="name in the requests (default: the server's)")
    parser.add_argument("--rows", type=int, default=1, help="rows per request (default: 1)")
    parser.add_argument("--bodies", type=int, default=64, help="distinct requests sent in turn")
    parser.add_argument("--concurrency", "-c", type=int, default=16)
    parser.add_argument("--processes", "-p", type=int, default=1)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each RPC")
    args = parser.parse_args(argv)
    import common

    specs = common.REFERENCE_INPUTS.get(args.model)
    if specs is None:
        parser.error(f"--model: expected one of {sorted(common.REFERENCE_INPUTS)}")
    inputs = [common.make_inputs(specs, args.rows, seed=i) for i in range(args.bodies)]
    name = args.model_name or f"{args.model}-v1"
    result = run_load(
        args.address,
        predict_bodies(name, inputs),
        concurrency=args.concurrency,
        seconds=args.seconds,
        processes=args.processes,
        channels=args.channels,
        timeout=args.timeout,
    )
    answers = result.pop("answers")
    result["bodies_answered"] = len(answers)
    result["outputs"] = sorted({k for a in answers.values() for k in a.outputs})
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 1 if result["errors"] or not result["ok"] else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
