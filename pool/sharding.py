"""Validate inputs against the signature, split them into shards, gather outputs in order.

NumPy only: this runs in the caller's process, before anything is dispatched, so a bad input
fails fast with an error that names the expected signature, and never reaches a worker.

:func:`prepare` returns a snapshot: arrays the pool owns, sharing no memory with the caller's
input, so a caller may reuse or refill its buffer as soon as ``submit``/``imap`` returns (a
queued shard is read when it is packed for a worker, and again if it is re-run). An input that
validation already copied (a dtype cast, a Python list) is not copied a second time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import WorkerError
from .messages import DEFAULT_INPUT, DEFAULT_OUTPUT, STRING, SignatureInfo, TensorInfo

#: Target bytes of input per shard when ``shard_size`` is automatic.
TARGET_SHARD_BYTES = 4 << 20
#: Automatic shards stay at or below this many rows...
MAX_AUTO_SHARD_ROWS = 4096
#: ...and a call is split into at least this many shards per worker, for load balance.
SHARDS_PER_WORKER = 4

Inputs = dict[str, np.ndarray]


def _as_array(
    name: str, value: Any, spec: TensorInfo | None, expected: str, snapshot: bool = True
) -> np.ndarray:
    """One input as a snapshot: an array of the spec's dtype and trailing shape that shares no
    memory with ``value`` (copied unless validation already made a new array), or raise."""
    array, converted = _validated(name, value, spec, expected)
    if not snapshot:
        return array
    if array is value:  # the common case: the caller's own array, as it was
        return array.copy()
    if array is not converted or isinstance(value, (list, tuple)):
        return array  # cast by validation, or built from Python objects: already new memory
    if isinstance(value, np.ndarray) and not np.may_share_memory(array, value):
        return array  # np.asarray made a new array (e.g. "U" strings as objects)
    return array.copy()


def _validated(
    name: str, value: Any, spec: TensorInfo | None, expected: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(array, what np.asarray gave)``: the input as an array of the spec's dtype and trailing
    shape (a new array when a cast was needed), or raise."""
    if isinstance(value, (str, bytes)):
        raise TypeError(
            f"input {name!r}: expected a batch (one row per element), got a single "
            f"{type(value).__name__}; wrap it in a list. Expected signature: {expected}"
        )
    is_string = spec is not None and spec.dtype == STRING
    try:
        array = np.asarray(value, dtype=object if is_string else None)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(
            f"input {name!r}: rows must all have the same shape ({exc}). Expected signature: "
            f"{expected}"
        ) from None
    if array.ndim == 0:
        raise TypeError(
            f"input {name!r}: expected an array with a batch axis, got {type(value).__name__} "
            f"of shape (). Expected signature: {expected}"
        )
    if spec is None:
        if array.dtype == object:
            _check_strings(name, array, expected)
        return array, array
    if spec.shape is not None:
        if array.ndim != len(spec.shape):
            raise ValueError(
                f"input {name!r}: expected rank {len(spec.shape)} ({spec.describe()}), got "
                f"rank {array.ndim} with shape {array.shape}. Expected signature: {expected}"
            )
        for axis, (want, got) in enumerate(
            zip(spec.shape[1:], array.shape[1:], strict=True), start=1
        ):
            if want is not None and want != got:
                raise ValueError(
                    f"input {name!r}: expected shape {spec.describe()}, got {array.shape} "
                    f"(axis {axis} is {got}, not {want}). Expected signature: {expected}"
                )
    if is_string:
        if array.size and array.dtype.kind not in "OSU":
            raise TypeError(
                f"input {name!r}: expected str or bytes, got {array.dtype}. "
                f"Expected signature: {expected}"
            )
        _check_strings(name, array, expected)
        return array, array
    return _cast(name, array, spec, expected), array


_STRING_TYPES = {str, bytes, np.str_, np.bytes_}


def _check_strings(name: str, array: np.ndarray, expected: str) -> None:
    if array.dtype != object:  # NumPy "U"/"S" arrays hold strings by construction
        return
    if set(map(type, array.flat)) <= _STRING_TYPES:  # one pass in C; the common case
        return
    for item in array.flat:
        if not isinstance(item, (str, bytes)):
            raise TypeError(
                f"input {name!r}: expected str or bytes elements, got {type(item).__name__} "
                f"({item!r}). Expected signature: {expected}"
            )


def _cast(name: str, array: np.ndarray, spec: TensorInfo, expected: str) -> np.ndarray:
    return cast_values(name, array, spec.numpy_dtype, expected)


def cast_values(
    name: str, array: np.ndarray, want: np.dtype, expected: str = "", first_row: int = 0
) -> np.ndarray:
    """``array`` as ``want``: the one casting rule for every way inputs arrive (Python API,
    files, data frames, the server).

    A cast NumPy calls safe is done as is. Otherwise, values are checked rather than types:

    - integers into a narrower integer dtype (int64 -> int32, int -> uint8, ...) when every
      value is in the target's range;
    - integers into a float dtype when every value is exact there (magnitude at most 2**24
      for float32, 2**53 for float64, 2**11 for float16);
    - floats into a narrower float dtype (float64 -> float32), rounded to nearest as NumPy
      does, when no finite value becomes infinite (NaN and infinities pass as they are;
      ``check_finite`` is what refuses them).

    A value that does not fit raises ``ValueError`` naming it and its row (counted from
    ``first_row``); a dtype that never fits (text, float -> int, complex) raises ``TypeError``.
    """
    have = array.dtype
    if have == want:
        return array
    tail = f". Expected signature: {expected}" if expected else ""
    if have.kind in "OSU":
        raise TypeError(f"input {name!r}: expected {want.name}, got {have} values{tail}")
    if np.can_cast(have, want, casting="safe"):
        return array.astype(want)
    if have.kind in "iu" and want.kind in "iu":
        info, own = np.iinfo(want), np.iinfo(have)
        low, high = max(info.min, own.min), min(info.max, own.max)
        bad = (array < np.asarray(low, have)) | (array > np.asarray(high, have))
        rule = f"{want.name} values in [{info.min}, {info.max}]"
        cast = None
    elif have.kind in "iu" and want.kind == "f":
        limit = 2 ** (np.finfo(want).nmant + 1)
        bad = (array < -limit) | (array > limit) if have.kind == "i" else array > limit
        rule = (
            f"integers of magnitude at most 2**{np.finfo(want).nmant + 1}, which {want.name} "
            "holds exactly"
        )
        cast = None
    elif have.kind == "f" and want.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            cast = array.astype(want)
        bad = np.isinf(cast) & np.isfinite(array)
        rule = f"{want.name} values, at most {np.finfo(want).max:.8g} in magnitude"
    else:
        raise TypeError(
            f"input {name!r}: expected {want.name}, got {have}, which cannot be cast safely "
            f"to {want.name}{tail}"
        )
    if bad.any():
        per_row = bad.reshape(len(array), -1).any(axis=1) if array.ndim else bad.reshape(1)
        rows = np.flatnonzero(per_row)
        value = array[np.unravel_index(int(np.argmax(bad)), array.shape)].item()
        raise ValueError(
            f"input {name!r}: expected {rule}, got {value!r} ({have}) in row "
            f"{first_row + int(rows[0])} ({len(rows)} row(s) out of range){tail}"
        )
    return array.astype(want) if cast is None else cast


def prepare(
    x: Any, signature: SignatureInfo, check_finite: bool = False, snapshot: bool = True
) -> tuple[Inputs, int]:
    """Validate ``x`` against ``signature``; return ``({name: array}, rows)``, arrays that share
    no memory with ``x`` (``snapshot=False`` skips that copy: only for measuring what it costs,
    ``benchmarks/snapshot_cost.py``).

    With ``check_finite``, a NaN or infinity in a floating-point input is an error naming the
    first rows that hold one."""
    expected, specs = signature.expectations
    if isinstance(x, Mapping):
        given = {str(k): v for k, v in x.items()}
        if specs is not None and set(given) != set(specs):
            missing = sorted(set(specs) - set(given))
            extra = sorted(set(given) - set(specs))
            raise ValueError(
                f"input keys {sorted(given)} do not match the signature {expected}: "
                f"missing {missing}, unexpected {extra}"
            )
    elif specs is not None and len(specs) != 1:
        raise TypeError(
            f"the model has {len(specs)} inputs {expected}: pass a dict of arrays, "
            f"got {type(x).__name__}"
        )
    else:
        given = {next(iter(specs)) if specs is not None else DEFAULT_INPUT: x}
    if not given:
        raise ValueError(f"no inputs given; expected {expected}")
    arrays = {
        k: _as_array(k, v, specs[k] if specs is not None else None, expected, snapshot)
        for k, v in given.items()
    }
    rows = {k: a.shape[0] for k, a in arrays.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"all inputs must have the same number of rows, got {rows}")
    if check_finite:
        for name, array in arrays.items():
            if array.dtype.kind == "f" and array.size:
                finite = np.isfinite(array).reshape(len(array), -1).all(axis=1)
                if not finite.all():
                    bad = np.flatnonzero(~finite)
                    raise ValueError(
                        f"input {name!r}: expected finite values (check_finite=True), got NaN or "
                        f"infinity in {len(bad)} row(s), first rows {bad[:10].tolist()}"
                    )
    return arrays, next(iter(rows.values()))


def auto_shard_size(inputs: Inputs, rows: int, workers: int) -> int:
    """Rows per shard: about ``TARGET_SHARD_BYTES`` of input, yet enough shards for all workers."""
    if rows <= 1:
        return 1
    row_bytes = sum(_row_bytes(a) for a in inputs.values())
    by_bytes = max(1, TARGET_SHARD_BYTES // max(1, row_bytes))
    balanced = math.ceil(rows / (workers * SHARDS_PER_WORKER))
    return max(1, min(by_bytes, balanced, MAX_AUTO_SHARD_ROWS))


def _row_bytes(array: np.ndarray) -> int:
    if array.dtype == object:
        sample = array.reshape(-1)[:64]
        per_item = sum(len(s) for s in sample) / max(1, len(sample)) + 32
        return int(per_item * (array.size // max(1, array.shape[0])))
    return array.itemsize * (array.size // max(1, array.shape[0]))


def split(rows: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(rows)`` in order."""
    return [(start, min(start + shard_size, rows)) for start in range(0, rows, shard_size)]


def take(inputs: Inputs, start: int, stop: int) -> Inputs:
    return {k: a[start:stop] for k, a in inputs.items()}


def empty_outputs(signature: SignatureInfo) -> dict[str, np.ndarray] | None:
    """Outputs for 0 rows, from the signature; ``None`` when the output shapes are unknown."""
    if signature.outputs is None:
        return None
    out = {}
    for t in signature.outputs:
        if t.shape is None or len(t.shape) == 0:
            return None
        out[t.name] = np.empty((0, *[d or 0 for d in t.shape[1:]]), dtype=t.numpy_dtype)
    return out


def gather(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate shard outputs, in the order given, along the batch axis."""
    if len(parts) == 1:
        return dict(parts[0])
    names = list(parts[0])
    for name in names:
        if np.ndim(parts[0][name]) == 0:
            raise ValueError(
                f"output {name!r} is a scalar with no batch axis; it cannot be split into shards"
            )
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in names}


def unwrap(outputs: dict[str, np.ndarray], signature: SignatureInfo) -> Any:
    """A bare array for a single-output signature, else the dict, its keys in the signature's
    order (by name) on every call, whatever order the model returned them in."""
    if signature.single_output is not None:
        return outputs[signature.single_output]
    if signature.outputs is None and list(outputs) == [DEFAULT_OUTPUT]:
        return outputs[DEFAULT_OUTPUT]
    declared = [t.name for t in signature.outputs or () if t.name in outputs]
    return {name: outputs[name] for name in [*declared, *sorted(set(outputs) - set(declared))]}


def describe_model(model: object) -> str:
    """The model as errors name it: ``the model at PATH`` (or handle), or ``the factory
    module.name`` (``functools.partial(module.name)`` for a partial)."""
    if isinstance(model, str):
        return f"the model at {model}"
    func, partial = model, False
    while isinstance(func, functools.partial):
        func, partial = func.func, True
    name = getattr(func, "__qualname__", None) or type(func).__qualname__
    module = getattr(func, "__module__", None)
    label = f"{module}.{name}" if module else name
    return f"the factory functools.partial({label})" if partial else f"the factory {label}"


def wrong_rows_error(outputs: Mapping[str, Any], request: Any, model: str) -> WorkerError | None:
    """``WorkerError`` naming ``model`` and both counts when an output with a batch axis does
    not have one row per input row of ``request`` (a ``ShardRequest``); else ``None``. An
    output with no batch axis (0-d) cannot be checked and passes."""
    rows = request.stop - request.start
    for name, value in outputs.items():
        if np.ndim(value) > 0 and len(value) != rows:
            return WorkerError(
                f"rows {request.start}:{request.stop}: {model} returned {len(value)} rows of "
                f"output {name!r} for {rows} input rows; expected one output row per input row",
                error_type="OutputRowsMismatch",
            )
    return None
