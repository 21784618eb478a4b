"""TensorFlow against the converted runtimes (docs/runtimes.md).

    python benchmarks/runtimes.py percore   # rows/s on one thread, same inputs, interleaved
    python benchmarks/runtimes.py pool      # the pool: runtime="auto" vs "tensorflow"
    python benchmarks/runtimes.py startup   # start-up and RSS of a worker per runtime

``percore`` converts (or finds in the cache) each model for each installed runtime, then times
TensorFlow, OpenVINO (f32 and bf16) and ONNX Runtime in one process on one thread each: rounds
of ~1 s per runtime, interleaved, median of the rounds; a fixed batch and batch sizes cycling
16..128 (what a changing combined batch costs). Needs openvino / onnxruntime / tf2onnx.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_NUM_INTRAOP_THREADS"] = "1"
os.environ["TF_NUM_INTEROP_THREADS"] = "1"

import numpy as np  # noqa: E402

from pool import PredictionPool, reference_models  # noqa: E402
from pool.runtimes import installed  # noqa: E402
from pool.runtimes.cache import read_manifest  # noqa: E402
from pool.runtimes.resolve import resolve  # noqa: E402

MODELS = {"mobilenet_v2": (224, 8), "small_cnn": (32, 16)}


def rate(call, batches, seconds: float) -> float:
    done, started, i = 0, time.perf_counter(), 0
    while True:
        batch = batches[i % len(batches)]
        call(batch)
        done += len(batch)
        i += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed


def percore(rounds: int, seconds: float) -> dict:
    import tensorflow as tf

    from pool.runtimes import signature_from_json
    from pool.runtimes.onnxruntime import ONNXRuntimeModel
    from pool.runtimes.openvino import OpenVINOModel

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    results = {}
    for name, (side, rows) in MODELS.items():
        path = reference_models.ensure(name)
        fn = tf.saved_model.load(path).signatures["serving_default"]
        calls = {"tensorflow": lambda x, fn=fn: fn(images=tf.constant(x))["probabilities"].numpy()}
        if installed("openvino", True):
            art = resolve(path, runtime="openvino").artifact
            sig = signature_from_json(read_manifest(art)["signature"])
            for precision in ("f32", "bf16"):
                ov = OpenVINOModel(art, sig, precision, threads=1)
                calls[f"openvino_{precision}"] = lambda x, m=ov: m({"images": x})
        if installed("onnxruntime", True):
            art = resolve(path, runtime="onnxruntime").artifact
            sig = signature_from_json(read_manifest(art)["signature"])
            ort = ONNXRuntimeModel(art, sig, threads=1)
            calls["onnxruntime"] = lambda x, m=ort: m({"images": x})
        rng = np.random.default_rng(0)
        fixed = [rng.random((rows, side, side, 3), dtype=np.float32)]
        sizes = [16, 40, 128, 24, 96, 64] if name == "small_cnn" else [1, 8, 3, 16, 5]
        cycling = [rng.random((n, side, side, 3), dtype=np.float32) for n in sizes]
        for label, batches in (("fixed", fixed), ("cycling", cycling)):
            figures: dict[str, list[float]] = {k: [] for k in calls}
            for call in calls.values():
                for b in batches:
                    call(b)
            for _ in range(rounds):
                for key, call in calls.items():
                    figures[key].append(rate(call, batches, seconds))
            med = {k: statistics.median(v) for k, v in figures.items()}
            base = med["tensorflow"]
            results[f"{name} {label} batch {rows if label == 'fixed' else sizes}"] = {
                k: f"{v:.1f} rows/s ({v / base:.2f}x)" for k, v in med.items()
            }
            print(json.dumps(results, indent=1), file=sys.stderr)
    return results


def pool_run(rounds: int, rows_total: int) -> dict:
    results: dict = {}
    for name, (side, rows) in MODELS.items():
        path = reference_models.ensure(name)
        n = rows_total if name == "mobilenet_v2" else rows_total * 40
        x = np.random.default_rng(0).random((n, side, side, 3), dtype=np.float32)
        pools = {
            runtime: PredictionPool(path, workers=2, shard_size=rows, runtime=runtime).start()
            for runtime in ("tensorflow", "auto")
        }
        figures: dict[str, list[float]] = {k: [] for k in pools}
        try:
            for p in pools.values():
                p.predict(x[: rows * 4])
            for _ in range(rounds):
                for key, p in pools.items():
                    started = time.perf_counter()
                    p.predict(x)
                    figures[key].append(n / (time.perf_counter() - started))
            chosen = pools["auto"].runtime_info()["runtime"]
        finally:
            for p in pools.values():
                p.shutdown()
        med = {k: statistics.median(v) for k, v in figures.items()}
        results[name] = {
            "tensorflow rows/s": round(med["tensorflow"], 1),
            f"auto ({chosen}) rows/s": round(med["auto"], 1),
            "ratio": round(med["auto"] / med["tensorflow"], 2),
            "shard_size": rows,
        }
        print(json.dumps(results, indent=1), file=sys.stderr)
    return results


def startup(rounds: int) -> dict:
    path = reference_models.ensure("mobilenet_v2")
    results: dict = {}
    for runtime in ("tensorflow", "openvino", "onnxruntime"):
        if runtime != "tensorflow" and not installed(runtime, True):
            continue
        if runtime != "tensorflow":
            resolve(path, runtime=runtime)  # convert first: measure a cached start
        starts, rss, loads = [], [], []
        for _ in range(rounds):
            with PredictionPool(path, workers=2, shard_size=8, runtime=runtime) as p:
                starts.append(p.startup_seconds)
                loads.append(max(r.load_seconds + r.warmup_seconds for r in p.ready_info))
                rss.append(max(s.rss_bytes for s in p.stats()) / 2**20)
        results[runtime] = {
            "pool start-up s (2 workers, median)": round(statistics.median(starts), 2),
            "load+warm-up s per worker": round(statistics.median(loads), 2),
            "RSS MiB per worker": round(statistics.median(rss)),
            "start method": "forkserver (TF preloaded)" if runtime == "tensorflow" else "spawn",
        }
        print(json.dumps(results, indent=1), file=sys.stderr)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["percore", "pool", "startup"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rows", type=int, default=160)
    args = parser.parse_args()
    if args.what == "percore":
        out = percore(args.rounds, args.seconds)
    elif args.what == "pool":
        out = pool_run(args.rounds, args.rows)
    else:
        out = startup(args.rounds)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
