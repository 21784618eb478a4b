"""A SavedModel's signatures without TensorFlow: a minimal reader of ``saved_model.pb``.

Used by :class:`pool.PredictionPool` (an unknown signature or output of a local SavedModel
fails before any worker starts), the file jobs (check columns before any worker starts),
``python -m pool inspect`` and ``python -m pool serve``.

Only the protobuf wire format and the few fields on the path
SavedModel.meta_graphs -> MetaGraphDef.signature_def -> SignatureDef.inputs/outputs are read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .messages import STRING, SignatureInfo, TensorInfo

_TF_DTYPES = {
    1: "float32",
    2: "float64",
    3: "int32",
    4: "uint8",
    5: "int16",
    6: "int8",
    7: STRING,
    9: "int64",
    10: "bool",
    17: "uint16",
    19: "float16",
    22: "uint32",
    23: "uint64",
}


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, Any]]:
    """The (field number, value) pairs of one protobuf message, in wire order."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        value: int | memoryview
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def _tensor_info(name: str, buf: memoryview) -> TensorInfo | None:
    dtype: str | None = None
    shape: tuple[int | None, ...] | None = ()
    for number, value in _fields(buf):
        if number == 2:
            dtype = _TF_DTYPES.get(value)
        elif number == 3:  # TensorShapeProto
            dims: list[int | None] | None = []
            for field, item in _fields(value):
                if field == 2 and dims is not None:
                    size = dict(_fields(item)).get(1, 0)
                    size -= (1 << 64) if size >= 1 << 63 else 0
                    dims.append(None if size < 0 else size)
                elif field == 3 and item:
                    dims = None
            shape = None if dims is None else tuple(dims)
        elif number in (4, 5):  # sparse or composite tensors: not checked here
            return None
    return None if dtype is None else TensorInfo(name=name, dtype=dtype, shape=shape)


def read_signatures(model: Any) -> dict[str, SignatureInfo | None] | None:
    """Every signature of a local SavedModel, read from ``saved_model.pb`` without TensorFlow.

    ``{signature name: SignatureInfo}`` in the file's order, with ``None`` for a signature that
    uses sparse or composite tensors (not described here). ``None`` for anything but a readable
    local SavedModel (a TF Hub handle, a missing or unparsable file). Internal entries such as
    ``__saved_model_init_op`` are left out.
    """
    if not isinstance(model, (str, os.PathLike)) or "://" in str(model):
        return None
    try:
        buf = memoryview(Path(model, "saved_model.pb").read_bytes())
        found: dict[str, SignatureInfo | None] = {}
        for number, meta_graph in _fields(buf):
            if number != 2:  # SavedModel.meta_graphs
                continue
            for field, entry in _fields(meta_graph):
                if field != 5:  # MetaGraphDef.signature_def
                    continue
                items = dict(_fields(entry))
                name = bytes(items.get(1, b"")).decode()
                if not name.startswith("__"):
                    found[name] = _signature(items.get(2, memoryview(b"")))
        return found
    except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError):
        return None


def _signature(buf: memoryview) -> SignatureInfo | None:
    """One SignatureDef: its inputs and outputs sorted by name, as the workers report them."""
    sides: dict[int, list[TensorInfo]] = {1: [], 2: []}
    for side, tensors in _fields(buf):
        if side in sides:
            pair = dict(_fields(tensors))
            info = _tensor_info(bytes(pair[1]).decode(), pair.get(2, memoryview(b"")))
            if info is None:
                return None
            sides[side].append(info)
    inputs = tuple(sorted(sides[1], key=lambda t: t.name))
    outputs = tuple(sorted(sides[2], key=lambda t: t.name))
    single = outputs[0].name if len(outputs) == 1 else None
    return SignatureInfo(inputs=inputs, outputs=outputs, single_output=single)


def peek_signature(
    model: Any, signature: str = "serving_default", output: str | None = None
) -> SignatureInfo | None:
    """Read a local SavedModel's signature from ``saved_model.pb`` without TensorFlow.

    Used to check columns against the model before any worker starts. Best effort: ``None``
    for anything but a plain local SavedModel; the pool's own check after loading is final.
    """
    found = (read_signatures(model) or {}).get(signature)
    if found is None or found.inputs is None or found.outputs is None:
        return None
    outputs = found.outputs
    if output is not None:
        outputs = tuple(t for t in outputs if t.name == output)
    if not found.inputs or not outputs:
        return None
    single = outputs[0].name if len(outputs) == 1 else None
    return SignatureInfo(inputs=found.inputs, outputs=outputs, single_output=single)


def not_a_savedmodel(model: str) -> str | None:
    """Why the local path ``model`` is not a SavedModel directory (``"no such directory"``,
    ``"no saved_model.pb in it"``), or ``None``: it is one, or it is a handle (``"://"``).
    Each command line raises its own error with it, before any worker starts."""
    if "://" in model or os.path.isfile(os.path.join(model, "saved_model.pb")):
        return None
    return "no such directory" if not os.path.isdir(model) else "no saved_model.pb in it"


def check_signature(model: Any, signature: str, output: str | None) -> None:
    """Raise :class:`pool.ModelLoadError` if ``saved_model.pb`` of the local SavedModel
    ``model`` shows that it has no signature ``signature``, or that this signature has no output
    ``output``: the same errors a worker would raise after loading it, found without starting
    one. Nothing is checked when the file cannot tell (a TF Hub handle, a factory, a signature
    with sparse or composite tensors, an unreadable file)."""
    found = read_signatures(model)
    if not found:
        return
    if signature not in found:
        raise ModelLoadError(
            f"expected signature {signature!r}; the model {model!r} has {sorted(found)}"
        )
    info = found[signature]
    if output is None or info is None or info.outputs is None:
        return
    names = [t.name for t in info.outputs]
    if output not in names:
        raise ModelLoadError(
            f"output {output!r} is not an output of signature {signature!r}; it has {names}"
        )
