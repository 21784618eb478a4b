"""Reload benchmark: ``PredictionPool.reload`` under steady load from many client threads.

    python benchmarks/reload.py [--model small_cnn] [--clients 16] [--workers N]
        [--before 4] [--after 4] [--reloads 1] [--output-dir DIR]

A pool serves a reference SavedModel (``--model``) to ``--clients`` threads sending one-row
requests back to back (a closed loop). After ``--before`` seconds the pool reloads, onto a
copy of the same SavedModel in another directory (same weights, so every answer, before,
during and after, must equal the answer the pool gave for that row before the reload; a
mismatch exits with status 2), ``--reloads`` times, ``--after`` seconds apart. Reported:

- calls that failed (target 0) and calls answered;
- latency p50/p99 before the first reload, *during* each reload (from the ``reload()`` call
  to its return: the new generation loading while the old serves, the switch, the old
  generation draining) and after;
- time from ``reload()`` to traffic moving (the pool's ``generation`` changing) and to
  ``reload()`` returning (the old generation stopped and reaped);
- peak RSS of the parent plus every worker of both generations (sampled every 20 ms), against
  the same sum before the reload.

Writes ``reload.json`` to ``--output-dir`` and prints a markdown table to stdout. The parent
never imports TensorFlow. Run it on an idle machine: figures taken while other jobs share the
cores measure them too.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import common  # benchmarks/ is on sys.path as the script's directory
import numpy as np
import psutil

from pool import PredictionPool

log = logging.getLogger("reload")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small_cnn", choices=sorted(common.REFERENCE_INPUTS))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--workers", type=int, default=None, help="default: the pool's (cores)")
    p.add_argument("--before", type=float, default=4.0, help="seconds of load before reloading")
    p.add_argument("--after", type=float, default=4.0, help="seconds of load after each reload")
    p.add_argument("--reloads", type=int, default=1)
    p.add_argument("--output-dir", type=Path, default=common.HERE / "results")
    return p.parse_args(argv)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1000 if values else None


class Load:
    """``clients`` threads sending one-row requests; each call's start, end and outcome."""

    def __init__(self, pool: PredictionPool, rows: dict[str, np.ndarray], clients: int) -> None:
        self.pool, self.rows = pool, rows
        self.count = len(next(iter(rows.values())))
        self.stop = threading.Event()
        self.calls: list[tuple[float, float]] = []  # (start, end), monotonic seconds
        self.failures: list[str] = []
        self.answers: dict[int, Any] = {}  # first answer per row index (before any reload)
        self.mismatches = 0
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(clients)
        ]

    def client(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self.stop.is_set():
            i = int(rng.integers(self.count))
            one = {name: array[i : i + 1] for name, array in self.rows.items()}
            started = time.monotonic()
            try:
                result = self.pool.predict(one if len(one) > 1 else next(iter(one.values())))
            except Exception as exc:  # a failed call is the figure this benchmark reports
                with self.lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            ended = time.monotonic()
            with self.lock:
                self.calls.append((started, ended))
                want = self.answers.setdefault(i, result)
            if want is not result and not _same(result, want):
                with self.lock:
                    self.mismatches += 1

    def latencies(self, start: float, end: float) -> list[float]:
        with self.lock:
            return [e - s for s, e in self.calls if start <= s < end]


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return all(_same(got[k], want[k]) for k in want)
    return bool(np.allclose(got, want, rtol=common.RTOL, atol=common.ATOL))


def resident_bytes(pool: PredictionPool) -> int:
    """RSS of this process plus every worker of every resident generation."""
    total = psutil.Process().memory_info().rss
    for pid in pool.worker_pids():
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging()
    source = Path(common.reference_model(args.model))
    specs = common.REFERENCE_INPUTS[args.model]
    rows = common.make_inputs(specs, 64, seed=16)
    with tempfile.TemporaryDirectory(prefix="pool-reload-") as tmp:
        copies = [str(source)]
        for k in range(args.reloads):  # same weights in other directories: a real reload each
            copy = Path(tmp) / f"v{k + 2}"
            shutil.copytree(source, copy)
            copies.append(str(copy))
        return run(args, copies, rows)


def run(args: argparse.Namespace, models: list[str], rows: dict[str, np.ndarray]) -> int:
    with PredictionPool(models[0], workers=args.workers) as pool:
        load = Load(pool, rows, args.clients)
        peak = [0]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak[0] = max(peak[0], resident_bytes(pool))
                time.sleep(0.02)

        for t in load.threads:
            t.start()
        began = time.monotonic()
        time.sleep(args.before)
        steady_rss = resident_bytes(pool)
        reloads = []
        for model in models[1:]:
            generation = pool.generation
            moved: list[float] = []

            def watch(generation: int = generation, moved: list[float] = moved) -> None:
                while pool.generation == generation and not sampling.is_set():
                    time.sleep(0.001)
                moved.append(time.monotonic())

            watcher = threading.Thread(target=watch, daemon=True)
            sampler = threading.Thread(target=sample, daemon=True)
            watcher.start()
            sampler.start()
            called = time.monotonic()
            pool.reload(model)
            returned = time.monotonic()
            watcher.join(5)
            time.sleep(args.after)
            sampling.set()
            sampler.join(5)
            sampling.clear()
            reloads.append(
                {
                    "called": called,
                    "seconds_to_traffic_moved": moved[0] - called if moved else None,
                    "seconds_to_return": returned - called,
                    "p50_ms_during": percentile(load.latencies(called, returned), 50),
                    "p99_ms_during": percentile(load.latencies(called, returned), 99),
                    "calls_during": len(load.latencies(called, returned)),
                    "returned": returned,
                }
            )
        load.stop.set()
        for t in load.threads:
            t.join(30)
        end = time.monotonic()
        first, last = reloads[0]["called"], reloads[-1]["returned"]
        before = load.latencies(began, first)
        after = load.latencies(last, end)
        result = {
            "machine": common.describe_machine(),
            "command": common.command_line(argv=None),
            "git": common.git_revision(),
            "model": args.model,
            "clients": args.clients,
            "workers": pool.workers,
            "calls": len(load.calls),
            "failed_calls": len(load.failures),
            "failures": load.failures[:5],
            "mismatched_answers": load.mismatches,
            "p50_ms_before": percentile(before, 50),
            "p99_ms_before": percentile(before, 99),
            "p50_ms_after": percentile(after, 50),
            "p99_ms_after": percentile(after, 99),
            "rss_bytes_steady": steady_rss,
            "rss_bytes_peak_during_reload": peak[0],
            "reloads": reloads,
        }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "reload.json").write_text(
        json.dumps(result, indent=2, default=common.json_default)
    )
    print(markdown(result))
    return 2 if load.mismatches else 0


def markdown(r: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f}"

    lines = [
        f"`{r['command']}` — {r['machine'].get('cpu_model', '?')}, {r['model']}, "
        f"{r['workers']} workers, {r['clients']} clients",
        "",
        "| figure | value |",
        "|---|---|",
        f"| calls answered / failed | {r['calls']} / {r['failed_calls']} |",
        f"| answers differing from the same row's before the reload | {r['mismatched_answers']} |",
        f"| p50 / p99 before (ms) | {ms(r['p50_ms_before'])} / {ms(r['p99_ms_before'])} |",
    ]
    for k, x in enumerate(r["reloads"], start=1):
        lines += [
            f"| reload {k}: p50 / p99 during (ms), {x['calls_during']} calls | "
            f"{ms(x['p50_ms_during'])} / {ms(x['p99_ms_during'])} |",
            f"| reload {k}: `reload()` to traffic moved / to return (s) | "
            f"{x['seconds_to_traffic_moved']:.2f} / {x['seconds_to_return']:.2f} |",
        ]
    lines += [
        f"| p50 / p99 after (ms) | {ms(r['p50_ms_after'])} / {ms(r['p99_ms_after'])} |",
        f"| RSS, parent + workers: steady / peak during reloads (MB) | "
        f"{r['rss_bytes_steady'] / 1e6:.0f} / {r['rss_bytes_peak_during_reload'] / 1e6:.0f} |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
