"""In the parent, before any worker starts: which runtime the workers run, and its artifact.

``resolve`` turns ``runtime=``/``precision=`` into a :class:`Resolution`:

- ``"tensorflow"``: nothing to do.
- ``"openvino"`` / ``"onnxruntime"``: the cached, verified artifact (converted first if the
  cache has no whole entry for it). Raises :class:`pool.ModelLoadError` when the runtime is not
  installed, the model does not convert (naming the ops), or its outputs differ from
  TensorFlow's past the tolerance (naming the output and the difference).
- ``"auto"``: every installed runtime that converts and verifies, timed against TensorFlow on
  one thread with the pool's shard size; the fastest wins (TensorFlow included). Anything else
  falls back to TensorFlow with one log line saying why.

Conversion and timing run in a subprocess (:mod:`pool.runtimes.converter`) bounded by
``timeout``; this module imports no TensorFlow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..backend import Settings
from ..errors import ModelLoadError
from ..messages import WorkerConfig
from . import (
    AUTO,
    CHOICES,
    CONVERTED,
    EXTRAS,
    PRECISIONS,
    RUNTIMES,
    TENSORFLOW,
    TOLERANCES,
    installed,
)
from . import cache as cache_module

log = logging.getLogger("pool")

#: Bound on one conversion subprocess when the pool has no ``start_timeout``, in seconds.
CONVERT_TIMEOUT_SECONDS = 900.0
#: Rows per timed call for ``auto`` when the pool has no ``shard_size``.
DEFAULT_TIME_ROWS = 8


@dataclass(frozen=True)
class Resolution:
    """What the workers run: ``runtime`` (never ``auto``), its ``artifact`` directory (``None``
    for TensorFlow), and what was measured on the way (``info``: differences to TensorFlow per
    output, timings, the reason for a fallback)."""

    runtime: str
    requested: str
    precision: str
    artifact: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def for_workers(settings: Settings, config: WorkerConfig) -> tuple[Resolution, WorkerConfig]:
    """Resolve ``settings.runtime`` for ``config.model`` (convert or find in the cache, verify,
    time for ``auto``) and return the worker config that runs the result: what every backend
    does once, in the parent, before its workers start."""
    resolution = resolve(
        config.model,
        settings.signature,
        settings.runtime,
        settings.precision,
        settings.runtime_tolerance,
        settings.shard_size,
        settings.start_timeout,
        sample=settings.runtime_sample,
    )
    if resolution.runtime == TENSORFLOW:
        return resolution, config
    converted = replace(
        config,
        runtime=resolution.runtime,
        precision=settings.precision,
        artifact=resolution.artifact,
    )
    return resolution, converted


def describe(resolution: Resolution | None, **extra: Any) -> dict[str, Any]:
    """``PredictionPool.runtime_info()``: what runs and what was measured on the way."""
    if resolution is None:
        return {"runtime": TENSORFLOW, "requested": TENSORFLOW}
    return {
        "runtime": resolution.runtime,
        "requested": resolution.requested,
        "precision": resolution.precision,
        "artifact": resolution.artifact,
        **extra,
        **resolution.info,
    }


def check_options(runtime: str, precision: str, tolerance: float | None) -> None:
    """Validate ``runtime=``, ``precision=`` and ``runtime_tolerance=`` (in the caller)."""
    if runtime not in CHOICES:
        raise ValueError(f"runtime must be one of {CHOICES}, got {runtime!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "f32" and runtime not in ("openvino", AUTO):
        raise ValueError(
            f"precision={precision!r} applies to runtime='openvino' or 'auto' only, "
            f"got runtime={runtime!r}"
        )
    if tolerance is not None and (
        isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance <= 0
    ):
        raise ValueError(f"runtime_tolerance must be a positive number, got {tolerance!r}")


def resolve(
    model: str | Callable[[], Callable],
    signature: str = "serving_default",
    runtime: str = TENSORFLOW,
    precision: str = "f32",
    tolerance: float | None = None,
    shard_size: int | None = None,
    timeout: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    sample: Any = None,
) -> Resolution:
    """Decide what the workers run (see the module docstring). ``model`` is a local
    SavedModel directory or a factory callable (which only TensorFlow can run). ``sample``:
    inputs to verify (and time) with instead of synthesised ones, as ``predict`` takes them."""
    check_options(runtime, precision, tolerance)
    if runtime == TENSORFLOW:
        return Resolution(TENSORFLOW, runtime, precision)
    limit = tolerance if tolerance is not None else TOLERANCES[precision]
    if not isinstance(model, str):
        return _refuse(
            runtime,
            precision,
            "a factory callable can only run on TensorFlow; converting needs a SavedModel "
            "directory",
        )
    wanted = [runtime] if runtime != AUTO else [r for r in RUNTIMES if r != TENSORFLOW]
    missing = [r for r in wanted if not installed(r, converting=True)]
    if runtime != AUTO and missing:
        raise ModelLoadError(
            f"runtime={runtime!r} is not installed: pip install "
            f"'prediction-pool[{EXTRAS[runtime]}]' (needs {_needs(runtime)})"
        )
    wanted = [r for r in wanted if r not in missing]
    if not wanted:
        return _refuse(runtime, precision, "no converted runtime is installed")
    root = Path(cache_dir) if cache_dir is not None else cache_module.cache_root()
    bound = timeout if timeout is not None else CONVERT_TIMEOUT_SECONDS
    stored = store_sample(sample, root)
    entries = _entries(model, signature, wanted, precision, root, bound, stored)
    verified: dict[str, tuple[str, dict[str, Any]]] = {}
    reasons: dict[str, str] = {}
    for name, (path, manifest) in entries.items():
        problem = _problem(name, manifest, limit)
        if problem is None:
            verified[name] = (path, manifest)
        else:
            reasons[name] = problem
    if runtime != AUTO:
        if runtime in reasons:
            raise ModelLoadError(reasons[runtime])
        path, manifest = verified[runtime]
        return Resolution(runtime, runtime, precision, path, _info(manifest, limit))
    if not verified:
        return _refuse(runtime, precision, "; ".join(reasons.values()), reasons)
    rows = shard_size or DEFAULT_TIME_ROWS
    timings = _timings(model, signature, verified, precision, rows, root, bound, stored)
    choice = max(timings, key=lambda r: timings[r])
    detail = ", ".join(f"{r} {v:.1f}" for r, v in sorted(timings.items(), key=lambda x: -x[1]))
    log.info(
        "runtime='auto' chose %s (rows/s on one thread, %d rows per call: %s)", choice, rows, detail
    )
    info = {"timings_rows_per_second": timings, "time_rows": rows, "rejected": reasons}
    if choice == TENSORFLOW:
        return Resolution(TENSORFLOW, runtime, precision, None, info)
    path, manifest = verified[choice]
    return Resolution(choice, runtime, precision, path, {**_info(manifest, limit), **info})


def _needs(runtime: str) -> str:
    from . import CONVERTERS

    return ", ".join(CONVERTED[runtime] + CONVERTERS[runtime])


def _refuse(
    runtime: str, precision: str, why: str, reasons: dict[str, str] | None = None
) -> Resolution:
    if runtime != AUTO:
        raise ModelLoadError(f"runtime={runtime!r} cannot run this model: {why}")
    log.warning("runtime='auto' runs the model on TensorFlow: %s", why)
    return Resolution(
        TENSORFLOW, runtime, precision, None, {"fallback": why, "rejected": reasons or {}}
    )


def _problem(runtime: str, manifest: dict[str, Any], limit: float) -> str | None:
    """Why the entry may not serve (conversion failed, or a difference past ``limit``)."""
    if manifest.get("error"):
        ops = manifest.get("unconverted_ops") or []
        named = f" (unconverted ops: {', '.join(ops)})" if ops else ""
        return f"{runtime} could not convert the model{named}: {manifest['error']}"
    for output, d in sorted(manifest.get("differences", {}).items()):
        if not d["max_rel"] <= limit:
            return (
                f"{runtime}: output {output!r} differs from TensorFlow by up to {d['max_abs']:.3g} "
                f"(relative to its scale {d['scale']:.3g}: {d['max_rel']:.3g}), past the "
                f"tolerance {limit:g} (runtime_tolerance=)"
            )
    return None


def _info(manifest: dict[str, Any], limit: float) -> dict[str, Any]:
    return {
        "differences": manifest.get("differences", {}),
        "tolerance": limit,
        "versions": manifest.get("key", {}).get("versions", {}),
        "convert_seconds": manifest.get("seconds"),
    }


def _entries(
    model: str,
    signature: str,
    runtimes: list[str],
    precision: str,
    root: Path,
    timeout: float,
    sample: tuple[str, str] | None,
) -> dict[str, tuple[str, dict[str, Any]]]:
    """The whole cache entry of each runtime, converting what is missing: once (under each
    entry's lock, taken in name order), all missing runtimes in one subprocess."""
    names: dict[str, tuple[str, dict[str, Any]]] = {}
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for runtime in runtimes:
        fields = cache_module.key_fields(model, signature, runtime, precision)
        fields["sample"] = sample[0] if sample else None
        name = cache_module.entry_name(runtime, fields)
        names[runtime] = (name, fields)
        manifest = cache_module.valid_manifest(root / name)
        if manifest is not None:
            found[runtime] = (str(root / name), manifest)
    missing = [r for r in runtimes if r not in found]
    if missing:
        with contextlib.ExitStack() as stack:
            for runtime in sorted(missing, key=lambda r: names[r][0]):
                stack.enter_context(cache_module.locked(root, names[runtime][0]))
            todo = []
            for runtime in missing:  # another pool may have built some meanwhile
                target = root / names[runtime][0]
                manifest = cache_module.valid_manifest(target)
                if manifest is not None:
                    found[runtime] = (str(target), manifest)
                else:
                    if target.exists():
                        log.warning("rebuilding the broken cache entry %s", target)
                    todo.append(runtime)
            if todo:
                built = _convert(model, signature, precision, todo, names, root, timeout, sample)
                found.update({r: (str(root / names[r][0]), m) for r, m in built.items()})
    return {r: found[r] for r in runtimes}


def _convert(
    model: str,
    signature: str,
    precision: str,
    runtimes: list[str],
    names: dict[str, tuple[str, dict[str, Any]]],
    root: Path,
    timeout: float,
    sample: tuple[str, str] | None,
) -> dict[str, dict[str, Any]]:
    """Convert ``model`` to ``runtimes`` in one subprocess; commit each entry."""
    staged = {r: cache_module.staging(root, names[r][0]) for r in runtimes}
    try:
        log.info(
            "converting %s for %s (signature %r, precision %s)",
            model,
            ", ".join(runtimes),
            signature,
            precision,
        )
        job = {
            "model": model,
            "signature": signature,
            "precision": precision,
            "convert": {r: str(path) for r, path in staged.items()},
            "sample": sample[1] if sample else None,
        }
        result = run_converter(job, timeout)
        manifests = {}
        for runtime, path in staged.items():
            entry = result["convert"][runtime]
            if entry["error"]:  # keep no half-written artifact beside a failure
                shutil.rmtree(path)
                path.mkdir()
            manifests[runtime] = cache_module.write_manifest(
                path,
                {
                    "key": names[runtime][1],
                    "signature": result["signature"],
                    "error": entry["error"],
                    "unconverted_ops": entry["unconverted_ops"],
                    "differences": entry.get("differences", {}),
                    "seconds": entry["seconds"],
                },
            )
            cache_module.commit(path, root / names[runtime][0])
        return manifests
    finally:
        for path in staged.values():
            shutil.rmtree(path, ignore_errors=True)


def _timings(
    model: str,
    signature: str,
    verified: dict[str, tuple[str, dict[str, Any]]],
    precision: str,
    rows: int,
    root: Path,
    timeout: float,
    sample: tuple[str, str] | None,
) -> dict[str, float]:
    """Rows/s of TensorFlow and each verified runtime (cached beside the artifacts)."""
    fields = {
        "model": cache_module.model_digest(model),
        "signature": signature,
        "precision": precision,
        "rows": rows,
        "cpu": cache_module.cpu_flags(),
        "candidates": {r: Path(p).name for r, (p, _) in sorted(verified.items())},
        "format": cache_module.FORMAT,
        "sample": sample[0] if sample else None,
    }
    name = cache_module.entry_name("auto", fields)
    target = root / name
    manifest = cache_module.valid_manifest(target)
    if manifest is None:
        with cache_module.locked(root, name):
            manifest = cache_module.valid_manifest(target)
            if manifest is None:
                job = {
                    "model": model,
                    "signature": signature,
                    "precision": precision,
                    "time": {TENSORFLOW: None, **{r: p for r, (p, _) in verified.items()}},
                    "time_rows": rows,
                    "sample": sample[1] if sample else None,
                }
                result = run_converter(job, timeout)
                staged = cache_module.staging(root, name)
                try:
                    manifest = cache_module.write_manifest(
                        staged, {"key": fields, "rows_per_second": result["rows_per_second"]}
                    )
                    cache_module.commit(staged, target)
                finally:
                    shutil.rmtree(staged, ignore_errors=True)
    return dict(manifest["rows_per_second"])


def store_sample(sample: Any, root: Path) -> tuple[str, str] | None:
    """Write the user's sample inputs into the cache once (``sample-<sha256>.npz``); return
    their digest (part of every key they verify) and the file's path."""
    if sample is None:
        return None
    import hashlib
    import io

    import numpy as np

    if isinstance(sample, dict):
        arrays = {f"input:{k}": np.asarray(v) for k, v in sample.items()}
    else:
        arrays = {"array": np.asarray(sample)}
    if any(len(a.shape) == 0 or len(a) == 0 for a in arrays.values()):
        raise ValueError("runtime_sample must hold at least one row of every input")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # object arrays pickled: our own file
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"sample-{digest[:32]}.npz"
    if not path.exists():
        staged = cache_module.staging(root, path.name)
        (staged / "sample.npz").write_bytes(data)
        os.replace(staged / "sample.npz", path)
        shutil.rmtree(staged, ignore_errors=True)
    return digest, str(path)


def run_converter(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run :mod:`pool.runtimes.converter` on ``job`` in a subprocess; its result.

    Raises :class:`pool.ModelLoadError` if it crashes or runs past ``timeout`` seconds."""
    package_parent = str(Path(__file__).resolve().parent.parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory(prefix="pool-convert-") as scratch:
        job_path, result_path = Path(scratch) / "job.json", Path(scratch) / "result.json"
        job_path.write_text(json.dumps(job))
        command = [sys.executable, "-m", "pool.runtimes.converter", str(job_path), str(result_path)]
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise ModelLoadError(
                f"converting {job['model']} took longer than {timeout:g} s: stopped"
            ) from None
        if done.returncode != 0 or not result_path.exists():
            tail = "\n".join(done.stderr.strip().splitlines()[-20:])
            raise ModelLoadError(
                f"the conversion subprocess for {job['model']} failed (exit code "
                f"{done.returncode}):\n{tail}"
            )
        return json.loads(result_path.read_text())
