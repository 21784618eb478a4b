"""``tensorflow.TensorProto`` <-> NumPy arrays, as TensorFlow's ``tensor.FromProto`` and
``Tensor::AsProtoField`` define them (what ``tf.make_tensor_proto`` / ``tf.make_ndarray`` write
and read on the client). No TensorFlow: the messages come from :mod:`.grpc_protos`.

Reading a request's tensor: its ``dtype`` names the NumPy dtype; the values come from
``tensor_content`` (raw little-endian bytes, ``tf.make_tensor_proto``'s choice for NumPy arrays)
or from the typed field of that dtype (``float_val``, ``int64_val``, ``string_val``...); fewer
typed values than the shape holds are padded with the last one (none: zeros), as TensorFlow
does. Writing an output: the typed field of its dtype (TF Serving's default,
``AsProtoField``); strings as bytes in ``string_val``.

Every mistake raises :class:`TensorError` (the server answers ``INVALID_ARGUMENT``) naming the
input, what was expected and what was given.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import grpc_protos as protos

#: DataType number -> (pool dtype name, NumPy dtype, typed field of TensorProto).
_BY_ENUM: dict[int, tuple[str, np.dtype, str]] = {
    1: ("float32", np.dtype("<f4"), "float_val"),
    2: ("float64", np.dtype("<f8"), "double_val"),
    3: ("int32", np.dtype("<i4"), "int_val"),
    4: ("uint8", np.dtype("u1"), "int_val"),
    5: ("int16", np.dtype("<i2"), "int_val"),
    6: ("int8", np.dtype("i1"), "int_val"),
    7: ("string", np.dtype(object), "string_val"),
    8: ("complex64", np.dtype("<c8"), "scomplex_val"),
    9: ("int64", np.dtype("<i8"), "int64_val"),
    10: ("bool", np.dtype("?"), "bool_val"),
    17: ("uint16", np.dtype("<u2"), "int_val"),
    18: ("complex128", np.dtype("<c16"), "dcomplex_val"),
    19: ("float16", np.dtype("<f2"), "half_val"),
    22: ("uint32", np.dtype("<u4"), "uint32_val"),
    23: ("uint64", np.dtype("<u8"), "uint64_val"),
}
try:  # bfloat16 exists in NumPy only through ml_dtypes (installed with TensorFlow, JAX...)
    import ml_dtypes

    _BY_ENUM[14] = ("bfloat16", np.dtype(ml_dtypes.bfloat16).newbyteorder("<"), "half_val")
except ImportError:  # pragma: no cover - depends on the environment
    pass

#: pool dtype name -> DataType number.
ENUM_OF = {name: number for number, (name, _, _) in _BY_ENUM.items()}
_NAMES = {number: name for name, number in protos.DATA_TYPES.items()}

#: Most elements a request tensor may declare (a shape is checked before anything is made).
MAX_ELEMENTS = 1 << 31


class TensorError(ValueError):
    """A tensor that cannot be read as the signature's input (``INVALID_ARGUMENT``)."""


def dtype_name(number: int) -> str:
    """``DT_FLOAT`` for 1: TensorFlow's name of a DataType number."""
    return _NAMES.get(number, f"DataType {number}")


def to_array(name: str, tensor: Any, want: str | None) -> np.ndarray:
    """The request tensor ``name`` as an array; ``want``: the signature's dtype name (``None``:
    any). A dtype other than the signature's is refused, as TF Serving does."""
    number = tensor.dtype
    known = _BY_ENUM.get(number)
    if known is None:
        raise TensorError(
            f"input {name!r}: dtype {dtype_name(number)} is not supported; expected one of "
            f"{sorted(dtype_name(n) for n in _BY_ENUM)}"
        )
    dtype_label, dtype, field = known
    if want is not None and want != dtype_label:
        expected = dtype_name(ENUM_OF.get(want, 0)) if want in ENUM_OF else want
        raise TensorError(
            f"input {name!r}: expected dtype {expected} ({want}), got {dtype_name(number)} "
            f"({dtype_label})"
        )
    shape_proto = tensor.tensor_shape
    if shape_proto.unknown_rank:
        raise TensorError(f"input {name!r}: expected a tensor of known shape, got unknown_rank")
    shape = tuple(d.size for d in shape_proto.dim)
    if any(size < 0 for size in shape):
        raise TensorError(f"input {name!r}: expected sizes >= 0, got shape {list(shape)}")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise TensorError(
            f"input {name!r}: shape {list(shape)} holds {count} values; at most "
            f"{MAX_ELEMENTS} are accepted"
        )
    content = tensor.tensor_content
    if content:
        if dtype.kind == "O":
            raise TensorError(
                f"input {name!r}: DT_STRING values must be in string_val, got tensor_content"
            )
        if len(content) != count * dtype.itemsize:
            raise TensorError(
                f"input {name!r}: tensor_content holds {len(content)} bytes; shape "
                f"{list(shape)} of {dtype_name(number)} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(content, dtype).reshape(shape)
    values = getattr(tensor, field)
    given = len(values)
    if field in ("scomplex_val", "dcomplex_val"):
        if given % 2:
            raise TensorError(
                f"input {name!r}: {field} holds {given} numbers; expected (real, imaginary) pairs"
            )
        given //= 2
    if given > count:
        raise TensorError(
            f"input {name!r}: {field} holds {given} values; shape {list(shape)} holds {count}"
        )
    if dtype.kind == "O":
        flat = np.empty(given, dtype=object)
        flat[:] = list(values)
    elif field == "half_val":  # the 16 bits of each value, in an int32
        flat = np.array(values, dtype=np.uint16).view(dtype)
    elif dtype.kind == "c":
        flat = np.array(values, dtype=dtype.type(0).real.dtype).view(dtype)
    else:
        try:
            flat = np.array(values, dtype=dtype)
        except OverflowError:
            raise TensorError(
                f"input {name!r}: a value of {field} does not fit {dtype_label}"
            ) from None
    if given < count:  # TensorFlow's rule: pad with the last value given (zeros if none)
        if given == 0:
            flat = np.full(count, b"" if dtype.kind == "O" else 0, dtype=dtype)
        else:
            flat = np.concatenate([flat, np.full(count - given, flat[-1], dtype=dtype)])
    return flat.reshape(shape)


def from_array(array: np.ndarray, out: Any) -> None:
    """Write ``array`` into the TensorProto ``out`` (dtype, shape, the typed field)."""
    array = np.asarray(array)
    kind = array.dtype.kind
    if kind in "OSU":
        out.dtype = 7
        _shape(array, out)
        out.string_val.extend(
            v.encode() if isinstance(v, str) else bytes(v) for v in array.reshape(-1).tolist()
        )
        return
    name = array.dtype.name
    number = ENUM_OF.get(name)
    if number is None:
        raise TypeError(f"output dtype {array.dtype} has no TensorFlow DataType")
    out.dtype = number
    _shape(array, out)
    field = _BY_ENUM[number][2]
    flat = array.reshape(-1)
    if field == "half_val":
        getattr(out, field).extend(flat.view(np.uint16).tolist())
    elif kind == "c":
        getattr(out, field).extend(flat.view(flat.real.dtype).tolist())
    else:
        getattr(out, field).extend(flat.tolist())


def _shape(array: np.ndarray, out: Any) -> None:
    dims = out.tensor_shape.dim
    for size in array.shape:
        dims.add(size=size)
