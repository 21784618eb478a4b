"""TensorFlow against the converted runtimes on one thread, same inputs (docs/runtimes.md).

    python benchmarks/runtimes.py [--rounds 3] [--seconds 1.0]

Converts (or finds in the cache) each reference image model for each installed runtime, then
times TensorFlow, OpenVINO (f32 and bf16) and ONNX Runtime in one process on one thread each:
rounds of ``--seconds`` per runtime, interleaved, median of the rounds; a fixed batch (the
core-scaling shard size) and batch sizes that change from call to call (what a changing
combined batch costs). Prints JSON. The pool itself on each runtime, against its no-IPC ceiling
and its own best single process, with start-up and memory per worker, is in
``core_scaling.py`` (its runtime configurations); this script is the per-core comparison only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import common  # benchmarks/ is on sys.path as the script's directory; puts the repo on it too
import numpy as np
import runtime_baselines

from pool.runtimes import installed
from pool.runtimes.resolve import resolve

#: Reference model: (image side, rows per fixed batch, cycling batch sizes).
MODELS = {
    "mobilenet_v2": (224, 8, [1, 8, 3, 16, 5]),
    "small_cnn": (32, 16, [16, 40, 128, 24, 96, 64]),
}


def rate(call: Callable, batches: list[np.ndarray], seconds: float) -> float:
    done, started, i = 0, time.perf_counter(), 0
    while True:
        batch = batches[i % len(batches)]
        call({"images": batch})
        done += len(batch)
        i += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed


def percore(rounds: int, seconds: float) -> dict:
    results: dict[str, dict[str, str]] = {}
    for name, (side, rows, sizes) in MODELS.items():
        path = common.reference_model(name)
        calls = {"tensorflow": runtime_baselines.load("tensorflow", path, None, 1, "f32")}
        for runtime, precisions in (("openvino", ("f32", "bf16")), ("onnxruntime", ("f32",))):
            if not installed(runtime, True):
                continue
            for precision in precisions:
                art = resolve(path, runtime=runtime, precision=precision, shard_size=rows).artifact
                label = runtime if runtime == "onnxruntime" else f"{runtime}_{precision}"
                calls[label] = runtime_baselines.load(runtime, path, art, 1, precision)
        rng = np.random.default_rng(0)
        fixed = [rng.random((rows, side, side, 3), dtype=np.float32)]
        cycling = [rng.random((n, side, side, 3), dtype=np.float32) for n in sizes]
        for label, batches in (("fixed", fixed), ("cycling", cycling)):
            figures: dict[str, list[float]] = {k: [] for k in calls}
            for call in calls.values():
                for b in batches:
                    call({"images": b})
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    print(json.dumps(percore(args.rounds, args.seconds), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
