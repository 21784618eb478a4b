"""The runtime seam: which engine runs the model inside a worker.

Every runtime is one module of this package with the same small interface (after Apache
Beam's per-framework model handlers)::

    load(config: WorkerConfig) -> RuntimeModel     # in the worker, once
    model({input name: array}) -> {output name: array}   # names and dtypes of the TF signature

- ``tensorflow``: the SavedModel itself, through :mod:`pool.model` (bit-identical to calling
  the model in-process; the default).
- ``openvino``: an OpenVINO IR converted from the SavedModel (``openvino`` installed).
- ``onnxruntime``: an ONNX model converted with tf2onnx (``onnxruntime`` installed; converting
  needs ``tf2onnx``).

A converted runtime loads an *artifact* that :mod:`pool.runtimes.resolve` built beforehand, in
the parent, through a conversion subprocess (:mod:`pool.runtimes.converter`, the only module
here that imports TensorFlow) and cached (:mod:`pool.runtimes.cache`). A worker running a
converted model imports this package and its runtime's module only: never TensorFlow.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from ..messages import STRING, SignatureInfo, WorkerConfig

TENSORFLOW = "tensorflow"
OPENVINO = "openvino"
ONNXRUNTIME = "onnxruntime"
AUTO = "auto"
#: Runtimes a worker can run, in the order ``auto`` lists them.
RUNTIMES = (TENSORFLOW, OPENVINO, ONNXRUNTIME)
#: What ``runtime=`` accepts.
CHOICES = (*RUNTIMES, AUTO)
#: Converted runtimes: the Python modules each needs in a worker, and to convert.
CONVERTED = {OPENVINO: ("openvino",), ONNXRUNTIME: ("onnxruntime",)}
CONVERTERS = {OPENVINO: ("openvino",), ONNXRUNTIME: ("tf2onnx", "onnx")}
#: The ``pip install 'prediction-pool[EXTRA]'`` that brings each converted runtime.
EXTRAS = {OPENVINO: "openvino", ONNXRUNTIME: "onnx"}
#: What ``precision=`` accepts: ``bf16`` is OpenVINO's inference precision hint only.
PRECISIONS = ("f32", "bf16")
#: Default tolerances per precision: the largest accepted difference between a converted
#: model's output and TensorFlow's, relative to the output's scale (its largest magnitude).
#: See docs/runtimes.md for the measurements behind them.
TOLERANCES = {"f32": 1e-4, "bf16": 5e-2}


class RuntimeModel(Protocol):
    """A model loaded by a runtime, called on NumPy inputs by the worker."""

    signature: SignatureInfo

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def warmup_inputs(self, rows: int) -> dict[str, np.ndarray] | None: ...


def installed(runtime: str, converting: bool = False) -> bool:
    """Whether ``runtime`` can run here (and, with ``converting``, be converted to)."""
    if runtime == TENSORFLOW:
        return True
    needed = CONVERTED[runtime] + (CONVERTERS[runtime] if converting else ())
    return all(importlib.util.find_spec(name) is not None for name in needed)


def load(config: WorkerConfig) -> RuntimeModel:
    """In a worker: load ``config.artifact`` with ``config.runtime`` (``worker.load_model``
    times it and warms it up). The worker has pinned its CPUs already; no TensorFlow is
    imported on this path."""
    from pathlib import Path

    from .cache import valid_manifest

    if config.artifact is None or valid_manifest(Path(config.artifact)) is None:
        raise FileNotFoundError(
            f"the {config.runtime} model converted from {config.model} is not whole at "
            f"{config.artifact} on this machine: workers on other machines need the runtime "
            "cache ($POOL_RUNTIME_CACHE) on storage they all see, or `python -m pool compile "
            "MODEL --runtime ...` run where they can read it (docs/runtimes.md)"
        )
    module = importlib.import_module(f"{__name__}.{config.runtime}")
    model: RuntimeModel = module.load(config)
    return model


# --- shared by the converted runtimes ------------------------------------------------------------


def synthetic_inputs(signature: SignatureInfo, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs shaped like the signature: normal floats, small non-negative integers.

    Raises ``ValueError`` naming an input whose shape is unknown past the batch dimension."""
    if signature.inputs is None:
        raise ValueError("the model declares no input signature: cannot synthesise inputs")
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for t in signature.inputs:
        if t.shape is None or any(d is None for d in t.shape[1:]):
            raise ValueError(
                f"cannot synthesise input {t.describe()}: its shape is not fixed "
                "(pass runtime_sample=)"
            )
        shape = (rows, *(int(d) for d in t.shape[1:] if d is not None))
        dtype = t.numpy_dtype
        if t.dtype == STRING:
            arrays[t.name] = np.array([f"sample {i}".encode() for i in range(rows)], dtype=object)
        elif dtype == np.bool_:
            arrays[t.name] = rng.integers(0, 2, size=shape).astype(bool)
        elif np.issubdtype(dtype, np.integer):
            arrays[t.name] = rng.integers(0, 10, size=shape).astype(dtype)
        else:
            arrays[t.name] = rng.standard_normal(size=shape).astype(dtype)
    return arrays


def zero_inputs(signature: SignatureInfo, rows: int) -> dict[str, np.ndarray] | None:
    """Zeros shaped like the signature (the warm-up), or ``None`` where a shape is unknown."""
    if signature.inputs is None:
        return None
    arrays = {}
    for t in signature.inputs:
        if t.shape is None or any(d is None for d in t.shape[1:]):
            return None
        arrays[t.name] = np.zeros(
            (rows, *(int(d) for d in t.shape[1:] if d is not None)), t.numpy_dtype
        )
    return arrays


def select_output(signature: SignatureInfo, output: str | None) -> SignatureInfo:
    """The signature as the pool sees it when ``output=`` picks one output."""
    outputs = signature.outputs
    if output is None:
        return signature
    names = [t.name for t in outputs or ()]
    if output not in names:
        raise ValueError(f"output {output!r} is not an output of the model; it has {names}")
    return SignatureInfo(
        inputs=signature.inputs,
        outputs=tuple(t for t in outputs or () if t.name == output),
        single_output=output,
    )


def signature_to_json(signature: SignatureInfo) -> dict[str, Any]:
    def tensors(items: Any) -> Any:
        if items is None:
            return None
        return [
            {"name": t.name, "dtype": t.dtype, "shape": None if t.shape is None else list(t.shape)}
            for t in items
        ]

    return {
        "inputs": tensors(signature.inputs),
        "outputs": tensors(signature.outputs),
        "single_output": signature.single_output,
    }


def signature_from_json(data: Mapping[str, Any]) -> SignatureInfo:
    from ..messages import TensorInfo

    def tensors(items: Any) -> Any:
        if items is None:
            return None
        return tuple(
            TensorInfo(
                name=t["name"],
                dtype=t["dtype"],
                shape=None if t["shape"] is None else tuple(t["shape"]),
            )
            for t in items
        )

    return SignatureInfo(
        inputs=tensors(data["inputs"]),
        outputs=tensors(data["outputs"]),
        single_output=data["single_output"],
    )
