"""Cluster benchmark: PredictionPool on a Dask cluster against the local pool and the plain Dask
idiom, at the same worker count, on one machine; and the bytes each shard costs the scheduler.

    python benchmarks/cluster.py [--workload image,text] [--workers N] [--rounds 3]
                                 [--passes 2] [--rows R] [--shard-size S] [--quick]

Three configurations, on identical inputs (one seeded RNG), each started fresh in every round
(rounds interleave them, rotating which goes first, so drift in background load hits all):

1. ``local``: ``PredictionPool(model, workers=N)`` (worker processes of this machine);
2. ``cluster``: ``PredictionPool(model, cluster=client)`` on a fresh Dask cluster whose
   scheduler and N workers (``--nthreads 1``, each with its Nanny) are processes of their own,
   as on a real cluster (``python -m distributed.cli.dask_scheduler`` / ``dask_worker``);
3. ``dask_idiom``: the same kind of cluster, a ``WorkerPlugin`` that loads the model in
   ``setup``, ``client.scatter`` of the shards first, ``client.map`` over the scattered
   futures, then ``client.gather`` (``benchmarks/dask_idiom.py``; TensorFlow's default thread
   pools).

A pass predicts every row once, in shards of ``--shard-size``; after one warm-up pass,
``--passes`` passes are timed per configuration and round; figures are medians over all timed
passes. For the two Dask configurations, the bytes the scheduler process sent and received on
its TCP sockets during the timed passes (``ss -tin`` counters of its sockets) are divided by
the shards of those passes; beside them, the share of that which the scheduler exchanges when
idle (heartbeats: measured for as long after the passes, at most 5 s, and scaled). Every
configuration's outputs are checked against the local pool's (``np.allclose``): a run whose
answers differ exits with status 2. This driver never imports TensorFlow (the pools' workers
and the Dask workers do). Writes ``cluster.json`` (every raw
figure and the machine) and ``cluster.md`` to ``--output-dir``; prints the markdown and the
targets (PASS / MISS, reported, not asserted) to stdout and progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common  # benchmarks/ is on sys.path as the script's directory
import numpy as np

log = logging.getLogger("cluster_benchmark")

DEFAULT_OUTPUT_DIR = common.HERE / "results"
CONFIGS = ("local", "cluster", "dask_idiom")
LABELS = {
    "local": "`PredictionPool(workers=N)` (local processes)",
    "cluster": "`PredictionPool(cluster=client)`",
    "dask_idiom": "plain Dask: `WorkerPlugin` + `scatter`, `map`, `gather`",
}

#: Workloads: reference model, (quick, full) rows per pass, rows per shard.
WORKLOADS: dict[str, dict[str, Any]] = {
    "image": {"model": "mobilenet_v2", "rows": (16, 256), "shard_size": 8},
    "cnn": {"model": "small_cnn", "rows": (64, 4096), "shard_size": 16},
    "text": {"model": "text_embedding", "rows": (256, 16384), "shard_size": 64},
}

TARGETS = {"cluster / local": 0.9, "cluster / dask_idiom": 1.1}
#: Bytes through the scheduler per shard, at most (net of what it exchanges when idle).
BYTES_TARGET = 1024
#: Seconds of idle scheduler traffic measured after the timed passes (scaled to their length).
IDLE_SECONDS = 5.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--workload",
        default=None,
        help=f"comma-separated, of {', '.join(sorted(WORKLOADS))} (default image,text)",
    )
    p.add_argument("--workers", type=int, default=None, help="default: physical cores")
    p.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--passes", type=int, default=2, help="timed passes per round (default 2)")
    p.add_argument("--rows", type=int, default=None, help="rows per pass (workload default)")
    p.add_argument("--shard-size", type=int, default=None, help="(workload default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=None)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: the cnn workload, 64 rows, one round (figures not meaningful)",
    )
    args = p.parse_args(argv)
    args.workloads = (args.workload or ("cnn" if args.quick else "image,text")).split(",")
    for name in args.workloads:
        if name not in WORKLOADS:
            p.error(f"--workload must name some of {sorted(WORKLOADS)}, got {name!r}")
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.workers = args.workers or common.default_workers()
    for name in ("rows", "shard_size", "rounds", "passes", "workers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.output_dir is None:
        args.output_dir = DEFAULT_OUTPUT_DIR / "quick" if args.quick else DEFAULT_OUTPUT_DIR
    return args


# --- one configuration, started fresh ----------------------------------------------------------
@contextlib.contextmanager
def dask_cluster(workers: int) -> Iterator[tuple[Any, int]]:
    """A scheduler and ``workers`` one-thread workers (with Nannies) as processes of their own;
    yields ``(client, scheduler pid)``."""
    from distributed import Client

    scratch = Path(tempfile.mkdtemp(prefix="pool-cluster-bench-"))
    address_file = scratch / "scheduler.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(common.REPO), str(common.HERE), os.environ.get("PYTHONPATH")) if p
        ),
    }
    python = [sys.executable, "-m"]
    quiet = subprocess.DEVNULL
    scheduler = subprocess.Popen(
        python + ["distributed.cli.dask_scheduler", "--scheduler-file", str(address_file)]
        + ["--no-dashboard", "--port", "0"],
        env=env, stdout=quiet, stderr=quiet,
    )  # fmt: skip
    processes = [scheduler]
    client = None
    try:
        deadline = time.monotonic() + 120
        while not address_file.exists():
            if time.monotonic() > deadline or scheduler.poll() is not None:
                raise RuntimeError("the Dask scheduler did not start")
            time.sleep(0.1)
        processes.append(
            subprocess.Popen(
                python
                + ["distributed.cli.dask_worker", "--scheduler-file", str(address_file)]
                + ["--nworkers", str(workers), "--nthreads", "1", "--no-dashboard"],
                env=env,
                stdout=quiet,
                stderr=quiet,
            )  # fmt: skip
        )
        client = Client(scheduler_file=str(address_file), set_as_default=False)
        client.wait_for_workers(workers, timeout=120)
        yield client, scheduler.pid
    finally:
        if client is not None:
            client.close()
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def socket_bytes(pid: int) -> int | None:
    """Bytes sent plus received on the TCP sockets of process ``pid`` (``ss -tinp``), or None
    where ``ss`` is missing."""
    try:
        listing = subprocess.run(
            ["ss", "-tinpH"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total, mine = 0, False
    for line in listing.splitlines():
        if not line[:1].isspace():
            mine = f"pid={pid}," in line
        elif mine:
            for name in ("bytes_sent", "bytes_received"):
                found = re.search(rf"\b{name}:(\d+)", line)
                total += int(found.group(1)) if found else 0
    return total


def shards(inputs: dict[str, np.ndarray], rows: int, size: int) -> list[dict[str, np.ndarray]]:
    return [{k: v[a : a + size] for k, v in inputs.items()} for a in range(0, rows, size)]


def as_dict(prediction: Any, output: str) -> dict[str, np.ndarray]:
    return dict(prediction) if isinstance(prediction, dict) else {output: prediction}


def run_config(
    kind: str, model: str, inputs: dict, args: argparse.Namespace, rows: int, size: int
) -> dict[str, Any]:
    """Start ``kind`` fresh, warm it up with one pass, time ``args.passes`` passes, stop it."""
    from pool import PredictionPool

    single = next(iter(inputs.values())) if len(inputs) == 1 else inputs
    started = time.perf_counter()
    if kind == "local":
        with PredictionPool(model, workers=args.workers, shard_size=size) as pool:
            output = pool.signature.single_output or ""
            threads = str(pool.ready_info[0].intra_op_threads)
            return _timed(
                kind, lambda: as_dict(pool.predict(single), output), started, args, rows, size
            ) | {"intra_op_threads": threads}
    with dask_cluster(args.workers) as (client, scheduler_pid):
        if kind == "dask_idiom":
            import dask_idiom

            client.register_plugin(dask_idiom.LoadModel(model), name=dask_idiom.PLUGIN)

            def one_pass() -> dict[str, np.ndarray]:
                # the data first, then tasks (hash=False: every pass scatters the same shards)
                data = client.scatter(shards(inputs, rows, size), hash=False)
                futures = client.map(dask_idiom.predict_shard, data, pure=False)
                parts = client.gather(futures)
                return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

            result = _timed(kind, one_pass, started, args, rows, size, scheduler_pid)
            return result | {"intra_op_threads": "TensorFlow default"}
        with PredictionPool(model, cluster=client, shard_size=size) as pool:
            output = pool.signature.single_output or ""
            threads = str(pool.ready_info[0].intra_op_threads)
            return _timed(
                kind,
                lambda: as_dict(pool.predict(single), output),
                started,
                args,
                rows,
                size,
                scheduler_pid,
            ) | {"intra_op_threads": threads}


def _timed(
    kind: str,
    one_pass,
    started: float,
    args: argparse.Namespace,
    rows: int,
    size: int,
    scheduler_pid: int | None = None,
) -> dict:
    outputs = one_pass()  # warm-up, and the outputs checked against the reference
    startup = time.perf_counter() - started
    seconds = []
    before = socket_bytes(scheduler_pid) if scheduler_pid else None
    for _ in range(args.passes):
        t = time.perf_counter()
        one_pass()
        seconds.append(time.perf_counter() - t)
    after = socket_bytes(scheduler_pid) if scheduler_pid else None
    per_shard = idle_per_shard = None
    if scheduler_pid and before is not None and after is not None:
        shard_count = args.passes * -(-rows // size)
        per_shard = (after - before) / shard_count
        # What the scheduler exchanges anyway (heartbeats, metrics), over as long as the passes
        # took (at most IDLE_SECONDS, scaled): reported beside, so the net cost can be told.
        window = min(sum(seconds), IDLE_SECONDS)
        idle_before = socket_bytes(scheduler_pid) or 0
        time.sleep(window)
        idle = ((socket_bytes(scheduler_pid) or 0) - idle_before) * sum(seconds) / window
        idle_per_shard = idle / shard_count
    log.info("%s: %s", kind, ", ".join(f"{rows / s:.1f} rows/s" for s in seconds))
    return {
        "kind": kind,
        "startup_and_first_pass_seconds": startup,
        "pass_seconds": seconds,
        "scheduler_bytes_per_shard": per_shard,
        "scheduler_idle_bytes_per_shard": idle_per_shard,
        "outputs": outputs,
    }


# --- the run -----------------------------------------------------------------------------------
def run_workload(name: str, args: argparse.Namespace) -> dict[str, Any]:
    workload = WORKLOADS[name]
    rows = args.rows or workload["rows"][0 if args.quick else 1]
    size = args.shard_size or workload["shard_size"]
    model = common.reference_model(workload["model"])
    specs = common.REFERENCE_INPUTS[workload["model"]]
    inputs = common.make_inputs(specs, rows, args.seed)
    passes: dict[str, list[float]] = {k: [] for k in CONFIGS}
    startups: dict[str, list[float]] = {k: [] for k in CONFIGS}
    scheduler_bytes: dict[str, list[float]] = {k: [] for k in CONFIGS}
    idle_bytes: dict[str, list[float]] = {k: [] for k in CONFIGS}
    threads: dict[str, str] = {}
    checks: dict[str, dict] = {}
    reference: dict[str, np.ndarray] | None = None
    for round_ in range(args.rounds):
        order = CONFIGS[round_ % 3 :] + CONFIGS[: round_ % 3]
        for kind in order:
            log.info(
                "%s, round %d/%d: %s, %d workers", name, round_ + 1, args.rounds, kind, args.workers
            )
            result = run_config(kind, model, inputs, args, rows, size)
            passes[kind] += result["pass_seconds"]
            startups[kind].append(result["startup_and_first_pass_seconds"])
            if result["scheduler_bytes_per_shard"] is not None:
                scheduler_bytes[kind].append(result["scheduler_bytes_per_shard"])
                idle_bytes[kind].append(result["scheduler_idle_bytes_per_shard"])
            threads[kind] = result["intra_op_threads"]
            if kind == "local" and reference is None:
                reference = result["outputs"]
            checks.setdefault(kind, {"pending": result["outputs"]})
    assert reference is not None
    for kind in CONFIGS:
        checks[kind] = (
            {"reference": True}
            if kind == "local"
            else common.verify(checks[kind].pop("pending"), reference)
        )
    rates = {k: rows / statistics.median(v) for k, v in passes.items()}
    return {
        "model": workload["model"],
        "rows": rows,
        "shard_size": size,
        "configs": {
            k: {
                "pass_seconds": passes[k],
                "rows_per_second_median": rates[k],
                "startup_and_first_pass_seconds": startups[k],
                "scheduler_bytes_per_shard": (
                    statistics.median(scheduler_bytes[k]) if scheduler_bytes[k] else None
                ),
                "scheduler_idle_bytes_per_shard": (
                    statistics.median(idle_bytes[k]) if idle_bytes[k] else None
                ),
                "intra_op_threads": threads[k],
                "check": checks[k],
            }
            for k in CONFIGS
        },
        "ratios": {
            "cluster / local": rates["cluster"] / rates["local"],
            "cluster / dask_idiom": rates["cluster"] / rates["dask_idiom"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    import distributed  # noqa: F401  (its import configures its loggers: quieten them after)

    logging.getLogger("distributed").setLevel(logging.ERROR)
    args = parse_args(argv)
    machine = common.describe_machine()
    begun = time.perf_counter()
    workloads = {name: run_workload(name, args) for name in args.workloads}
    report = {
        "command": common.command_line(argv),
        "date": common.now(),
        "git": common.git_revision(),
        "seconds": time.perf_counter() - begun,
        "machine": machine,
        "workers": args.workers,
        "rounds": args.rounds,
        "passes": args.passes,
        "workloads": workloads,
        "targets": TARGETS,
        "scheduler_bytes_target": BYTES_TARGET,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "cluster.json").write_text(
        json.dumps(report, indent=2, default=common.json_default) + "\n"
    )
    text = markdown(report)
    (args.output_dir / "cluster.md").write_text(text)
    sys.stdout.write(text)
    checks_passed = [
        c["check"].get("outputs_match", c["check"].get("reference"))
        for w in workloads.values()
        for c in w["configs"].values()
    ]
    if not all(checks_passed):
        return 2
    return 0


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Cluster benchmark: latest run",
        "",
        f"Command: `{report['command']}` ({report['date']}, git {report['git']}, "
        f"{report['seconds']:.0f} s)",
        "",
        f"Machine: {m['cpu_model']}, {m['physical_cores']} physical / {m['logical_cores']} "
        f"logical cores, Python {m['python']}, TensorFlow {m['tensorflow']}, load average at "
        f"start {' / '.join(f'{x:.2f}' for x in m['load_average_at_start'] or [])}",
    ]
    for name, w in report["workloads"].items():
        lines += [
            "",
            f"## {name} workload: `{w['model']}`, {w['rows']} rows per pass, "
            f"shard size {w['shard_size']}, {report['workers']} workers, "
            f"{report['rounds']} round(s) × {report['passes']} timed pass(es)",
            "",
            "| Configuration | Intra-op threads per worker | rows/s median (min–max) | "
            "Start-up + first pass s (median) | Scheduler bytes per shard (idle share) | "
            "Outputs |",
            "|---|---|---|---|---|---|",
        ]
        for kind in CONFIGS:
            c = w["configs"][kind]
            rates = [w["rows"] / s for s in c["pass_seconds"]]
            check = c["check"]
            outputs = (
                "reference"
                if check.get("reference")
                else "match"
                if check.get("outputs_match")
                else f"DIFFER ({check.get('reason')})"
            )
            sent, idle = c["scheduler_bytes_per_shard"], c["scheduler_idle_bytes_per_shard"]
            lines.append(
                f"| {LABELS[kind]} | {c['intra_op_threads']} | {c['rows_per_second_median']:.1f} "
                f"({min(rates):.1f}–{max(rates):.1f}) | "
                f"{statistics.median(c['startup_and_first_pass_seconds']):.1f} | "
                f"{'–' if sent is None else f'{sent:,.0f} ({idle:,.0f})'} | {outputs} |"
            )
        lines += ["", "Targets (reported, not asserted):", ""]
        for target_name, target in report["targets"].items():
            value = w["ratios"][target_name]
            status = "PASS" if value >= target else "MISS"
            lines.append(f"    {status}  {target_name} rows/s: {value:.2f} (target >= {target})")
        cluster = w["configs"]["cluster"]
        if cluster["scheduler_bytes_per_shard"] is not None:
            net = cluster["scheduler_bytes_per_shard"] - cluster["scheduler_idle_bytes_per_shard"]
            status = "PASS" if net <= report["scheduler_bytes_target"] else "MISS"
            lines.append(
                f"    {status}  cluster scheduler bytes per shard, net of idle: {net:,.0f} "
                f"(target <= {report['scheduler_bytes_target']})"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
