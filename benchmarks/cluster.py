"""Cluster benchmark: PredictionPool on a Dask LocalCluster against the local pool and the plain
Dask idiom, at the same worker count, on one machine.

    python benchmarks/cluster.py [--workload image|cnn|text] [--workers N] [--rounds 3]
                                 [--passes 2] [--rows R] [--shard-size S] [--quick]

Three configurations, on identical inputs (one seeded RNG), each started fresh in every round
(rounds interleave them, rotating which goes first, so drift in background load hits all):

1. ``local``: ``PredictionPool(model, workers=N)`` (worker processes of this machine);
2. ``cluster``: ``PredictionPool(model, cluster=client)`` on a fresh
   ``LocalCluster(n_workers=N, threads_per_worker=1)``;
3. ``dask_idiom``: the same kind of LocalCluster, a ``WorkerPlugin`` that loads the model in
   ``setup`` and ``client.map`` over the shards then ``client.gather``
   (``benchmarks/dask_idiom.py``; TensorFlow's default thread pools).

A pass predicts every row once, in shards of ``--shard-size``; after one warm-up pass,
``--passes`` passes are timed per configuration and round; figures are medians over all timed
passes. Every configuration's outputs are checked against the local pool's (``np.allclose``): a
run whose answers differ exits with status 2. This driver never imports TensorFlow (the pools'
workers and the Dask workers do). Writes ``cluster.json`` (every raw figure and the machine)
and ``cluster.md`` to ``--output-dir``; prints the markdown and the targets (PASS / MISS,
reported, not asserted) to stdout and progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import common  # benchmarks/ is on sys.path as the script's directory
import numpy as np

log = logging.getLogger("cluster_benchmark")

DEFAULT_OUTPUT_DIR = common.HERE / "results"
CONFIGS = ("local", "cluster", "dask_idiom")
LABELS = {
    "local": "`PredictionPool(workers=N)` (local processes)",
    "cluster": "`PredictionPool(cluster=LocalCluster)`",
    "dask_idiom": "plain Dask: `WorkerPlugin` + `client.map` / `gather`",
}

#: Workloads: reference model, (quick, full) rows per pass, rows per shard.
WORKLOADS: dict[str, dict[str, Any]] = {
    "image": {"model": "mobilenet_v2", "rows": (16, 256), "shard_size": 8},
    "cnn": {"model": "small_cnn", "rows": (64, 4096), "shard_size": 16},
    "text": {"model": "text_embedding", "rows": (256, 16384), "shard_size": 64},
}

TARGETS = {"cluster / local": 0.9, "cluster / dask_idiom": 1.1}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--workload", choices=sorted(WORKLOADS), default=None)
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
    args.workload = args.workload or ("cnn" if args.quick else "image")
    workload = WORKLOADS[args.workload]
    args.rows = args.rows or workload["rows"][0 if args.quick else 1]
    args.shard_size = args.shard_size or workload["shard_size"]
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.workers = args.workers or common.default_workers()
    for name in ("rows", "shard_size", "rounds", "passes", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.output_dir is None:
        args.output_dir = DEFAULT_OUTPUT_DIR / "quick" if args.quick else DEFAULT_OUTPUT_DIR
    return args


# --- one configuration, started fresh ----------------------------------------------------------
def local_cluster(workers: int) -> tuple[Any, Any]:
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
    )
    return cluster, Client(cluster, set_as_default=False)


def shards(inputs: dict[str, np.ndarray], rows: int, size: int) -> list[dict[str, np.ndarray]]:
    return [{k: v[a : a + size] for k, v in inputs.items()} for a in range(0, rows, size)]


def as_dict(prediction: Any, output: str) -> dict[str, np.ndarray]:
    return dict(prediction) if isinstance(prediction, dict) else {output: prediction}


def run_config(kind: str, model: str, inputs: dict, args: argparse.Namespace) -> dict[str, Any]:
    """Start ``kind`` fresh, warm it up with one pass, time ``args.passes`` passes, stop it."""
    from pool import PredictionPool

    rows, size = args.rows, args.shard_size
    single = next(iter(inputs.values())) if len(inputs) == 1 else inputs
    started = time.perf_counter()
    cluster = client = None
    try:
        if kind == "dask_idiom":
            import dask_idiom

            cluster, client = local_cluster(args.workers)
            client.register_plugin(dask_idiom.LoadModel(model), name=dask_idiom.PLUGIN)

            def one_pass() -> dict[str, np.ndarray]:
                futures = client.map(
                    dask_idiom.predict_shard, shards(inputs, rows, size), pure=False
                )
                parts = client.gather(futures)
                return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

            threads = "TensorFlow default"
            return _timed(kind, one_pass, started, args, threads)
        if kind == "cluster":
            cluster, client = local_cluster(args.workers)
            pool = PredictionPool(model, cluster=client, shard_size=size)
        else:
            pool = PredictionPool(model, workers=args.workers, shard_size=size)
        with pool:
            output = pool.signature.single_output or ""
            threads = str(pool.ready_info[0].intra_op_threads)
            return _timed(
                kind, lambda: as_dict(pool.predict(single), output), started, args, threads
            )
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


def _timed(kind: str, one_pass, started: float, args: argparse.Namespace, threads: str) -> dict:
    outputs = one_pass()  # warm-up, and the outputs checked against the reference
    startup = time.perf_counter() - started
    seconds = []
    for _ in range(args.passes):
        t = time.perf_counter()
        one_pass()
        seconds.append(time.perf_counter() - t)
    log.info("%s: %s", kind, ", ".join(f"{args.rows / s:.1f} rows/s" for s in seconds))
    return {
        "kind": kind,
        "startup_and_first_pass_seconds": startup,
        "pass_seconds": seconds,
        "intra_op_threads": threads,
        "outputs": outputs,
    }


# --- the run -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    import distributed  # noqa: F401  (its import configures its loggers: quieten them after)

    logging.getLogger("distributed").setLevel(logging.ERROR)
    args = parse_args(argv)
    workload = WORKLOADS[args.workload]
    model = common.reference_model(workload["model"])
    specs = common.REFERENCE_INPUTS[workload["model"]]
    inputs = common.make_inputs(specs, args.rows, args.seed)
    machine = common.describe_machine()
    begun = time.perf_counter()
    passes: dict[str, list[float]] = {k: [] for k in CONFIGS}
    startups: dict[str, list[float]] = {k: [] for k in CONFIGS}
    threads: dict[str, str] = {}
    checks: dict[str, dict] = {}
    reference: dict[str, np.ndarray] | None = None
    for round_ in range(args.rounds):
        order = CONFIGS[round_ % 3 :] + CONFIGS[: round_ % 3]
        for kind in order:
            log.info("round %d/%d: %s, %d workers", round_ + 1, args.rounds, kind, args.workers)
            result = run_config(kind, model, inputs, args)
            passes[kind] += result["pass_seconds"]
            startups[kind].append(result["startup_and_first_pass_seconds"])
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
    rates = {k: args.rows / statistics.median(v) for k, v in passes.items()}
    report = {
        "command": common.command_line(argv),
        "date": common.now(),
        "git": common.git_revision(),
        "seconds": time.perf_counter() - begun,
        "machine": machine,
        "workload": args.workload,
        "model": workload["model"],
        "rows": args.rows,
        "shard_size": args.shard_size,
        "workers": args.workers,
        "rounds": args.rounds,
        "passes": args.passes,
        "configs": {
            k: {
                "pass_seconds": passes[k],
                "rows_per_second_median": rates[k],
                "startup_and_first_pass_seconds": startups[k],
                "intra_op_threads": threads[k],
                "check": checks[k],
            }
            for k in CONFIGS
        },
        "ratios": {
            "cluster / local": rates["cluster"] / rates["local"],
            "cluster / dask_idiom": rates["cluster"] / rates["dask_idiom"],
        },
        "targets": TARGETS,
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
        for c in report["configs"].values()
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
        "",
        f"## {report['workload']} workload: `{report['model']}`, {report['rows']} rows per pass, "
        f"shard size {report['shard_size']}, {report['workers']} workers, "
        f"{report['rounds']} round(s) × {report['passes']} timed pass(es)",
        "",
        "| Configuration | Intra-op threads per worker | rows/s median (min–max) | "
        "Start-up + first pass s (median) | Outputs |",
        "|---|---|---|---|---|",
    ]
    for kind in CONFIGS:
        c = report["configs"][kind]
        rates = [report["rows"] / s for s in c["pass_seconds"]]
        check = c["check"]
        outputs = (
            "reference"
            if check.get("reference")
            else "match"
            if check.get("outputs_match")
            else f"DIFFER ({check.get('reason')})"
        )
        lines.append(
            f"| {LABELS[kind]} | {c['intra_op_threads']} | {c['rows_per_second_median']:.1f} "
            f"({min(rates):.1f}–{max(rates):.1f}) | "
            f"{statistics.median(c['startup_and_first_pass_seconds']):.1f} | {outputs} |"
        )
    lines += ["", "Targets (reported, not asserted):", ""]
    for name, target in report["targets"].items():
        value = report["ratios"][name]
        status = "PASS" if value >= target else "MISS"
        lines.append(f"    {status}  {name} rows/s: {value:.2f} (target >= {target})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
