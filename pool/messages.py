"""The messages that cross the process boundary between the parent and a worker.

Every one is a small frozen dataclass of plain Python and NumPy values, so the protocol is
visible in the types and nothing here imports TensorFlow:

    parent ──WorkerConfig──▶ worker.initialize()        (once, when the worker process starts)
    parent ◀──WorkerReady─── worker.describe()          (after the model loaded and warmed up)
    parent ──ShardRequest──▶ worker.run_shard()         (one per shard)
    parent ◀──ShardResult─── worker.run_shard()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

#: dtype name used for ``tf.string`` tensors (NumPy object arrays of ``bytes`` / ``str``).
STRING = "string"
#: Name given to the single, unnamed input of a model that declares no signature.
DEFAULT_INPUT = "input"
#: Name given to the single, unnamed output of a model that does not return a dict.
DEFAULT_OUTPUT = "output_0"


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of a signature: name, dtype name, and shape (``None`` = any size)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...] | None

    def describe(self) -> str:
        shape = (
            "?"
            if self.shape is None
            else "[" + ", ".join("None" if d is None else str(d) for d in self.shape) + "]"
        )
        return f"{self.name}: {self.dtype}{shape}"

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(object) if self.dtype == STRING else np.dtype(self.dtype)


@dataclass(frozen=True)
class SignatureInfo:
    """What the parent knows of the model's signature, sent by each worker once it has loaded.

    ``inputs``/``outputs`` are ``None`` when the model is a plain Python callable that declares
    no signature; the parent then checks only that rows line up.
    """

    inputs: tuple[TensorInfo, ...] | None
    outputs: tuple[TensorInfo, ...] | None
    #: name of the one output returned as a bare array; ``None`` means a dict is returned.
    single_output: str | None

    def describe_inputs(self) -> str:
        if self.inputs is None:
            return "(any: the model declares no input signature)"
        return "{" + ", ".join(t.describe() for t in self.inputs) + "}"


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs to load the model; built once by the parent."""

    model: str | Callable[[], Callable]
    signature: str
    output: str | None
    intra_op_threads: int
    inter_op_threads: int
    cpus: tuple[int, ...] | None
    warmup_rows: int
    parent_pid: int
    parent_create_time: float


@dataclass(frozen=True)
class WorkerReady:
    """A worker's answer once its model is loaded and warmed up."""

    pid: int
    load_seconds: float
    warmup_seconds: float
    loads: int
    intra_op_threads: int
    inter_op_threads: int
    cpus: tuple[int, ...] | None
    signature: SignatureInfo


@dataclass(frozen=True)
class ShardRequest:
    """Rows ``start:stop`` of one call, as a dict of input name to array."""

    start: int
    stop: int
    inputs: dict[str, np.ndarray]


@dataclass(frozen=True)
class ShardResult:
    """The model's outputs for one shard and the time the worker spent computing them."""

    outputs: dict[str, np.ndarray]
    busy_seconds: float
    pid: int


@dataclass
class WorkerStats:
    """One worker's record in :meth:`pool.PredictionPool.stats` (units in the names)."""

    worker: int
    pid: int
    load_seconds: float
    loads: int
    shards: int = 0
    batches: int = 0  # model calls: combined shards count once
    rows: int = 0
    busy_seconds: float = 0.0
    rss_bytes: int = 0
    restarts: int = 0
    retries: int = 0
    cpus: tuple[int, ...] | None = field(default=None)
