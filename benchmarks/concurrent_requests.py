"""Concurrent-requests benchmark: many threads sending one-row requests, as a service does.

    python benchmarks/concurrent_requests.py [--workloads text_embedding,small_cnn,mobilenet_v2]
        [--clients 1,4,16,64] [--seconds 4] [--repeats 3] [--quick] [--update-docs]

(Not named ``requests.py``: with ``benchmarks/`` first on ``sys.path`` it would shadow the
``requests`` package, which ``tf_keras`` imports.)

For each workload (a reference model), ``clients`` threads send one-row requests back to back
(a closed loop) to each configuration:

1. ``global``: the model ``hub.load``ed once into a global, called from the client threads,
   with TensorFlow's default thread pools;
2. ``executor``: the plain ``ProcessPoolExecutor`` whose initializer loads the model
   (workers = cores, one intra-op thread each), ``submit(...).result()`` per request;
3. ``pool``: ``PredictionPool(model, workers=cores)`` with its defaults, ``predict`` per request;
4. ``pool_auto`` (the image models, ``--auto``): the same with ``runtime="auto"``, its
   conversion done (and cached) before anything is timed.

Each configuration runs in a fresh process of its own (``requests_runner.py``), ``--repeats``
times, interleaved (the order of the configurations rotates between repeats); figures are
medians over the repeats. Every configuration's responses (the first of each distinct row, at
every client count) are compared with the global model answering each row alone (``pool_auto``:
relative to each output's scale, within ``pool.runtimes.TOLERANCES["f32"]``); a run whose
answers differ exits with status 2. Writes ``requests.json`` (every raw figure),
``requests.png`` and ``requests.md`` to ``--output-dir`` and prints the markdown (tables and
targets) to stdout, progress to stderr. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common  # benchmarks/ is on sys.path as the script's directory
import requests_report

from pool.runtimes import TOLERANCES

log = logging.getLogger("concurrent_requests")

RUNNER = common.HERE / "requests_runner.py"
DEFAULT_OUTPUT_DIR = common.HERE / "results"
WORKLOADS = ("text_embedding", "small_cnn", "mobilenet_v2")
KINDS = requests_report.KINDS
#: Workloads that also run the pool with runtime="auto" (issue 14): the image models.
AUTO_WORKLOADS = ("small_cnn", "mobilenet_v2")


def _int_list(text: str) -> list[int]:
    values = sorted({int(v) for v in text.split(",") if v.strip()})
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4,16, got {text!r}")
    return values


def _workloads(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(WORKLOADS)}, got {text!r}"
        )
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--workloads",
        type=_workloads,
        default=None,
        help=f"reference models, comma-separated (default {','.join(WORKLOADS)}; "
        "small_cnn with --quick)",
    )
    p.add_argument(
        "--clients",
        type=_int_list,
        default=None,
        help="client thread counts (default 1,4,16,64; 1,4 with --quick)",
    )
    p.add_argument(
        "--seconds", type=float, default=None, help="timed window per client count (default 4)"
    )
    p.add_argument(
        "--warmup-seconds",
        type=float,
        default=None,
        help="untimed requests before each window (default 1)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="fresh processes per configuration, interleaved (default 3)",
    )
    p.add_argument(
        "--rows",
        type=int,
        default=None,
        help="distinct one-row requests per workload (default 128)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes of the executor and the pool (default: physical cores)",
    )
    p.add_argument(
        "--auto",
        default=",".join(AUTO_WORKLOADS),
        help="workloads that also run PredictionPool(runtime='auto'), comma-separated, or "
        f"'none' (default {','.join(AUTO_WORKLOADS)}: the image models)",
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
        help="smoke run of about a minute: small_cnn, 1 and 4 clients, 2 s windows, one repeat "
        "(its figures are not meaningful)",
    )
    p.add_argument(
        "--update-docs",
        action="store_true",
        help="also paste requests.md into docs/benchmarks.md between its request markers",
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: redraw the tables and plot from --output-dir/requests.json",
    )
    args = p.parse_args(argv)
    defaults = {
        "workloads": (["small_cnn"], list(WORKLOADS)),
        "clients": ([1, 4], [1, 4, 16, 64]),
        "seconds": (2.0, 4.0),
        "warmup_seconds": (0.5, 1.0),
        "repeats": (1, 3),
        "rows": (32, 128),
    }
    for name, (quick_value, full_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_value if args.quick else full_value)
    if args.workers is None:
        args.workers = common.default_workers()
    for name in ("seconds", "repeats", "rows", "workers"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.warmup_seconds < 0:
        p.error("--warmup-seconds must be >= 0")
    if args.output_dir is None:
        args.output_dir = DEFAULT_OUTPUT_DIR / "quick" if args.quick else DEFAULT_OUTPUT_DIR
    args.auto = [] if args.auto == "none" else [v.strip() for v in args.auto.split(",") if v]
    if any(w not in WORKLOADS for w in args.auto):
        p.error(f"--auto: expected 'none' or workloads among {','.join(WORKLOADS)}")
    return args


def resolve_auto(model: str) -> dict[str, Any]:
    """Convert, verify and time the runtimes for ``runtime='auto'`` once, before anything is
    timed (``pool.runtimes.resolve`` with the pool's defaults, the code path of the pool
    itself, in a subprocess; cached, so the pools started later only find it)."""
    from pool.runtimes import cache
    from pool.runtimes.resolve import resolve

    log.info(
        "runtime='auto' for %s: converting once (not timed; cached in %s) ...",
        model,
        cache.cache_root(),
    )
    started = time.perf_counter()
    r = resolve(model, runtime="auto")
    seconds = time.perf_counter() - started
    log.info("runtime='auto' runs %s (ready in %.1f s)", r.runtime, seconds)
    return {"runtime": r.runtime, "info": r.info, "resolve_seconds": seconds}


def measure(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Run every configuration of every workload, ``--repeats`` times; return the raw figures
    with every level's ``verification``."""
    machine = common.describe_machine()
    log.info(
        "%s, %s physical / %s logical cores, TensorFlow %s; workloads %s, clients %s",
        machine["cpu_model"],
        machine["physical_cores"],
        machine["logical_cores"],
        machine["tensorflow"],
        ",".join(args.workloads),
        ",".join(map(str, args.clients)),
    )
    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "concurrent_requests",
        "format_version": 1,
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
    with tempfile.TemporaryDirectory(prefix="concurrent-requests-") as tmp:
        workdir = Path(tmp)
        specs = {}
        for name in args.workloads:
            path = common.reference_model(name)
            signature = common.REFERENCE_INPUTS[name]
            inputs = common.make_inputs(signature, args.rows, args.seed)
            specs[name] = {
                "model": path,
                "inputs": common.save_inputs(inputs, workdir, name),
                "clients": args.clients,
                "seconds": args.seconds,
                "warmup_seconds": args.warmup_seconds,
                "workers": args.workers,
            }
            results["workloads"][name] = {
                "model": name,
                "model_path": path,
                "inputs": {n: {"dtype": d, "shape": s} for n, (d, s) in signature.items()},
                "rows": args.rows,
                "runs": [],
            }
        kinds = {
            name: [k for k in KINDS if k != "pool_auto" or name in args.auto]
            for name in args.workloads
        }
        for name in args.workloads:
            if "pool_auto" in kinds[name]:
                results["workloads"][name]["auto"] = resolve_auto(specs[name]["model"])
        references: dict[str, dict] = {}
        answered: list[tuple[str, dict, dict]] = []
        for repeat in range(args.repeats):
            for name in args.workloads:
                own = kinds[name]
                order = own[repeat % len(own) :] + own[: repeat % len(own)]
                for kind in order:
                    label = f"{name}-{kind}-{repeat}"
                    log.info("repeat %d/%d: %s %s ...", repeat + 1, args.repeats, name, kind)
                    t = time.perf_counter()
                    first_global = kind == "global" and name not in references
                    spec = {**specs[name], "kind": kind, "reference": first_global}
                    (run,), outputs = common.run_process(RUNNER, workdir, label, spec)
                    run["repeat"] = repeat
                    if "reference" in outputs:
                        references[name] = outputs.pop("reference")
                    results["workloads"][name]["runs"].append(run)
                    answered.append((name, run, outputs))
                    log.info(
                        "%s done in %.1f s: %s",
                        label,
                        time.perf_counter() - t,
                        ", ".join(
                            f"{lv['clients']}: {lv['requests_per_second']:.0f} req/s"
                            for lv in run["levels"]
                        ),
                    )
        for name, run, outputs in answered:  # every response sample vs the global model
            reference = references[name]
            for level in run["levels"]:
                got = dict(outputs[str(level["clients"])])
                rows = got.pop("__rows__")
                want = {k: v[rows] for k, v in reference.items() if k != "__rows__"}
                if run["kind"] == "pool_auto":  # a converted runtime: within its tolerance
                    level["verification"] = common.verify_scaled(got, want, TOLERANCES["f32"])
                else:
                    level["verification"] = common.verify(got, want)
                if not level["verification"]["outputs_match"]:
                    log.error(
                        "%s %s at %d clients: outputs differ: %s",
                        name,
                        run["kind"],
                        level["clients"],
                        level["verification"]["reason"],
                    )
    results["total_seconds"] = time.perf_counter() - started
    log.info("measured everything in %.0f s", results["total_seconds"])
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging()
    json_path = args.output_dir / "requests.json"
    if args.render_only:
        results = json.loads(json_path.read_text())
    else:
        results = measure(args, common.command_line(argv))
    requests_report.summarize(results)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    png_path = args.output_dir / "requests.png"
    md_path = args.output_dir / "requests.md"
    json_path.write_text(json.dumps(results, indent=1, default=common.json_default) + "\n")
    requests_report.plot(results, png_path)
    markdown = requests_report.markdown(results, png_name=png_path.name)
    md_path.write_text(markdown)
    print(markdown)
    if args.update_docs:
        common.update_docs(
            common.REPO / "docs" / "benchmarks.md",
            markdown,
            args.output_dir,
            requests_report.DOCS_BEGIN,
            requests_report.DOCS_END,
        )
    log.info("wrote %s, %s and %s", json_path, png_path, md_path)
    differ = [
        f"{name}/{kind}@{clients}"
        for name, w in results["workloads"].items()
        for kind, levels in w["summary"].items()
        for clients, s in levels.items()
        if not s["outputs_match"]
    ]
    if differ:
        log.error("outputs differ from the global model's: %s", ", ".join(differ))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
