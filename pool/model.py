"""The one module that knows TensorFlow's API: resolve, load, describe and call a model.

Nothing else in the package imports TensorFlow. Workers import this module after they have
pinned themselves to their CPUs; the parent imports it only to resolve a remote TF Hub handle.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_hub as hub

from .errors import ModelLoadError
from .messages import DEFAULT_INPUT, DEFAULT_OUTPUT, STRING, SignatureInfo, TensorInfo

log = logging.getLogger("pool")


def configure_threads(intra_op_threads: int, inter_op_threads: int) -> tuple[int, int]:
    """Size TensorFlow's thread pools; must run before the TensorFlow runtime initialises."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    except RuntimeError as exc:  # runtime already initialised: report what it uses
        log.warning("could not set TensorFlow thread counts: %s", exc)
    return (
        tf.config.threading.get_intra_op_parallelism_threads(),
        tf.config.threading.get_inter_op_parallelism_threads(),
    )


def start_runtime() -> None:
    """Start TensorFlow's runtime now (it probes for CUDA devices), after
    :func:`configure_threads`, so that its start-up lines come at a known moment."""
    tf.config.list_physical_devices()


def resolve(handle: str) -> str:
    """Download a remote TF Hub handle into the TF Hub cache (once); return the local copy."""
    log.info("resolving %s into the TF Hub cache", handle)
    try:
        return hub.resolve(handle)
    except Exception as exc:  # URLError, HTTPError, a bad archive, a malformed handle...
        raise ModelLoadError(
            f"could not fetch the TF Hub handle {handle!r} into the TF Hub cache "
            f"({os.environ.get('TFHUB_CACHE_DIR') or 'the default cache'}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _dtype_name(dtype: tf.DType) -> str:
    return STRING if dtype == tf.string else np.dtype(dtype.as_numpy_dtype).name


def _tensor_info(name: str, spec: Any) -> TensorInfo:
    shape = None if spec.shape.rank is None else tuple(spec.shape.as_list())
    return TensorInfo(name=name, dtype=_dtype_name(spec.dtype), shape=shape)


class LoadedModel:
    """A model ready to be called on NumPy shards: ``model({name: array}) -> {name: array}``."""

    def __init__(
        self,
        fn: Callable,
        keep_alive: Any,
        inputs: tuple[TensorInfo, ...] | None,
        outputs: tuple[TensorInfo, ...] | None,
        call_style: str,
        output: str | None,
    ) -> None:
        self._fn = fn
        self._keep_alive = keep_alive  # the loaded object owns the variables
        self._call_style = call_style  # "kwargs" | "positional" | "dict" | "plain" (by input)
        self._output = output
        if outputs is not None and output is not None:
            names = [t.name for t in outputs]
            if output not in names:
                raise ValueError(f"output {output!r} is not an output of the model; it has {names}")
            outputs = tuple(t for t in outputs if t.name == output)
        single = None
        if output is not None:
            single = output
        elif outputs is not None and len(outputs) == 1:
            single = outputs[0].name
        self.signature = SignatureInfo(inputs=inputs, outputs=outputs, single_output=single)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {k: tf.constant(v) for k, v in inputs.items()}
        if self._call_style == "kwargs":
            raw = self._fn(**tensors)
        elif self._call_style == "dict" or (
            self._call_style == "plain" and list(tensors) != [DEFAULT_INPUT]
        ):
            raw = self._fn(tensors)
        else:  # one positional input
            (tensor,) = tensors.values()
            raw = self._fn(tensor)
        if isinstance(raw, Mapping):
            out = {k: _as_numpy(v) for k, v in raw.items()}
        else:
            out = {DEFAULT_OUTPUT: _as_numpy(raw)}
        if self._output is not None:
            if self._output not in out:
                raise ValueError(
                    f"output {self._output!r} is not an output of the model; it has {sorted(out)}"
                )
            out = {self._output: out[self._output]}
        return out

    def warmup_inputs(self, rows: int) -> dict[str, np.ndarray] | None:
        """Zeros (or empty strings) shaped like the signature, or ``None`` if it is unknown."""
        if self.signature.inputs is None:
            return None
        arrays: dict[str, np.ndarray] = {}
        for t in self.signature.inputs:
            if t.shape is None or any(d is None for d in t.shape[1:]):
                return None
            shape = (rows, *(d for d in t.shape[1:] if d is not None))
            if t.dtype == STRING:
                arrays[t.name] = np.full(shape, b"", dtype=np.object_)
            else:
                arrays[t.name] = np.zeros(shape, dtype=t.dtype)
        return arrays


def _as_numpy(value: Any) -> np.ndarray:
    """An output as an array: a read-only view of a CPU tensor's buffer (``.numpy()`` would copy
    it; the caller copies it once more anyway, into the arena or the socket), else a copy."""
    if isinstance(value, tf.Tensor) and value.dtype != tf.string:
        try:
            return np.asarray(memoryview(value))
        except (TypeError, ValueError, BufferError):  # not an eager CPU tensor
            pass
    return np.asarray(value)


def _from_concrete(fn: Any, keep_alive: Any, output: str | None, kwargs_only: bool) -> LoadedModel:
    args, kwargs = fn.structured_input_signature
    if kwargs_only or (kwargs and not args):
        inputs = tuple(_tensor_info(k, s) for k, s in sorted(kwargs.items()))
        style = "kwargs"
    elif len(args) == 1 and isinstance(args[0], Mapping):
        inputs = tuple(_tensor_info(k, s) for k, s in sorted(args[0].items()))
        style = "dict"
    elif len(args) == 1:
        inputs = (_tensor_info(args[0].name or DEFAULT_INPUT, args[0]),)
        style = "positional"
    else:
        raise ModelLoadError(
            f"expected a signature with keyword inputs, one dict or one tensor; got {args!r}"
        )
    structured = fn.structured_outputs
    if isinstance(structured, Mapping):
        outputs = tuple(_tensor_info(k, s) for k, s in sorted(structured.items()))
    else:
        outputs = (_tensor_info(DEFAULT_OUTPUT, structured),)
    return LoadedModel(fn, keep_alive, inputs, outputs, style, output)


def load(model: str | Callable[[], Callable], signature: str, output: str | None) -> LoadedModel:
    """Load ``model`` (a local SavedModel directory or a factory callable)."""
    if callable(model):
        obj = model()
    else:
        if not os.path.isdir(model):
            raise ModelLoadError(f"expected a SavedModel directory, got {model!r}: not found")
        obj = hub.load(model)
    return wrap(obj, signature, output)


def wrap(obj: Any, signature: str = "serving_default", output: str | None = None) -> LoadedModel:
    """Wrap a loaded SavedModel, a ``tf.function`` / concrete function, or a plain callable."""
    signatures = getattr(obj, "signatures", None)
    if signatures is not None and len(signatures) > 0:
        if signature not in signatures:
            raise ModelLoadError(
                f"expected signature {signature!r}; the model has {sorted(signatures.keys())}"
            )
        return _from_concrete(signatures[signature], obj, output, kwargs_only=True)
    if isinstance(obj, tf.types.experimental.PolymorphicFunction) and obj.input_signature:
        return _from_concrete(obj.get_concrete_function(), obj, output, kwargs_only=False)
    if isinstance(obj, tf.types.experimental.ConcreteFunction):
        return _from_concrete(obj, obj, output, kwargs_only=False)
    if callable(obj):
        return LoadedModel(obj, obj, None, None, "plain", output)
    raise ModelLoadError(
        f"expected a SavedModel with signatures or a callable, got {type(obj).__name__}"
    )
