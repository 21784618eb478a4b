"""Core-scaling benchmark: PredictionPool against the baselines a user would pick instead.

    python benchmarks/core_scaling.py [--workload image,cnn,text] [--workers 1,2,4]
                                      [--rounds 5] [--model PATH_OR_HANDLE] [--quick]
                                      [--runtimes openvino,onnxruntime,auto,openvino-bf16]

In one run, on identical inputs (one seeded RNG, one ``.npy`` file read by every
configuration), each workload (``image``: MobileNetV2 or ``--model``, shards of 8; ``cnn``: the
small reference CNN, shards of 16; ``text``: the reference text embedding, shards of 64)
measures:

1. ``load_per_call``: ``hub.load`` then predict, for each request (a few requests only);
2. ``single`` / ``single_batch``: ``hub.load`` once in one process, TensorFlow using every core
   via intra-op threads, called on shards of the same size, then on one batch of all rows;
3. ``executor``: a plain spawn ``ProcessPoolExecutor`` whose initializer loads the model, arrays
   pickled through the pipe, at every worker count;
4. ``pool``: ``PredictionPool`` at every worker count, same shard size;
5. the runtime configurations (issue 14, ``--runtimes``; none with ``--runtimes none``):
   ``runtime_pool`` (``PredictionPool(runtime=R)`` for each R, ``auto`` included, at every
   ``--runtime-workers`` count), ``runtime_ceiling`` (the no-IPC ceiling of TensorFlow and of
   each converted runtime that runs: N independent processes with their rows in memory, one
   thread each) and ``runtime_single`` (each converted runtime's own best single-process
   configuration on every core). Every runtime is resolved (converted, verified, cached) by
   ``pool.runtimes.resolve`` before anything is timed; their outputs are checked against
   TensorFlow's relative to each output's scale, within ``pool.runtimes.TOLERANCES``.

Each configuration runs in a fresh process of its own (``scaling_runner.py``): its start-up,
thread settings and memory are its own, and this driver never imports TensorFlow. The
executor and the pool are measured in ``--rounds`` rounds (fresh processes each round), worker
counts and the kinds interleaved (executor 1, pool 1, executor 2, pool 2, then the runtime
configurations; the next round runs each worker count's in reverse order), so that drift in
background load hits all alike; their figures are
medians over every round's passes. Every configuration's outputs are checked against the first
one's (``np.allclose``): a run whose answers differ exits with status 2. Writes
``core_scaling.json`` (every raw figure and the machine), ``core_scaling.png`` and
``latest.md`` to ``--output-dir``; prints the markdown tables and the targets (PASS / MISS) to
stdout and progress to stderr. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common  # benchmarks/ is on sys.path as the script's directory
import numpy as np
import scaling_report

from pool.runtimes import TOLERANCES

log = logging.getLogger("core_scaling")

RUNNER = common.HERE / "scaling_runner.py"
DEFAULT_OUTPUT_DIR = common.HERE / "results"

#: Workloads: reference model (``image`` takes ``--model``), then (quick, full) rows per pass
#: and rows per shard.
WORKLOADS: dict[str, dict[str, Any]] = {
    "image": {"model": None, "rows": (16, 128), "shard_size": 8},
    "cnn": {"model": "small_cnn", "rows": (64, 4096), "shard_size": 16},
    "text": {"model": "text_embedding", "rows": (256, 16384), "shard_size": 64},
}


def _workloads(text: str) -> list[str]:
    if text == "all":
        return list(WORKLOADS)
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected 'all' or a comma-separated subset of {','.join(WORKLOADS)}, got {text!r}"
        )
    return list(dict.fromkeys(names))


#: The runtime configurations: a runtime of ``pool.runtimes`` (``-bf16``: precision="bf16").
RUNTIME_KEYS = ("openvino", "onnxruntime", "auto", "openvino-bf16")
RUNTIME_BASELINES = ("single", "ceiling")


def _runtimes(text: str) -> list[str]:
    if text == "none":
        return []
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in RUNTIME_KEYS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected 'none' or a comma-separated subset of {','.join(RUNTIME_KEYS)}, got {text!r}"
        )
    return list(dict.fromkeys(names))


def _baselines(text: str) -> list[str]:
    if text == "none":
        return []
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or any(n not in RUNTIME_BASELINES for n in names):
        raise argparse.ArgumentTypeError(
            f"expected 'none' or a comma-separated subset of single,ceiling, got {text!r}"
        )
    return list(dict.fromkeys(names))


def default_runtimes() -> list[str]:
    """Every installed converted runtime, ``auto``, and OpenVINO in bf16 if installed."""
    from pool.runtimes import CONVERTED, installed

    found = [r for r in CONVERTED if installed(r, converting=True)]
    return [*found, "auto", *(["openvino-bf16"] if "openvino" in found else [])]


def split_key(key: str) -> tuple[str, str]:
    """``(runtime, precision)`` of a runtime configuration key such as ``openvino-bf16``."""
    runtime, _, precision = key.partition("-")
    return runtime, precision or "f32"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--workload",
        type=_workloads,
        default=None,
        help="image (--model, default MobileNetV2), cnn (the small reference CNN), text (the "
        "reference text embedding): 'all' (default) or a comma-separated list (cnn with --quick)",
    )
    p.add_argument(
        "--model",
        default="mobilenet_v2",
        help="image workload: SavedModel directory, TF Hub handle or reference model name "
        "(default: mobilenet_v2, the reference MobileNetV2 SavedModel)",
    )
    p.add_argument(
        "--workers",
        default=None,
        help="worker counts for the pools, comma-separated (default: 1 .. physical cores)",
    )
    for name, w in WORKLOADS.items():
        p.add_argument(
            f"--{name}-rows",
            type=int,
            default=None,
            help=f"{name} rows per pass (default {w['rows'][1]}; {w['rows'][0]} with --quick)",
        )
        p.add_argument(
            f"--{name}-shard-size",
            type=int,
            default=w["shard_size"],
            help=f"{name} rows per shard (default {w['shard_size']})",
        )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of the executor, the pool and the runtime configurations, each in fresh "
        "processes, interleaved (default 5; 1 with --quick)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed passes per process, after the warm-up pass (default 1)",
    )
    p.add_argument(
        "--latency-requests",
        type=int,
        default=None,
        help="shards sent one at a time for latency, per process (default 4; 2 with --quick)",
    )
    p.add_argument(
        "--load-per-call-requests",
        type=int,
        default=None,
        help="requests timed for load-per-call (default 3; 1 with --quick)",
    )
    p.add_argument(
        "--threads-per-worker",
        type=int,
        default=1,
        help="intra-op threads of each pool / executor worker (default 1)",
    )
    p.add_argument("--start-method", default=None, help="PredictionPool start method")
    p.add_argument(
        "--max-batch-rows",
        type=int,
        default=None,
        help="PredictionPool max_batch_rows (default: the pool's default)",
    )
    p.add_argument(
        "--runtimes",
        type=_runtimes,
        default=None,
        help="converted runtimes for the runtime configurations, comma-separated among "
        f"{','.join(RUNTIME_KEYS)}, or 'none' (default: every installed one, auto and "
        "openvino-bf16; auto with --quick)",
    )
    p.add_argument(
        "--runtime-baselines",
        type=_baselines,
        default=None,
        help="what runs beside the runtime pools: single (each runtime's best single-process "
        "configuration), ceiling (its no-IPC ceiling), comma-separated, or 'none' "
        "(default single,ceiling)",
    )
    p.add_argument(
        "--runtime-workers",
        default=None,
        help="worker counts of the runtime pools and ceilings, comma-separated (default: "
        "--workers)",
    )
    p.add_argument(
        "--runtime-only",
        action="store_true",
        help="skip load-per-call and the plain executor: the TensorFlow single process (the "
        "reference) and pool, then the runtime configurations",
    )
    p.add_argument("--seed", type=int, default=0, help="RNG seed of the inputs (default 0)")
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help=f"default: {DEFAULT_OUTPUT_DIR.relative_to(common.REPO)} "
        f"({DEFAULT_OUTPUT_DIR.relative_to(common.REPO)}/quick with --quick)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run of about a minute: the cnn workload, 64 rows, one round, runtime "
        "'auto' (its figures are not meaningful)",
    )
    p.add_argument(
        "--update-docs",
        action="store_true",
        help="also paste latest.md into docs/benchmarks.md between its core_scaling markers",
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: redraw the tables and plot from --output-dir/core_scaling.json",
    )
    args = p.parse_args(argv)
    quick = args.quick
    defaults: dict[str, tuple[Any, Any]] = {
        "workload": (["cnn"], list(WORKLOADS)),
        "rounds": (1, 5),
        "latency_requests": (2, 4),
        "load_per_call_requests": (1, 3),
    }
    defaults.update({f"{n}_rows": w["rows"] for n, w in WORKLOADS.items()})
    for name, (quick_value, full_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_value if quick else full_value)
    if args.workers is None:
        args.workers = list(range(1, common.default_workers() + 1))
    else:
        args.workers = sorted({int(w) for w in str(args.workers).split(",") if w.strip()})
    if args.runtimes is None:
        args.runtimes = ["auto"] if quick else default_runtimes()
    if args.runtime_baselines is None:
        args.runtime_baselines = ["single", "ceiling"]
    if args.runtime_workers is None:
        args.runtime_workers = list(args.workers)
    else:
        args.runtime_workers = sorted(
            {int(w) for w in str(args.runtime_workers).split(",") if w.strip()}
        )
        if not set(args.runtime_workers) <= set(args.workers):
            p.error("--runtime-workers must be a subset of --workers")
    positive = ["rounds", "repeats", "threads_per_worker"]
    positive += [f"{n}_{k}" for n in WORKLOADS for k in ("rows", "shard_size")]
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.workers or min(args.workers) < 1:
        p.error("--workers must be positive integers")
    if args.output_dir is None:
        args.output_dir = DEFAULT_OUTPUT_DIR / "quick" if quick else DEFAULT_OUTPUT_DIR
    return args


# --- running configurations ------------------------------------------------------------------
def run_config(workdir: Path, name: str, spec: dict) -> tuple[list[dict], list[dict]]:
    """Run one configuration in a fresh process; return its entries and their outputs."""
    entries, outputs = common.run_process(RUNNER, workdir, name, spec)
    return entries, [outputs.get(str(i), {}) for i in range(len(entries))]


def resolve_model(model: str, workdir: Path) -> tuple[str, dict[str, list]]:
    """``(local SavedModel path, {input name: [dtype, shape]})`` for ``model``."""
    from pool import reference_models

    if model in reference_models.BUILDERS:
        path = common.reference_model(model)
        if model in common.REFERENCE_INPUTS:
            return path, common.REFERENCE_INPUTS[model]
    elif "://" in model:
        path = model
    elif os.path.isdir(model):
        path = os.path.abspath(model)
    else:
        raise SystemExit(f"--model {model!r}: no such directory, TF Hub handle or reference model")
    log.info("reading the signature of %s", model)
    (described,), _ = run_config(workdir, "describe", {"kind": "describe", "model": path})
    return described["model"], described["inputs"]


def resolve_runtimes(args: argparse.Namespace, model: str, shard_size: int) -> dict[str, Any]:
    """Convert, verify and cache each runtime configuration's artifact *before* anything is
    timed (``pool.runtimes.resolve``, the pools' own code path; the conversion runs in a
    subprocess, this driver imports no TensorFlow). The pools started later find the cache:
    their start-up holds no conversion. A runtime that cannot run the model (the text model:
    string ops) is skipped with the reason; ``auto`` falls back to TensorFlow."""
    from pool.errors import ModelLoadError
    from pool.runtimes import cache
    from pool.runtimes.resolve import resolve

    found: dict[str, Any] = {"cache": str(cache.cache_root()), "resolved": {}, "skipped": {}}
    if not args.runtimes:
        return found
    log.info(
        "runtimes %s: converting once (not timed; cached in %s: later runs skip this) ...",
        ",".join(args.runtimes),
        found["cache"],
    )
    for key in args.runtimes:
        runtime, precision = split_key(key)
        started = time.perf_counter()
        try:
            r = resolve(model, runtime=runtime, precision=precision, shard_size=shard_size)
        except ModelLoadError as e:
            found["skipped"][key] = str(e)
            log.info("runtime %s skipped: %s", key, e)
            continue
        seconds = time.perf_counter() - started
        found["resolved"][key] = {
            "runtime": r.runtime,
            "precision": r.precision,
            "artifact": r.artifact,
            "info": r.info,
            "resolve_seconds": seconds,
        }
        log.info("runtime %s: runs %s (ready in %.1f s)", key, r.runtime, seconds)
    return found


def runtime_plan(args: argparse.Namespace, runtimes: dict[str, Any]) -> dict[str, Any]:
    """What the runtime configurations run: the pools (by key), the no-IPC ceilings and the
    best single processes (by runtime, f32), each with its artifact."""
    resolved = runtimes["resolved"]
    if not resolved:  # --runtimes none, or none could run: the TensorFlow plan alone
        return {"pools": [], "ceilings": [], "singles": [], "artifacts": {}}
    artifacts: dict[str, str | None] = {"tensorflow": None}
    for r in resolved.values():
        if r["precision"] == "f32":  # auto's choice, or an explicit runtime
            artifacts.setdefault(r["runtime"], r["artifact"])
    return {
        "pools": list(resolved),
        "ceilings": list(artifacts) if "ceiling" in args.runtime_baselines else [],
        "singles": [r for r in artifacts if r != "tensorflow"]
        if "single" in args.runtime_baselines
        else [],
        "artifacts": artifacts,
    }


def plan(
    args: argparse.Namespace, runtimes: dict[str, Any] | None = None
) -> list[tuple[str, dict]]:
    """The configurations in the order they run: the in-process baselines once, then
    ``rounds`` rounds of executor, pool and the runtime configurations at every worker count,
    interleaved; the order within a worker count is reversed every other round."""
    extra = runtime_plan(args, runtimes or {"resolved": {}})
    configs: list[tuple[str, dict]] = [
        ("single", {"kind": "single", "intra_op_threads": common.usable_cpus()}),
    ]
    if not args.runtime_only:
        configs.append(
            (
                "load_per_call",
                {
                    "kind": "load_per_call",
                    "intra_op_threads": common.usable_cpus(),
                    "requests": args.load_per_call_requests,
                },
            )
        )
    for runtime in extra["singles"]:
        spec = {
            "kind": "runtime_single",
            "runtime": runtime,
            "runtime_key": runtime,
            "artifact": extra["artifacts"][runtime],
            "cores": common.usable_cpus(),
        }
        configs.append((f"runtime_single-{runtime}", spec))
    for r in range(args.rounds):
        for n in args.workers:
            group: list[tuple[str, dict]] = []
            for kind in ("pool",) if args.runtime_only else ("executor", "pool"):
                spec = {
                    "kind": kind,
                    "threads_per_worker": args.threads_per_worker,
                    "start_method": args.start_method,
                    "max_batch_rows": args.max_batch_rows,
                }
                group.append((kind, spec))
            if n in args.runtime_workers:
                for key in extra["pools"]:
                    runtime, precision = split_key(key)
                    spec = {
                        "kind": "runtime_pool",
                        "runtime": runtime,
                        "precision": precision,
                        "runtime_key": key,
                        "threads_per_worker": args.threads_per_worker,
                        "start_method": args.start_method,
                        "max_batch_rows": args.max_batch_rows,
                    }
                    group.append((f"runtime_pool-{key}", spec))
                for runtime in extra["ceilings"]:
                    spec = {
                        "kind": "runtime_ceiling",
                        "runtime": runtime,
                        "runtime_key": runtime,
                        "artifact": extra["artifacts"][runtime],
                    }
                    group.append((f"runtime_ceiling-{runtime}", spec))
            if r % 2:
                group.reverse()
            for name, spec in group:
                configs.append((f"{name}-{n}-round{r}", {**spec, "round": r, "workers": n}))
    for _, spec in configs:
        spec.setdefault("inter_op_threads", None)
    return configs


def run_workload(args: argparse.Namespace, workload: str, workdir: Path) -> dict[str, Any]:
    model = args.model if workload == "image" else WORKLOADS[workload]["model"]
    rows = getattr(args, f"{workload}_rows")
    shard_size = getattr(args, f"{workload}_shard_size")
    path, input_specs = resolve_model(model, workdir)
    inputs = common.make_inputs(input_specs, rows, args.seed)
    runtimes = resolve_runtimes(args, path, shard_size) if "://" not in path else None
    common_spec = {
        "model": path,
        "inputs": common.save_inputs(inputs, workdir, workload),
        "shard_size": shard_size,
        "repeats": args.repeats,
        "latency_requests": args.latency_requests,
    }
    entries: list[dict] = []
    reference = None
    for name, spec in plan(args, runtimes):
        log.info("%s: %s ...", workload, name)
        started = time.perf_counter()
        got, outputs = run_config(workdir, f"{workload}-{name}", {**common_spec, **spec})
        for e, out in zip(got, outputs, strict=True):
            e.update(workers=spec.get("workers", 1), shard_size=shard_size)
            if "round" in spec:
                e["round"] = spec["round"]
            if "runtime_key" in spec:
                e["runtime_key"] = spec["runtime_key"]
                e["precision"] = spec.get("precision", "f32")
            if e["label"] == "single_batch":
                e["shard_size"] = rows
            e["rows_per_pass"] = e.get("rows_per_pass") or [rows] * len(e["pass_seconds"])
            if reference is None:
                reference = out
                e["verification"] = {"outputs_match": True, "reference": True}
            elif e["label"].startswith("runtime_"):
                # converted runtimes: within the tolerance of their precision, relative to
                # each output's scale (what pool.runtimes verifies), against TensorFlow
                tolerance = TOLERANCES[e["precision"]]
                e["verification"] = common.verify_scaled(out, reference, tolerance)
            else:
                e["verification"] = common.verify(out, reference)
            if not e["verification"]["outputs_match"]:
                log.error("%s: outputs differ: %s", e["label"], e["verification"]["reason"])
            entries.append(e)
        log.info(
            "%s: %s done in %.1f s: %s",
            workload,
            name,
            time.perf_counter() - started,
            ", ".join(scaling_report.one_line(e) for e in got),
        )
    return {
        "model": model,
        "model_path": path,
        "inputs": {n: {"dtype": d, "shape": s} for n, (d, s) in input_specs.items()},
        "rows": rows,
        "shard_size": shard_size,
        "runtimes": runtimes,
        "entries": merge_rounds(entries),
    }


def merge_rounds(entries: list[dict]) -> list[dict]:
    """One entry per (label, workers): the rounds' passes and latencies pooled, start-up the
    median of the rounds', parent CPU summed, memory from the round with the highest peak;
    every round's own figures kept under ``rounds``."""
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for e in entries:
        groups.setdefault((e["label"], e.get("runtime_key", ""), e["workers"]), []).append(e)
    merged = []
    for group in groups.values():
        if len(group) == 1 and "round" not in group[0]:
            merged.append(group[0])
            continue
        last = group[-1]  # the last round's worker stats and ready info
        e = dict(last)
        e["pass_seconds"] = [s for g in group for s in g["pass_seconds"]]
        e["rows_per_pass"] = [r for g in group for r in g["rows_per_pass"]]
        e["latency_seconds"] = [s for g in group for s in g["latency_seconds"] or []]
        for key in ("startup_seconds", "ready_seconds", "first_pass_seconds"):
            values = [g[key] for g in group if g.get(key) is not None]
            e[key] = float(np.median(values)) if values else None
        e["memory"] = max(
            (g["memory"] for g in group), key=lambda m: m.get("peak_rss_bytes_max") or 0
        )
        if all("parent_cpu" in g for g in group):
            e["parent_cpu"] = {
                k: sum(g["parent_cpu"][k] for g in group) for k in group[0]["parent_cpu"]
            }
            e["timed_shards"] = sum(g["timed_shards"] for g in group)
        if all(g.get("model_calls") for g in group):
            rows = sum(g["model_calls"]["rows"] for g in group)
            calls = sum(g["model_calls"]["model_calls"] for g in group)
            e["model_calls"] = {
                **last["model_calls"],
                "rows": rows,
                "shards": sum(g["model_calls"]["shards"] for g in group),
                "model_calls": calls,
                "rows_per_model_call": rows / calls if calls else None,
            }
        copies = [g["copies_per_shard"] for g in group if g.get("copies_per_shard") is not None]
        e["copies_per_shard"] = float(np.median(copies)) if copies else None
        checks = [g["verification"] for g in group]
        failed = [c for c in checks if not c["outputs_match"]]
        e["verification"] = (
            failed[0]
            if failed
            else {
                "outputs_match": True,
                "max_abs_diff": max(c.get("max_abs_diff", 0.0) for c in checks),
                **(
                    {
                        "max_rel_diff": max(c["max_rel_diff"] for c in checks),
                        "tolerance": checks[0]["tolerance"],
                    }
                    if all("max_rel_diff" in c for c in checks)
                    else {}
                ),
                "rows_compared": min(c.get("rows_compared") or 0 for c in checks),
            }
        )
        e.pop("round", None)
        e["rounds"] = [
            {
                k: g.get(k)
                for k in (
                    "round",
                    "pass_seconds",
                    "startup_seconds",
                    "parent_cpu",
                    "timed_shards",
                    "model_calls",
                    "copies_per_shard",
                    "verification",
                )
            }
            for g in group
        ]
        merged.append(e)
    return merged


def measure(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Run every configuration of every workload; return the raw figures."""
    machine = common.describe_machine()
    log.info(
        "%s, %s physical / %s logical cores, TensorFlow %s; workers %s, %d rounds",
        machine["cpu_model"],
        machine["physical_cores"],
        machine["logical_cores"],
        machine["tensorflow"],
        args.workers,
        args.rounds,
    )
    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "core_scaling",
        "format_version": 2,
        "created": common.now(),
        "command": command,
        "git_revision": common.git_revision(),
        "machine": machine,
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("update_docs", "render_only")
        },
        "tolerance": {"rtol": common.RTOL, "atol": common.ATOL},
        "workloads": {},
    }
    with tempfile.TemporaryDirectory(prefix="core-scaling-") as tmp:
        for workload in args.workload:
            results["workloads"][workload] = run_workload(args, workload, Path(tmp))
    results["total_seconds"] = time.perf_counter() - started
    log.info("measured everything in %.0f s", results["total_seconds"])
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging()
    json_path = args.output_dir / "core_scaling.json"
    if args.render_only:
        results = json.loads(json_path.read_text())
    else:
        results = measure(args, common.command_line(argv))
    scaling_report.summarize(results)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    png_path = args.output_dir / "core_scaling.png"
    md_path = args.output_dir / "latest.md"
    json_path.write_text(json.dumps(results, indent=1, default=common.json_default) + "\n")
    scaling_report.plot(results, png_path)
    markdown = scaling_report.markdown(results, png_name=png_path.name)
    md_path.write_text(markdown)
    print(markdown)
    if args.update_docs:
        common.update_docs(
            common.REPO / "docs" / "benchmarks.md",
            markdown,
            args.output_dir,
            scaling_report.DOCS_BEGIN,
            scaling_report.DOCS_END,
        )
    log.info("wrote %s, %s and %s", json_path, png_path, md_path)
    mismatched = [
        f"{w}/{e['label']}"
        for w, r in results["workloads"].items()
        for e in r["entries"]
        if not e["verification"]["outputs_match"]
    ]
    if mismatched:
        log.error("outputs differ from the reference configuration: %s", ", ".join(mismatched))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
