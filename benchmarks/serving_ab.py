"""Two checkouts' ``pool serve``, the same wrk load, interleaved: did a change cut the server's
CPU per request?

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/serving_ab.py /tmp/before . [--model text_embedding]
        [--connections 16] [--seconds 5] [--rounds 3]

Each round starts one ``python -m pool serve`` per checkout (alternating which goes first),
with that checkout first on ``PYTHONPATH``, sends it one-row ``:predict`` requests with wrk
(``wrk_load.run_wrk``) after a 1 s warm-up, and stops it. Printed per checkout: the medians over
the rounds of requests/s, p50/p99 latency and the server process's CPU per request (its own
user + system time over the requests answered; the workers are not counted), as a markdown
table. Medians of interleaved runs are robust to a machine whose load drifts; they are not
the figures of an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
from wrk_load import require_wrk, run_wrk  # noqa: E402

READY = re.compile(r"^serving '(?P<name>[^']+)' version \d+ on (?P<url>http://\S+)$")


def start(checkout: Path, model: str, workers: int | None) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    command = [sys.executable, "-m", "pool", "serve", model, "--port", "0"]
    command += ["--workers", str(workers)] if workers else []
    process = subprocess.Popen(
        command, cwd=checkout, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        match = READY.match(line.strip())
        if match:
            threading.Thread(target=process.stderr.read, daemon=True).start()  # drain
            return process, f"{match['url']}/v1/models/{match['name']}:predict"
    raise SystemExit(f"{checkout}: the server did not start\n{''.join(lines[-20:])}")


def bodies(model_name: str) -> list[bytes]:
    inputs = common.make_inputs(common.REFERENCE_INPUTS[model_name], 64, seed=11)
    out = []
    for i in range(64):
        row = {k: (v[i].tolist() if v.dtype != object else v[i]) for k, v in inputs.items()}
        value = next(iter(row.values())) if len(row) == 1 else row
        out.append(json.dumps({"instances": [value]}).encode())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--model", default="text_embedding", help="reference model name")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int)
    args = p.parse_args(argv)
    require_wrk()
    model = common.reference_model(args.model)
    payloads = bodies(args.model)
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for round_ in range(args.rounds):
        order = ["before", "after"] if round_ % 2 == 0 else ["after", "before"]
        for label in order:
            checkout = getattr(args, label).resolve()
            process, url = start(checkout, model, args.workers)
            try:
                run_wrk(url, payloads, connections=args.connections, seconds=1)  # warm-up
                result = run_wrk(
                    url,
                    payloads,
                    connections=args.connections,
                    seconds=args.seconds,
                    server_pid=process.pid,
                )
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(120)
            runs[label].append(result)
            print(
                f"round {round_ + 1} {label}: {result['requests_per_second']:.0f} req/s, "
                f"server CPU {result['server_cpu_us_per_request']:.0f} us/request",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(1)
    machine = common.describe_machine()
    print(
        f"\n{args.model}, {args.connections} connections, {args.seconds:g} s x {args.rounds} "
        f"rounds, interleaved; {machine['cpu_model']}, {machine['logical_cores']} logical cores"
    )
    print("\n| checkout | req/s | p50 ms | p99 ms | server CPU us/request |\n|---|---|---|---|---|")
    for label in ("before", "after"):
        rs = runs[label]

        def med(key: str, rs: list[dict] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        p50 = statistics.median(r["latency_ms"]["p50"] for r in rs)
        p99 = statistics.median(r["latency_ms"]["p99"] for r in rs)
        print(
            f"| {label} ({getattr(args, label)}) | {med('requests_per_second'):.0f} | "
            f"{p50:.1f} | {p99:.1f} | {med('server_cpu_us_per_request'):.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
