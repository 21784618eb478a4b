"""The Open Inference Protocol (KServe "V2", Triton, MLServer): JSON <-> NumPy arrays.

    POST /v2/models/NAME[/versions/V]/infer
      {"id"?, "parameters"?, "inputs": [{"name", "shape", "datatype", "data"}],
       "outputs"?: [{"name"}]}
    -> {"model_name", "model_version", "id", "outputs": [{"name", "datatype", "shape", "data"}]}

``data`` may be flat (row-major) or nested; it is reshaped to ``shape``. ``datatype`` must be
the signature's (``FP32`` for a float32 input, ``BYTES`` for strings). The binary-data extension
is not supported: tensors travel as JSON. Errors raise :class:`pool.serve.codec.RequestError`.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..messages import STRING, SignatureInfo, TensorInfo
from .codec import MAX_RANK, RequestError, json_value, show, to_array, type_name

#: pool dtype name -> the protocol's tensor datatype.
DATATYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "bfloat16": "BF16",
    STRING: "BYTES",
}
PLATFORM = "tensorflow_savedmodel"


def datatype(dtype: str) -> str:
    return DATATYPES.get(dtype, dtype.upper())


def shape_list(shape: tuple[int | None, ...] | None) -> list[int]:
    """A signature shape in the protocol's form: -1 for any size (and ``[-1]`` for any rank)."""
    if shape is None:
        return [-1]
    return [-1 if d is None else int(d) for d in shape]


def model_metadata(name: str, version: str, signature: SignatureInfo) -> dict:
    """``GET /v2/models/NAME``."""
    return {
        "name": name,
        "versions": [version],
        "platform": PLATFORM,
        "inputs": [_describe(t) for t in signature.inputs or ()],
        "outputs": [_describe(t) for t in signature.outputs or ()],
    }


def _describe(t: TensorInfo) -> dict:
    return {"name": t.name, "datatype": datatype(t.dtype), "shape": shape_list(t.shape)}


def parse_infer(
    body: Any, signature: SignatureInfo
) -> tuple[dict[str, np.ndarray], list[str] | None, str | None]:
    """An ``infer`` body -> (``{input name: array}``, requested output names or ``None``, id)."""
    if not isinstance(body, Mapping):
        raise RequestError(f"expected a JSON object with 'inputs', got {type_name(body)}")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(f"'id' must be a string, got {type_name(request_id)}")
    tensors = body.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise RequestError(
            f"expected 'inputs' to be a non-empty list of tensors {{name, shape, datatype, "
            f"data}}, got {show(tensors)}"
        )
    specs = {t.name: t for t in signature.inputs} if signature.inputs is not None else None
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(tensors):
        if not isinstance(tensor, Mapping):
            raise RequestError(f"inputs[{i}]: expected an object, got {type_name(tensor)}")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise RequestError(f"inputs[{i}]: expected a string 'name', got {show(name)}")
        if name in inputs:
            raise RequestError(f"input {name!r} is given twice")
        if specs is not None and name not in specs:
            raise RequestError(
                f"unexpected input {name!r}; the model's inputs are {signature.describe_inputs()}"
            )
        inputs[name] = _tensor(name, tensor, specs[name] if specs is not None else None)
    if specs is not None and set(inputs) != set(specs):
        raise RequestError(
            f"missing inputs {sorted(set(specs) - set(inputs))}; the model's inputs are "
            f"{signature.describe_inputs()}"
        )
    wanted = body.get("outputs")
    names = None
    if wanted is not None:
        if not isinstance(wanted, list) or not all(
            isinstance(o, Mapping) and isinstance(o.get("name"), str) for o in wanted
        ):
            raise RequestError(f"expected 'outputs' to be a list of {{name}}, got {show(wanted)}")
        names = [o["name"] for o in wanted]
        known = [t.name for t in signature.outputs] if signature.outputs is not None else None
        if known is not None:
            unknown = [n for n in names if n not in known]
            if unknown:
                raise RequestError(f"unknown outputs {unknown}; the model's outputs are {known}")
    return inputs, names, request_id


def _tensor(name: str, tensor: Mapping[str, Any], spec: TensorInfo | None) -> np.ndarray:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise RequestError(
            f"input {name!r}: expected 'shape' to be a list of sizes >= 0, got {show(shape)}"
        )
    given = tensor.get("datatype")
    if spec is not None:
        want = datatype(spec.dtype)
        if given != want:
            raise RequestError(f"input {name!r}: expected datatype {want}, got {show(given)}")
    elif given not in DATATYPES.values():
        raise RequestError(
            f"input {name!r}: expected a datatype among {sorted(DATATYPES.values())}, got "
            f"{show(given)}"
        )
    if len(shape) > MAX_RANK:
        raise RequestError(
            f"input {name!r}: expected a 'shape' of at most {MAX_RANK} sizes, got {len(shape)}"
        )
    data = tensor.get("data")
    if not isinstance(data, list):
        raise RequestError(f"input {name!r}: expected 'data' to be a list, got {type_name(data)}")
    dtype = spec.dtype if spec is not None else _numpy_name(str(given))
    array = to_array(name, _flatten(data), TensorInfo(name, dtype, None), f"{given} tensor")
    size = math.prod(shape)  # exact: a huge declared shape must not wrap around as in int64
    if array.size != size:
        raise RequestError(
            f"input {name!r}: 'shape' {shape} holds {size} values, 'data' has {array.size}"
        )
    try:
        return array.reshape(shape)
    except (ValueError, OverflowError) as exc:  # e.g. [0, 2**62]: no values, too big a shape
        raise RequestError(f"input {name!r}: cannot use 'shape' {shape}: {exc}") from None


def _numpy_name(given: str) -> str:
    return next(k for k, v in DATATYPES.items() if v == given)


def _flatten(data: list, depth: int = 0, out: list | None = None) -> list:
    """Nested lists of values -> the values in row-major order (``data`` may be either);
    at most :data:`MAX_RANK` levels deep, so a deeply nested body is a 400, not a crash."""
    out = [] if out is None else out
    if not data or not isinstance(data[0], list):
        if any(isinstance(v, list) for v in data):
            raise RequestError("'data' mixes lists and values at one level")
        out.extend(data)
        return out
    if depth + 1 >= MAX_RANK:
        raise RequestError(f"'data' is nested more than {MAX_RANK} levels deep")
    for item in data:
        if not isinstance(item, list):
            raise RequestError("'data' mixes lists and values at one level")
        _flatten(item, depth + 1, out)
    return out


def encode_infer(
    model_name: str,
    version: str,
    request_id: str | None,
    outputs: Mapping[str, np.ndarray],
    signature: SignatureInfo,
    names: list[str] | None,
) -> bytes:
    """The ``infer`` response body; outputs in the order asked for, else the signature's."""
    dtypes = {t.name: t.dtype for t in signature.outputs or ()}
    parts = []
    for name in names if names is not None else list(outputs):
        array = np.asarray(outputs[name])
        dtype = dtypes.get(name) or (STRING if array.dtype.kind in "OSU" else array.dtype.name)
        parts.append(
            '{"name":'
            + _quote(name)
            + ',"datatype":"'
            + datatype(dtype)
            + '","shape":'
            + json_value(np.asarray(array.shape, dtype=np.int64))
            + ',"data":'
            + _flat_value(array, name)
            + "}"
        )
    return (
        '{"model_name":'
        + _quote(model_name)
        + ',"model_version":'
        + _quote(version)
        + ',"id":'
        + _quote(request_id if request_id is not None else str(uuid.uuid4()))
        + ',"outputs":['
        + ",".join(parts)
        + "]}"
    ).encode()


def _flat_value(array: np.ndarray, name: str) -> str:
    if array.dtype.kind in "OS":  # BYTES: the protocol's JSON carries text
        flat = [
            v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else v
            for v in array.reshape(-1).tolist()
        ]
        as_text = np.empty(len(flat), dtype=object)
        as_text[:] = flat
        return json_value(as_text, "")
    return json_value(array.reshape(-1), name)


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
