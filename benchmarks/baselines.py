"""What a user writes without ``pool``: ``hub.load`` the model, call its signature on arrays.

Used by ``scaling_runner.py`` for the in-process baselines (load-per-call, single process) and
by the plain ``ProcessPoolExecutor`` baseline, whose spawned workers import this module by
name: spawn pickles an initializer and a worker function by reference, so both must be
top-level functions of an importable module (``benchmarks/`` is put on ``sys.path`` by the
runner script, and spawn hands its ``sys.path`` to the children).

TensorFlow is imported inside the functions, never at import time, so that the thread counts
can be set before its runtime starts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

#: The plain executor worker's model, loaded once by :func:`init_worker`.
_MODEL: Model | None = None


def set_threads(intra_op_threads: int | None, inter_op_threads: int | None) -> dict[str, int]:
    """Size TensorFlow's thread pools (before its runtime starts); return what it will use.

    ``None`` keeps TensorFlow's default (as many threads as the CPUs this process may use).
    """
    if intra_op_threads is not None:
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(intra_op_threads)
    if inter_op_threads is not None:
        os.environ["TF_NUM_INTEROP_THREADS"] = str(inter_op_threads)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        if intra_op_threads is not None:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        if inter_op_threads is not None:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    except RuntimeError:  # the runtime already started in this process: keep what it has
        pass
    return {
        # 0 means TensorFlow's default: one thread per CPU of the affinity mask.
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
    }


class Model:
    """A loaded SavedModel called the plain way: ``{name: array} -> {name: array}``."""

    def __init__(self, obj: Any, signature: str = "serving_default") -> None:
        self._obj = obj  # keeps the variables alive
        signatures = getattr(obj, "signatures", None)
        if signatures is not None and signature in signatures:
            self._fn, self._kwargs = signatures[signature], True
        elif callable(obj):
            self._fn, self._kwargs = obj, False
        else:
            raise ValueError(f"the model has no signature {signature!r} and is not callable")

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        tensors = {name: tf.constant(array) for name, array in inputs.items()}
        if self._kwargs:
            raw = self._fn(**tensors)
        else:
            (tensor,) = tensors.values()
            raw = self._fn(tensor)
        if isinstance(raw, Mapping):
            return {name: value.numpy() for name, value in raw.items()}
        return {"output_0": raw.numpy()}

    def describe(self) -> dict[str, Any]:
        """Inputs and outputs of the signature: ``{"inputs": {name: [dtype, shape]}, ...}``."""
        if not self._kwargs:
            raise ValueError("the benchmark needs a model with a 'serving_default' signature")
        _, kwargs = self._fn.structured_input_signature
        outputs = self._fn.structured_outputs
        return {
            "inputs": {name: _spec(spec) for name, spec in sorted(kwargs.items())},
            "outputs": {name: _spec(spec) for name, spec in sorted(outputs.items())}
            if isinstance(outputs, Mapping)
            else {"output_0": _spec(outputs)},
        }


def _spec(spec: Any) -> list:
    import tensorflow as tf

    dtype = "string" if spec.dtype == tf.string else np.dtype(spec.dtype.as_numpy_dtype).name
    return [dtype, None if spec.shape.rank is None else spec.shape.as_list()]


def load(model: str) -> Model:
    """``hub.load`` a SavedModel directory or TF Hub handle."""
    import tensorflow_hub as hub

    return Model(hub.load(model))


def resolve(handle: str) -> str:
    """A local directory for ``handle`` (a remote TF Hub handle is downloaded once)."""
    if "://" not in handle:
        return os.path.abspath(handle)
    import tensorflow_hub as hub

    return hub.resolve(handle)


# --- the plain ProcessPoolExecutor idiom ----------------------------------------------------
def init_worker(model: str, intra_op_threads: int | None, inter_op_threads: int | None) -> None:
    """Executor initializer: load the model once into this worker's global."""
    global _MODEL
    set_threads(intra_op_threads, inter_op_threads)
    _MODEL = load(model)


def run_shard(inputs: dict[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
    """Executor task: call the worker's model on one shard; return ``(pid, outputs)``."""
    if _MODEL is None:
        raise RuntimeError("init_worker did not run in this process")
    return os.getpid(), _MODEL(inputs)


def pid_after(seconds: float) -> int:
    """Executor task: hold this worker for ``seconds`` (so that N of them reach N different
    workers), then return its pid. Used to wait until every worker has loaded the model."""
    time.sleep(seconds)
    return os.getpid()
