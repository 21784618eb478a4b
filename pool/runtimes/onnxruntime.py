"""The ONNX Runtime: an ONNX model (converted with tf2onnx) on the CPU execution provider.

One session per worker, ``intra_op_num_threads`` = the worker's threads, no inter-op pool, all
graph optimisations. Inputs keep a symbolic batch dimension. Imports ``onnxruntime``, never
TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from ..messages import SignatureInfo, WorkerConfig
from . import select_output, signature_from_json, zero_inputs
from .cache import read_manifest

ONNX = "model.onnx"


def session(artifact: str, threads: int):  # type: ignore[no-untyped-def]
    """An inference session on ``threads`` threads (shared with the conversion's timing)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(
        os.path.join(artifact, ONNX), options, providers=["CPUExecutionProvider"]
    )


class ONNXRuntimeModel:
    def __init__(
        self, artifact: str, signature: SignatureInfo, threads: int, output: str | None = None
    ) -> None:
        self.signature = select_output(signature, output)
        self._session = session(artifact, threads)
        self._names = [t.name for t in self.signature.outputs or ()]
        self._dtypes = [t.numpy_dtype for t in self.signature.outputs or ()]

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._session.run(self._names, dict(inputs))
        return {
            name: np.asarray(value).astype(dtype, copy=False)
            for name, value, dtype in zip(self._names, values, self._dtypes, strict=True)
        }

    def warmup_inputs(self, rows: int) -> dict[str, np.ndarray] | None:
        return zero_inputs(self.signature, rows)


def load(config: WorkerConfig) -> ONNXRuntimeModel:
    if config.artifact is None:
        raise ValueError("the onnxruntime runtime needs a converted artifact")
    signature = signature_from_json(read_manifest(config.artifact)["signature"])
    return ONNXRuntimeModel(config.artifact, signature, config.intra_op_threads, config.output)
