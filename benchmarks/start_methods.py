"""Start-up time of PredictionPool per start method, each measured in a fresh interpreter.

    python benchmarks/start_methods.py [--model PATH] [--workers 2] [--repeats 3]

The fork server is process-wide, so every measurement runs in its own subprocess; methods
alternate so machine noise hits both alike. Prints a markdown table of medians and checks
that both methods give identical predictions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import json, sys, time
import numpy as np
started = time.perf_counter()
from pool import PredictionPool
with PredictionPool(sys.argv[1], workers=int(sys.argv[2]), start_method=sys.argv[3]) as pool:
    ready = time.perf_counter() - started
    x = np.random.default_rng(0).random((4, 224, 224, 3), dtype=np.float32)
    out = pool.predict(x)
print(json.dumps({"startup_seconds": ready, "checksum": float(out.sum()),
                  "load_seconds": [r.load_seconds for r in pool.ready_info]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the reference MobileNetV2")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.model is None:
        from pool.reference_models import ensure

        args.model = ensure("mobilenet_v2")
    runs: dict[str, list[dict]] = {"forkserver": [], "spawn": []}
    for _ in range(args.repeats):
        for method in runs:
            cmd = [sys.executable, "-c", CHILD, args.model, str(args.workers), method]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[method].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"| start method | start-up s (median of {args.repeats}) | min | max | load s |")
    print("|---|---|---|---|---|")
    for method, results in runs.items():
        times = [r["startup_seconds"] for r in results]
        loads = [s for r in results for s in r["load_seconds"]]
        print(
            f"| {method} | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f}"
            f" | {statistics.median(loads):.2f} |"
        )
    checksums = {r["checksum"] for results in runs.values() for r in results}
    print(f"\nidentical predictions across methods and runs: {len(checksums) == 1}")


if __name__ == "__main__":
    main()
