"""The OpenVINO runtime: an OpenVINO IR (``model.xml`` + ``model.bin``) on the CPU plugin.

Compiled with the precision pinned (``INFERENCE_PRECISION_HINT``: the CPU plugin would pick
bf16 by itself on CPUs with AMX), one stream and the worker's thread count. The IR keeps the
batch dimension dynamic (``[?, ...]``), so a combined batch of any size runs without a
recompile. Imports ``openvino``, never TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..messages import SignatureInfo, WorkerConfig
from . import select_output, signature_from_json, zero_inputs
from .cache import read_manifest

XML = "model.xml"
BIN = "model.bin"


def compile_properties(precision: str, threads: int) -> dict[str, Any]:
    """The CPU plugin's properties for one worker (shared with the conversion's timing)."""
    return {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "INFERENCE_NUM_THREADS": int(threads),
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
    }


class OpenVINOModel:
    def __init__(
        self,
        artifact: str,
        signature: SignatureInfo,
        precision: str,
        threads: int,
        output: str | None = None,
    ) -> None:
        import openvino as ov

        self.signature = select_output(signature, output)
        core = ov.Core()
        model = core.read_model(os.path.join(artifact, XML))
        self._compiled = core.compile_model(model, "CPU", compile_properties(precision, threads))
        self._request = self._compiled.create_infer_request()
        self._outputs = [
            (t.name, self._compiled.output(t.name), t.numpy_dtype)
            for t in self.signature.outputs or ()
        ]

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._request.infer(
            {name: np.ascontiguousarray(value) for name, value in inputs.items()}
        )
        return {
            name: np.asarray(results[port]).astype(dtype, copy=False)
            for name, port, dtype in self._outputs
        }

    def warmup_inputs(self, rows: int) -> dict[str, np.ndarray] | None:
        return zero_inputs(self.signature, rows)


def load(config: WorkerConfig) -> OpenVINOModel:
    if config.artifact is None:
        raise ValueError("the openvino runtime needs a converted artifact")
    signature = signature_from_json(read_manifest(config.artifact)["signature"])
    return OpenVINOModel(
        config.artifact, signature, config.precision, config.intra_op_threads, config.output
    )
