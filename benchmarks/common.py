"""What both benchmark drivers share: the machine, the inputs, fresh processes, checks, docs.

``core_scaling.py`` and ``concurrent_requests.py`` import this module; it never imports
TensorFlow (reference models are built in a subprocess), so neither driver does.

- :func:`describe_machine`, :func:`git_revision`: what a result file records about its run;
- :func:`reference_model`, :func:`make_inputs`: the models and the seeded inputs;
- :func:`run_process`: one configuration in a fresh ``python RUNNER SPEC.json`` process;
- :func:`verify`: outputs against the reference configuration's, row for row;
- :func:`update_docs`: paste a markdown run between two markers of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # `pool` from this checkout even when it is not installed
    sys.path.insert(1, str(REPO))

from pool import reference_models  # noqa: E402
from pool.process import default_workers  # noqa: E402

log = logging.getLogger("benchmarks")

#: Signatures of the reference models, so that no process has to load them to find out.
REFERENCE_INPUTS: dict[str, dict[str, list]] = {
    "mobilenet_v2": {"images": ["float32", [None, 224, 224, 3]]},
    "small_cnn": {"images": ["float32", [None, 32, 32, 3]]},
    "text_embedding": {"text": ["string", [None]]},
}

#: Outputs of different configurations agree to float32 round-off: thread counts and batch
#: sizes change the order of the sums inside the convolutions.
RTOL, ATOL = 1e-4, 1e-6


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
        "pool": version("prediction-pool") or version("pool"),
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


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line(argv: list[str] | None) -> str:
    """The command as a user would type it, relative to the repository."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else Path(sys.argv[0])
    return "python " + shlex.join([str(shown), *(sys.argv[1:] if argv is None else argv)])


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )


# --- models and inputs -----------------------------------------------------------------------
def reference_model(name: str) -> str:
    """Path of a reference model, built in a subprocess if needed (no TensorFlow here)."""
    target = reference_models.cache_dir() / f"{name}-v{reference_models.VERSION}"
    if not (target / "saved_model.pb").exists():
        log.info("building reference model %s (once)", name)
        subprocess.run([sys.executable, "-m", "pool.reference_models", name], check=True)
    return reference_models.ensure(name)


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


def save_inputs(inputs: dict[str, np.ndarray], workdir: Path, prefix: str) -> dict[str, str]:
    """Write each input to ``workdir/PREFIX-input-NAME.npy``; return ``{name: path}``."""
    paths = {}
    for name, array in inputs.items():
        paths[name] = str(workdir / f"{prefix}-input-{name}.npy")
        np.save(paths[name], array, allow_pickle=array.dtype == object)
    return paths


# --- running configurations ------------------------------------------------------------------
def run_process(
    runner: Path, workdir: Path, name: str, spec: dict, timeout: float = 1800
) -> tuple[list[dict], dict[str, dict[str, np.ndarray]]]:
    """Run one configuration in a fresh ``python RUNNER SPEC.json`` process.

    The runner writes ``{"entries": [...]}`` to ``spec["result_path"]`` and its outputs to
    ``spec["outputs_path"]`` as ``KEY/OUTPUT`` arrays; returns the entries and
    ``{KEY: {OUTPUT: array}}``. Raises RuntimeError with the log's tail on failure.
    """
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
            [sys.executable, str(runner), str(spec_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO),
            timeout=timeout,
        ).returncode
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"configuration {name} failed (exit {code}):\n{tail}")
    entries = json.loads(Path(spec["result_path"]).read_text())["entries"]
    outputs: dict[str, dict[str, np.ndarray]] = {}
    with np.load(spec["outputs_path"], allow_pickle=False) as archive:
        for name in archive.files:
            key, output = name.split("/", 1)
            outputs.setdefault(key, {})[output] = archive[name]
    return entries, outputs


def _numeric_pairs(
    got: dict[str, np.ndarray], reference: dict[str, np.ndarray]
) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], int | None, dict[str, Any] | None]:
    """``(numeric (name, got, reference rows) pairs, rows compared, mismatch)``: what both
    checks share. ``got`` may hold only a prefix of the reference's rows (load-per-call);
    names, shapes and non-numeric outputs (exactly equal) are checked here."""
    if set(got) != set(reference):
        reason = f"outputs {sorted(got)} != {sorted(reference)}"
        return [], None, {"outputs_match": False, "reason": reason}
    pairs, rows = [], None
    for name, want in reference.items():
        have = got[name]
        rows = len(have)
        want = want[:rows]
        if have.shape != want.shape:
            reason = f"{name}: {have.shape} != {want.shape}"
            return [], rows, {"outputs_match": False, "reason": reason}
        if have.dtype.kind not in "biuf":  # strings and the like: exactly equal
            if not np.array_equal(have, want):
                return [], rows, {"outputs_match": False, "reason": f"{name}: values differ"}
            continue
        if have.size:
            pairs.append((name, have, want))
    return pairs, rows, None


def verify(got: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, Any]:
    """Compare outputs with the reference's, row for row (``got`` may hold only a prefix of
    the reference's rows, as load-per-call does): ``np.allclose`` for numbers, equality else."""
    pairs, rows, mismatch = _numeric_pairs(got, reference)
    if mismatch is not None:
        return mismatch
    worst = 0.0
    for name, have, want in pairs:
        diff = float(np.max(np.abs(have.astype(np.float64) - want)))
        if not np.allclose(have, want, rtol=RTOL, atol=ATOL):
            return {"outputs_match": False, "reason": f"{name}: max |diff| {diff:.3g}"}
        worst = max(worst, diff)
    return {"outputs_match": True, "max_abs_diff": worst, "rows_compared": rows}


def verify_scaled(
    got: dict[str, np.ndarray], reference: dict[str, np.ndarray], tolerance: float
) -> dict[str, Any]:
    """Compare a converted runtime's outputs with TensorFlow's, row for row, as
    ``pool.runtimes`` verifies a conversion: the largest absolute difference of each output,
    relative to that output's scale (its largest magnitude in the reference), must be at most
    ``tolerance`` (``pool.runtimes.TOLERANCES`` of the precision). Strings: exactly equal."""
    pairs, rows, mismatch = _numeric_pairs(got, reference)
    if mismatch is not None:
        return mismatch
    worst_abs, worst_rel = 0.0, 0.0
    for name, have, want in pairs:
        diff = float(np.max(np.abs(have.astype(np.float64) - want)))
        scale = float(np.max(np.abs(want.astype(np.float64))))
        relative = diff / scale if scale > 0 else diff
        if not relative <= tolerance:
            return {
                "outputs_match": False,
                "reason": f"{name}: max |diff| {diff:.3g}, {relative:.3g} of its scale "
                f"{scale:.3g} (tolerance {tolerance:g})",
                "max_abs_diff": diff,
                "max_rel_diff": relative,
            }
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, relative)
    return {
        "outputs_match": True,
        "max_abs_diff": worst_abs,
        "max_rel_diff": worst_rel,
        "tolerance": tolerance,
        "rows_compared": rows,
    }


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for NumPy scalars, tuples and sets."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def update_docs(doc: Path, markdown_text: str, output_dir: Path, begin: str, end: str) -> None:
    """Replace what ``doc`` holds between the markers ``begin`` and ``end`` with
    ``markdown_text`` (its title dropped, its ``##`` sections made ``####``: the markers sit
    under a ``###`` heading; its images linked relative to ``doc``)."""
    text = doc.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{doc} has no {begin!r} ... {end!r} markers")
    body = markdown_text.split("\n", 2)[2]  # drop the page title
    body = body.replace("\n## ", "\n#### ")
    link = Path(os.path.relpath(output_dir.resolve(), doc.resolve().parent))
    body = re.sub(r"!\[([^\]]*)\]\(([^)/]+)\)", lambda m: f"![{m[1]}]({link / m[2]})", body)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{body.strip()}\n{end}{tail}")
