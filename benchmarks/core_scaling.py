"""Core-scaling benchmark: PredictionPool against the baselines a user would pick instead.

    python benchmarks/core_scaling.py [--model PATH_OR_HANDLE] [--workers 1,2,4] [--rows 256]
                                      [--shard-size 8] [--workload image|text|both] [--quick]

In one run, on identical inputs (one seeded RNG, one ``.npy`` file read by every
configuration), each workload measures:

1. ``load_per_call``: ``hub.load`` then predict, for each request (a few requests only);
2. ``single`` / ``single_batch``: ``hub.load`` once in one process, TensorFlow using every core
   via intra-op threads, called on shards of the same size, then on one batch of all rows;
3. ``executor``: a plain spawn ``ProcessPoolExecutor`` whose initializer loads the model, arrays
   pickled through the pipe, at every worker count;
4. ``pool``: ``PredictionPool`` at every worker count, same shard size.

Each configuration runs in a fresh process of its own (``scaling_runner.py``): its start-up,
thread settings and memory are its own, and this driver never imports TensorFlow. Every
configuration's outputs are checked against the first one's (``np.allclose``): a run whose
answers differ exits non-zero. Writes ``core_scaling.json`` (every raw figure and the machine),
``core_scaling.png`` and ``latest.md`` to ``--output-dir``; prints the markdown table and the
targets (PASS / MISS) to stdout and progress to stderr. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # `pool` from this checkout even when it is not installed
    sys.path.insert(1, str(REPO))

import scaling_report  # noqa: E402  (benchmarks/ is on sys.path as the script's directory)

from pool import reference_models  # noqa: E402
from pool.process import default_workers  # noqa: E402

log = logging.getLogger("core_scaling")

RUNNER = HERE / "scaling_runner.py"
DEFAULT_OUTPUT_DIR = HERE / "results"

#: Signatures of the reference models, so that no process has to load them to find out.
REFERENCE_INPUTS: dict[str, dict[str, list]] = {
    "mobilenet_v2": {"images": ["float32", [None, 224, 224, 3]]},
    "small_cnn": {"images": ["float32", [None, 32, 32, 3]]},
    "text_embedding": {"text": ["string", [None]]},
}

#: Outputs of different configurations agree to float32 round-off: thread counts and batch
#: sizes change the order of the sums inside the convolutions.
RTOL, ATOL = 1e-4, 1e-6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
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
    p.add_argument("--rows", type=int, default=None, help="image rows per pass (default 256)")
    p.add_argument("--shard-size", type=int, default=8, help="image rows per shard (default 8)")
    p.add_argument("--text-rows", type=int, default=None, help="text rows (default 4096)")
    p.add_argument("--text-shard-size", type=int, default=64, help="text shard (default 64)")
    p.add_argument(
        "--workload",
        choices=("image", "text", "both"),
        default=None,
        help="image: --model (MobileNetV2); text: the reference text embedding; "
        "both (default; image with --quick)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed passes (default 3)")
    p.add_argument(
        "--latency-requests",
        type=int,
        default=None,
        help="shards sent one at a time for latency (default 16)",
    )
    p.add_argument(
        "--load-per-call-requests",
        type=int,
        default=None,
        help="requests timed for load-per-call (default 3)",
    )
    p.add_argument(
        "--threads-per-worker",
        type=int,
        default=1,
        help="intra-op threads of each pool / executor worker (default 1)",
    )
    p.add_argument("--start-method", default=None, help="PredictionPool start method")
    p.add_argument("--seed", type=int, default=0, help="RNG seed of the inputs (default 0)")
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help=f"default: {DEFAULT_OUTPUT_DIR.relative_to(REPO)} "
        f"({DEFAULT_OUTPUT_DIR.relative_to(REPO)}/quick with --quick)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run in under a minute: the image workload on the small reference CNN, "
        "16 rows, one repeat (its figures are not meaningful)",
    )
    p.add_argument(
        "--update-docs",
        action="store_true",
        help="also paste latest.md into docs/benchmarks.md between its result markers",
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: redraw the table and plot from --output-dir/core_scaling.json",
    )
    args = p.parse_args(argv)
    quick = args.quick
    if quick and args.model == "mobilenet_v2":
        args.model = "small_cnn"  # MobileNetV2 alone takes ~5 s to load in every process
    defaults = {
        "rows": (16, 256),
        "text_rows": (256, 4096),
        "repeats": (1, 3),
        "latency_requests": (2, 16),
        "load_per_call_requests": (1, 3),
    }
    for name, (quick_value, full_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_value if quick else full_value)
    if args.workload is None:
        args.workload = "image" if quick else "both"
    if args.workers is None:
        args.workers = list(range(1, default_workers() + 1))
    else:
        args.workers = sorted({int(w) for w in str(args.workers).split(",") if w.strip()})
    for name in ("rows", "shard_size", "text_rows", "text_shard_size", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.workers or min(args.workers) < 1:
        p.error("--workers must be positive integers")
    if args.output_dir is None:
        args.output_dir = DEFAULT_OUTPUT_DIR / "quick" if quick else DEFAULT_OUTPUT_DIR
    return args


def describe_machine() -> dict[str, Any]:
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu_model = names[0] if names else cpu_model
    except OSError:
        pass
    try:
        affinity = sorted(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error, OSError):
        affinity = None

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "cpu_model": cpu_model,
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "cpu_affinity": affinity,
        "default_workers": default_workers(),
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": version("tensorflow"),
        "tensorflow_hub": version("tensorflow-hub"),
        "numpy": version("numpy"),
        "pool": version("pool"),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def usable_cpus() -> int:
    """CPUs this process may run on: what TensorFlow sizes its default thread pools to."""
    try:
        return len(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error, OSError):
        return psutil.cpu_count(logical=True) or 1


def git_revision() -> str | None:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "pool"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty-pool" if dirty else "")


# --- models and inputs -----------------------------------------------------------------------
def reference_model(name: str) -> str:
    """Path of a reference model, built in a subprocess if needed (no TensorFlow here)."""
    target = reference_models.cache_dir() / f"{name}-v{reference_models.VERSION}"
    if not (target / "saved_model.pb").exists():
        log.info("building reference model %s (once)", name)
        subprocess.run([sys.executable, "-m", "pool.reference_models", name], check=True)
    return reference_models.ensure(name)


def resolve_model(model: str, workdir: Path) -> tuple[str, dict[str, list]]:
    """``(local SavedModel path, {input name: [dtype, shape]})`` for ``model``."""
    if model in reference_models.BUILDERS:
        path = reference_model(model)
        if model in REFERENCE_INPUTS:
            return path, REFERENCE_INPUTS[model]
    elif "://" in model:
        path = model
    elif os.path.isdir(model):
        path = os.path.abspath(model)
    else:
        raise SystemExit(f"--model {model!r}: no such directory, TF Hub handle or reference model")
    log.info("reading the signature of %s", model)
    spec = {"kind": "describe", "model": path}
    (described,), _ = run_config(workdir, "describe", spec)
    return described["model"], described["inputs"]


def make_inputs(specs: dict[str, list], rows: int, seed: int) -> dict[str, np.ndarray]:
    """Deterministic inputs for a signature: uniform floats, small integers, word sentences."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, (dtype, shape) in sorted(specs.items()):
        if shape is None or any(d is None for d in shape[1:]):
            raise SystemExit(
                f"input {name!r} has shape {shape}: the benchmark needs fixed dimensions "
                "after the batch axis"
            )
        full = (rows, *shape[1:])
        if dtype == "string":
            inputs[name] = sentences(rng, int(np.prod(full))).reshape(full)
        elif np.dtype(dtype).kind == "f":
            inputs[name] = rng.random(full, dtype=np.float32).astype(dtype, copy=False)
        elif np.dtype(dtype).kind == "b":
            inputs[name] = rng.random(full) < 0.5
        else:
            inputs[name] = rng.integers(0, 10, full).astype(dtype)
    return inputs


def sentences(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` sentences of 4-32 pseudo-words from a 5,000-word vocabulary."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocabulary = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(5000)]
    lengths = rng.integers(4, 33, size=count)
    words = rng.integers(0, len(vocabulary), size=int(lengths.sum()))
    out, at = np.empty(count, dtype=object), 0
    for i, n in enumerate(lengths):
        out[i] = " ".join(vocabulary[w] for w in words[at : at + n])
        at += n
    return out


# --- running configurations ------------------------------------------------------------------
def run_config(workdir: Path, name: str, spec: dict) -> tuple[list[dict], list[dict]]:
    """Run one configuration in a fresh process; return its entries and their outputs."""
    spec_path = workdir / f"{name}.json"
    spec = {
        **spec,
        "result_path": str(workdir / f"{name}.result.json"),
        "outputs_path": str(workdir / f"{name}.outputs.npz"),
    }
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    log_path = workdir / f"{name}.log"
    with open(log_path, "w") as log_file:
        code = subprocess.run(
            [sys.executable, str(RUNNER), str(spec_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO),
            timeout=1800,
        ).returncode
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"configuration {name} failed (exit {code}):\n{tail}")
    entries = json.loads(Path(spec["result_path"]).read_text())["entries"]
    with np.load(spec["outputs_path"], allow_pickle=False) as archive:
        outputs: list[dict] = [{} for _ in entries]
        for key in archive.files:
            index, output = key.split("/", 1)
            outputs[int(index)][output] = archive[key]
    return entries, outputs


def verify(got: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, Any]:
    """Compare outputs with the reference configuration's, row for row (a prefix for
    load-per-call, which answers only a few requests)."""
    if set(got) != set(reference):
        return {"outputs_match": False, "reason": f"outputs {sorted(got)} != {sorted(reference)}"}
    worst, rows = 0.0, None
    for name, want in reference.items():
        have = got[name]
        rows = len(have)
        want = want[:rows]
        if have.shape != want.shape:
            return {"outputs_match": False, "reason": f"{name}: {have.shape} != {want.shape}"}
        if have.dtype.kind not in "biuf":  # strings and the like: exactly equal
            if not np.array_equal(have, want):
                return {"outputs_match": False, "reason": f"{name}: values differ"}
            continue
        if not np.allclose(have, want, rtol=RTOL, atol=ATOL):
            diff = float(np.max(np.abs(have.astype(np.float64) - want)))
            return {"outputs_match": False, "reason": f"{name}: max |diff| {diff:.3g}"}
        if have.size:
            worst = max(worst, float(np.max(np.abs(have.astype(np.float64) - want))))
    return {"outputs_match": True, "max_abs_diff": worst, "rows_compared": rows}


def run_workload(args: argparse.Namespace, workload: str, workdir: Path) -> dict[str, Any]:
    if workload == "image":
        model, rows, shard_size = args.model, args.rows, args.shard_size
    else:
        model, rows, shard_size = "text_embedding", args.text_rows, args.text_shard_size
    path, input_specs = resolve_model(model, workdir)
    inputs = make_inputs(input_specs, rows, args.seed)
    input_paths = {}
    for name, array in inputs.items():
        input_paths[name] = str(workdir / f"{workload}-input-{name}.npy")
        np.save(input_paths[name], array, allow_pickle=array.dtype == object)
    cpus = usable_cpus()
    common = {
        "model": path,
        "inputs": input_paths,
        "shard_size": shard_size,
        "repeats": args.repeats,
        "latency_requests": args.latency_requests,
    }
    configs: list[tuple[str, dict]] = [
        ("single", {"kind": "single", "intra_op_threads": cpus, "inter_op_threads": None}),
        (
            "load_per_call",
            {
                "kind": "load_per_call",
                "intra_op_threads": cpus,
                "inter_op_threads": None,
                "requests": args.load_per_call_requests,
            },
        ),
    ]
    for n in args.workers:  # interleaved, so slow drift in background load hits both alike
        for kind in ("executor", "pool"):
            configs.append(
                (
                    f"{kind}-{n}",
                    {
                        "kind": kind,
                        "workers": n,
                        "threads_per_worker": args.threads_per_worker,
                        "start_method": args.start_method,
                    },
                )
            )
    entries: list[dict] = []
    reference = None
    for name, spec in configs:
        log.info("%s: %s ...", workload, name)
        started = time.perf_counter()
        got, outputs = run_config(workdir, f"{workload}-{name}", {**common, **spec})
        for e, out in zip(got, outputs, strict=True):
            e.update(workers=spec.get("workers", 1), shard_size=shard_size)
            if e["label"] == "single_batch":
                e["shard_size"] = rows
            e["rows_per_pass"] = e.get("rows_per_pass") or [rows] * len(e["pass_seconds"])
            if reference is None:
                reference = out
                e["verification"] = {"outputs_match": True, "reference": True}
            else:
                e["verification"] = verify(out, reference)
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
        "entries": entries,
    }


def measure(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Run every configuration of every workload; return the raw figures."""
    machine = describe_machine()
    log.info(
        "%s, %s physical / %s logical cores, TensorFlow %s; workers %s",
        machine["cpu_model"],
        machine["physical_cores"],
        machine["logical_cores"],
        machine["tensorflow"],
        args.workers,
    )
    workloads = ["image", "text"] if args.workload == "both" else [args.workload]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "core_scaling",
        "format_version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "git_revision": git_revision(),
        "machine": machine,
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("update_docs", "render_only")
        },
        "tolerance": {"rtol": RTOL, "atol": ATOL},
        "workloads": {},
    }
    with tempfile.TemporaryDirectory(prefix="core-scaling-") as tmp:
        for workload in workloads:
            results["workloads"][workload] = run_workload(args, workload, Path(tmp))
    results["total_seconds"] = time.perf_counter() - started
    log.info("measured everything in %.0f s", results["total_seconds"])
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else Path(sys.argv[0])
    command = "python " + shlex.join([str(shown), *(sys.argv[1:] if argv is None else argv)])
    json_path = args.output_dir / "core_scaling.json"
    if args.render_only:
        results = json.loads(json_path.read_text())
    else:
        results = measure(args, command)
    scaling_report.summarize(results)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    png_path = args.output_dir / "core_scaling.png"
    md_path = args.output_dir / "latest.md"
    json_path.write_text(json.dumps(results, indent=1, default=_plain) + "\n")
    scaling_report.plot(results, png_path)
    markdown = scaling_report.markdown(results, png_name=png_path.name)
    md_path.write_text(markdown)
    print(markdown)
    if args.update_docs:
        scaling_report.update_docs(REPO / "docs" / "benchmarks.md", markdown, args.output_dir)
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


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


if __name__ == "__main__":
    raise SystemExit(main())
