"""The conversion subprocess: ``python -m pool.runtimes.converter JOB.json RESULT.json``.

Run by :mod:`pool.runtimes.resolve`, never imported by the pool: it imports TensorFlow (to load
the SavedModel, and because the converters need it), so a crash, a hang or a leak here stays
in this process. For each runtime of the job it converts the SavedModel into the directory it
is given, then runs the converted model beside TensorFlow on inputs synthesised from the
signature (1 and 8 rows) and records the largest absolute and relative difference per output.
With ``time`` it times each listed runtime on one thread with ``time_rows`` rows per call
(interleaved rounds, median). Everything measured goes to RESULT.json; the parent writes the
manifests and moves the artifacts into the cache.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..messages import SignatureInfo
from . import OPENVINO, TENSORFLOW, signature_to_json, synthetic_inputs

#: Rows of the verification calls (two batch sizes: the batch dimension stays dynamic).
VERIFY_ROWS = (1, 8)

Call = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


class ConversionError(Exception):
    def __init__(self, message: str, unconverted_ops: list[str] | None = None) -> None:
        super().__init__(message)
        self.unconverted_ops = unconverted_ops or []


def _convert_openvino(loaded: Any, job: dict[str, Any], out_dir: str) -> None:
    import openvino as ov

    source = (
        job["model"]
        if job["signature"] == "serving_default"
        else loaded.signatures[job["signature"]]
    )
    try:
        model = ov.convert_model(source)
    except Exception as exc:  # OpConversionFailure and friends: name the ops
        text = str(exc)
        found = re.search(r"No conversion rule found for operations: ([^\n]*)", text)
        ops = [op.strip() for op in found.group(1).split(",")] if found else []
        if ops:
            raise ConversionError(f"OpenVINO cannot convert ops {', '.join(ops)}", ops) from None
        raise ConversionError(f"OpenVINO could not convert the model: {text[:2000]}") from None
    # Keep the batch dimension dynamic so combined batches of any size never recompile.
    shapes = {}
    for port in model.inputs:
        shape = port.get_partial_shape()
        if shape.rank.is_static and len(shape) > 0 and shape[0].is_static:
            dims = [-1] + [d.get_length() if d.is_static else -1 for d in list(shape)[1:]]
            shapes[port.any_name] = ov.PartialShape(dims)
    if shapes:
        model.reshape(shapes)
    # Weights stay f32: save_model would write FP16 weights by default.
    ov.save_model(model, os.path.join(out_dir, "model.xml"), compress_to_fp16=False)


def _convert_onnx(loaded: Any, job: dict[str, Any], out_dir: str) -> None:
    import onnx
    import tensorflow as tf
    import tf2onnx

    fn = loaded.signatures[job["signature"]]
    specs = fn.structured_input_signature[1]
    names = sorted(specs)
    signature = [tf.TensorSpec(specs[k].shape, specs[k].dtype, name=k) for k in names]

    @tf.function(input_signature=signature)
    def call(*args: Any) -> Any:
        return fn(**dict(zip(names, args, strict=True)))

    path = os.path.join(out_dir, "model.onnx")
    try:
        proto, _ = tf2onnx.convert.from_function(
            call, input_signature=signature, opset=17, output_path=path
        )
    except Exception as exc:
        raise ConversionError(f"tf2onnx could not convert the model: {exc}") from None
    ops = sorted(
        {
            node.op_type
            for node in proto.graph.node
            if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type)
        }
    )
    if ops:
        raise ConversionError(f"tf2onnx cannot convert ops {', '.join(ops)}", ops)


def _open(runtime: str, out_dir: str, signature: SignatureInfo, precision: str) -> Call:
    if runtime == OPENVINO:
        from .openvino import OpenVINOModel

        return OpenVINOModel(out_dir, signature, precision, threads=1)
    from .onnxruntime import ONNXRuntimeModel

    return ONNXRuntimeModel(out_dir, signature, threads=1)


def _differences(
    got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]]
) -> dict[str, dict[str, float]]:
    """Per output: the largest absolute difference, the output's scale (its largest
    magnitude) and their ratio, over every sample call."""
    found: dict[str, dict[str, float]] = {}
    for g, w in zip(got, want, strict=True):
        for name, ref in w.items():
            if name not in g:
                raise ConversionError(f"the converted model has no output {name!r}")
            value = np.asarray(g[name])
            if value.shape != ref.shape:
                raise ConversionError(
                    f"output {name!r}: expected shape {ref.shape}, the converted model gave "
                    f"{value.shape}"
                )
            ref64, value64 = ref.astype(np.float64), value.astype(np.float64)
            entry = found.setdefault(name, {"max_abs": 0.0, "scale": 0.0})
            entry["max_abs"] = max(
                entry["max_abs"], float(np.max(np.abs(value64 - ref64), initial=0))
            )
            entry["scale"] = max(entry["scale"], float(np.max(np.abs(ref64), initial=0)))
    for entry in found.values():
        scale, diff = entry["scale"], entry["max_abs"]
        entry["max_rel"] = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    return found


def _time(
    calls: dict[str, Call], inputs: dict[str, np.ndarray], rounds: int = 3
) -> dict[str, float]:
    """Rows/s of each call on ``inputs``: interleaved rounds of >= 0.3 s each, median."""
    rows = len(next(iter(inputs.values())))
    for call in calls.values():
        call(inputs)
        call(inputs)
    figures: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            done, started = 0, time.perf_counter()
            while True:
                call(inputs)
                done += rows
                elapsed = time.perf_counter() - started
                if elapsed >= 0.3:
                    break
            figures[name].append(done / elapsed)
    return {name: float(np.median(values)) for name, values in figures.items()}


def load_sample(path: str, signature: SignatureInfo) -> dict[str, np.ndarray]:
    """The user's sample inputs, by input name, cast to the signature's dtypes."""
    with np.load(path, allow_pickle=True) as stored:  # written by the pool itself
        arrays = {k: stored[k] for k in stored.files}
    specs = {t.name: t for t in signature.inputs or ()}
    if "array" in arrays:
        if len(specs) != 1:
            raise ValueError(
                f"runtime_sample is one array, but the model takes {sorted(specs)}: pass a dict"
            )
        arrays = {next(iter(specs)): arrays["array"]}
    else:
        arrays = {k.removeprefix("input:"): v for k, v in arrays.items()}
    if set(arrays) != set(specs):
        raise ValueError(f"runtime_sample has inputs {sorted(arrays)}, the model {sorted(specs)}")
    if len({len(v) for v in arrays.values()}) != 1:
        raise ValueError("runtime_sample's inputs have different numbers of rows")
    return {k: np.asarray(v, dtype=specs[k].numpy_dtype) for k, v in arrays.items()}


def run(job: dict[str, Any]) -> dict[str, Any]:
    os.environ["TF_NUM_INTRAOP_THREADS"] = "1"
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    from .. import model as tf_model

    tf_model.configure_threads(1, 1)
    import tensorflow as tf

    saved = tf.saved_model.load(job["model"])
    loaded = tf_model.wrap(saved, job["signature"], None)
    signature = loaded.signature
    result: dict[str, Any] = {"signature": signature_to_json(signature), "convert": {}}
    sample_error = ""
    try:
        if job.get("sample"):
            given = load_sample(job["sample"], signature)
            samples = [{k: v[:1] for k, v in given.items()}, given]
        else:
            samples = [synthetic_inputs(signature, n, seed) for seed, n in enumerate(VERIFY_ROWS)]
    except ValueError as exc:
        samples = []
        sample_error = str(exc)
    want = [{k: np.array(v) for k, v in loaded(s).items()} for s in samples]
    for runtime, out_dir in job.get("convert", {}).items():
        started = time.perf_counter()
        entry: dict[str, Any] = {"error": None, "unconverted_ops": []}
        try:
            if not samples:
                raise ConversionError(sample_error)
            (_convert_openvino if runtime == OPENVINO else _convert_onnx)(saved, job, out_dir)
            converted = _open(runtime, out_dir, signature, job["precision"])
            entry["differences"] = _differences([converted(s) for s in samples], want)
        except ConversionError as exc:
            entry["error"] = str(exc)
            entry["unconverted_ops"] = exc.unconverted_ops
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()
        entry["seconds"] = time.perf_counter() - started
        result["convert"][runtime] = entry
    timing = job.get("time")
    if timing:
        calls: dict[str, Call] = {}
        for runtime, artifact in timing.items():
            calls[runtime] = (
                loaded
                if runtime == TENSORFLOW
                else _open(runtime, artifact, signature, job["precision"])
            )
        rows = int(job["time_rows"])
        if job.get("sample"):
            given = load_sample(job["sample"], signature)
            inputs = {k: np.take(v, np.arange(rows) % len(v), axis=0) for k, v in given.items()}
        else:
            inputs = synthetic_inputs(signature, rows, seed=7)
        result["rows_per_second"] = _time(calls, inputs)
        result["time_rows"] = int(job["time_rows"])
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING)
    with open(args[0]) as f:
        job = json.load(f)
    result = run(job)
    with open(args[1], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
