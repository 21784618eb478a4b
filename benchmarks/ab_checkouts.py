"""Two checkouts of pool, the same load, interleaved: did a change make the pool faster?

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/ab_checkouts.py /tmp/before . --model small_cnn --clients 16

Each round runs one fresh process per checkout (in alternating order), with that checkout
first on ``PYTHONPATH`` and the current directory elsewhere, so each imports its own ``pool``.
In it, ``--clients`` threads send one-row requests back to back for ``--seconds`` after a
warm-up; the process prints requests/s, the parent's CPU per request and (where ``stats()``
has ``batches``) the mean rows per model call. Medians over ``--rounds`` are printed, with the
CPU model, as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
import numpy as np
import pool
from pool import PredictionPool
from pool.reference_models import ensure

def main():
    model, clients, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    rng = np.random.default_rng(0)
    if model == "text_embedding":
        words = ["pool", "tensor", "batch", "fast", "model", "row", "core", "hub"]
        rows = [" ".join(rng.choice(words, 6)) for _ in range(128)]
        requests = [[r] for r in rows]
    else:
        side = {"small_cnn": 32, "mobilenet_v2": 224}[model]
        data = rng.random((128, side, side, 3), dtype=np.float32)
        requests = [data[i : i + 1] for i in range(128)]
    with PredictionPool(ensure(model)) as p:
        state = {"stop": time.monotonic() + 1.0, "count": 0}
        lock = threading.Lock()

        def client(i):
            n = 0
            while time.monotonic() < state["stop"]:
                p.predict(requests[(i * 7 + n) % 128])
                n += 1
            with lock:
                state["count"] += n

        def run():
            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        run()  # warm-up
        before = p.stats()
        state.update(stop=time.monotonic() + seconds, count=0)
        cpu, wall = time.process_time(), time.monotonic()
        run()
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
        after = p.stats()
        rows = sum(a.rows - b.rows for a, b in zip(after, before))
        calls = sum(getattr(a, "batches", a.shards) - getattr(b, "batches", b.shards)
                    for a, b in zip(after, before))
        print(json.dumps({
            "pool": pool.__file__,
            "req_per_s": state["count"] / wall,
            "parent_cpu_us_per_request": cpu / max(1, state["count"]) * 1e6,
            "rows_per_model_call": rows / max(1, calls),
        }))

if __name__ == "__main__":
    main()
"""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def run_once(checkout: Path, script: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    out = subprocess.run(
        [sys.executable, str(script), args.model, str(args.clients), str(args.seconds)],
        cwd=script.parent,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if not result["pool"].startswith(str(checkout)):
        raise RuntimeError(f"expected pool from {checkout}, got {result['pool']}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="first checkout (e.g. before the change)")
    parser.add_argument("b", type=Path, help="second checkout (e.g. after)")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    checkouts = [args.a.resolve(), args.b.resolve()]
    results: dict[Path, list[dict]] = {c: [] for c in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "ab_child.py"
        script.write_text(CHILD)
        for round_ in range(args.rounds):
            order = checkouts if round_ % 2 == 0 else checkouts[::-1]
            for checkout in order:
                result = run_once(checkout, script, args)
                results[checkout].append(result)
                print(f"round {round_ + 1} {checkout}: {result}", file=sys.stderr, flush=True)
    print(
        f"{args.model}, {args.clients} client threads, one-row requests, {args.seconds} s "
        f"windows, medians of {args.rounds} interleaved rounds, CPU: {cpu_model()}\n"
    )
    print("| checkout | req/s | parent CPU µs / request | rows per model call |")
    print("|---|---|---|---|")
    for checkout in checkouts:
        rs = results[checkout]
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "pool"}
        print(
            f"| {checkout} | {med['req_per_s']:.0f} | {med['parent_cpu_us_per_request']:.0f} "
            f"| {med['rows_per_model_call']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
