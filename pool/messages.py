"""The messages that cross the process boundary between the parent and a worker.

Every one is a small frozen dataclass of plain Python and NumPy values, so the protocol is
visible in the types and nothing here imports TensorFlow:

    parent ──WorkerConfig──▶ worker.main()              (the process's argument)
    parent ◀──WorkerReady─── (or LoadFailed)            (after the model loaded and warmed up)
    parent ──NewArena + fd─▶                            (shared memory for batches; optional)
    parent ──Batch─────────▶ worker.run_batch()         (one model call: one or more shards)
    parent ◀──BatchDone──── (or BatchFailed)
    parent ──None──────────▶                            (stop)

``ShardRequest``/``ShardResult`` describe one shard: what a backend is given and answers (the
Dask backend sends them as they are). ``ArenaRef`` is an array in the worker's shared arena
(:mod:`pool.transport`).
"""

from __future__ import annotations

import functools
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

    @functools.cached_property
    def expectations(self) -> tuple[str, dict[str, TensorInfo] | None]:
        """The inputs as error messages name them, and by name (computed once: every call's
        validation reads them)."""
        specs = {t.name: t for t in self.inputs} if self.inputs is not None else None
        return self.describe_inputs(), specs


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
    #: the runtime that runs the model (``pool.runtimes``); converted runtimes load ``artifact``
    runtime: str = "tensorflow"
    precision: str = "f32"
    artifact: str | None = None


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
    runtime: str = "tensorflow"


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


@dataclass(frozen=True)
class ArenaRef:
    """An array that lives in a worker's shared arena: where, and its shape and dtype."""

    offset: int
    shape: tuple[int, ...]
    dtype: str


#: An input or output of a batch: in the arena, or carried in the message itself.
Carried = ArenaRef | np.ndarray


@dataclass(frozen=True)
class LoadFailed:
    """A worker could not load the model: its exception and traceback, as text."""

    error: str


@dataclass(frozen=True)
class NewArena:
    """The next message on the socket is the descriptor of a new arena of ``size`` bytes."""

    size: int


@dataclass(frozen=True)
class Batch:
    """One model call: the rows of one or more shards, concatenated in order."""

    batch_id: int
    inputs: dict[str, Carried]
    #: ``[start, end)`` of the arena region the worker may write the outputs to, if any.
    out_region: tuple[int, int] | None


@dataclass(frozen=True)
class BatchDone:
    batch_id: int
    outputs: dict[str, Carried]
    busy_seconds: float


@dataclass(frozen=True)
class BatchFailed:
    """The model raised on a batch: its exception, as text, and the worker's traceback."""

    batch_id: int
    error: str
    traceback: str
    error_type: str


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
    #: ``"starting"``, ``"ready"``, ``"retiring"`` or ``"dead"`` (could not start or load the
    #: model: ``error`` says why; the position tries again with backoff).
    state: str = "ready"
    error: str | None = None
    #: Which model this worker serves: its generation (1 for the model the pool started with,
    #: +1 per :meth:`pool.PredictionPool.reload`) and the model as given (path, handle or the
    #: factory's dotted name). While a reload runs, ``stats()`` also lists the generation
    #: loading (``state="starting"``) or draining.
    generation: int = 1
    model: str | None = None
