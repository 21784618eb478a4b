"""The seam between :class:`pool.PredictionPool` and the workers that answer its shards.

``PredictionPool`` validates, shards, gathers and streams; a *backend* owns the workers::

    PredictionPool ──ShardRequest──▶ Backend.submit ──▶ Future[{output name: array}]

Two backends exist: :class:`pool.local.LocalBackend` (worker processes on this machine, the
default) and ``pool.cluster.DaskBackend`` (workers of a Dask cluster, ``cluster=``: shards
scattered straight to the workers, never through the scheduler, and combined there by the same
:class:`pool.batching.BatchQueue`). Both take the same validated :class:`Settings`. This
module imports neither of them, nor TensorFlow.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .errors import ModelLoadError
from .messages import ShardRequest, WorkerConfig, WorkerReady, WorkerStats
from .savedmodel_pb import check_signature

#: What ``PredictionPool(model)`` accepts: a SavedModel directory, a TF Hub handle, or a
#: top-level factory callable.
ModelRef = str | Callable[[], Callable]


@dataclass(frozen=True)
class Limits:
    """Reliability options, validated once by the pool."""

    max_retries: int = 2
    timeout: float | None = None
    max_worker_memory: int | None = None
    max_shards_per_worker: int | None = None


@dataclass(frozen=True)
class Batching:
    """How waiting shards are combined into model calls (see :mod:`pool.dispatcher`)."""

    max_batch_rows: int = 256
    max_batch_bytes: int = 4 << 20
    batch_timeout_micros: int = 0
    max_queued_requests: int | None = None


@dataclass(frozen=True)
class Settings:
    """Every option of a pool, validated once in ``PredictionPool.__init__``."""

    model: ModelRef
    workers: int
    signature: str
    output: str | None
    threads_per_worker: int
    inter_op_threads: int
    pin_cpus: bool
    allowed_cpus: tuple[int, ...] | None
    shard_size: int | None
    start_method: str | None
    start_timeout: float | None
    limits: Limits
    batching: Batching
    #: ``pool.runtimes``: what runs the model (resolved in the parent before workers start)
    runtime: str = "tensorflow"
    precision: str = "f32"
    runtime_tolerance: float | None = None
    runtime_sample: Any = field(default=None, compare=False)

    def worker_config(
        self, model: ModelRef, parent_pid: int, parent_create_time: float
    ) -> WorkerConfig:
        """The message each worker loads its model from (CPUs are filled in per worker)."""
        return WorkerConfig(
            model=model,
            signature=self.signature,
            output=self.output,
            intra_op_threads=self.threads_per_worker,
            inter_op_threads=self.inter_op_threads,
            cpus=None,
            warmup_rows=self.shard_size or 1,
            parent_pid=parent_pid,
            parent_create_time=parent_create_time,
        )


def model_name(model: ModelRef) -> str:
    """The model as ``stats()`` names it: the path or handle as given, or the factory's dotted
    name (``functools.partial(module.name)`` for a partial)."""
    if isinstance(model, str):
        return model
    func, partial = model, False
    while isinstance(func, functools.partial):
        func, partial = func.func, True
    name = getattr(func, "__qualname__", None) or type(func).__qualname__
    module = getattr(func, "__module__", None)
    label = f"{module}.{name}" if module else name
    return f"functools.partial({label})" if partial else label


def local_model_path(
    model: ModelRef, signature: str = "serving_default", output: str | None = None
) -> ModelRef:
    """An absolute SavedModel directory, a factory as given, or a remote handle as given.

    A string that is neither a URL-like handle nor an existing directory fails here, in the
    caller, before any worker starts; so does a signature or output that ``saved_model.pb``
    shows the model does not have."""
    if not isinstance(model, str) or "://" in model:
        return model
    if not os.path.isdir(model):
        raise ModelLoadError(
            f"expected a SavedModel directory or a TF Hub handle, got {model!r}: no such directory"
        )
    check_signature(model, signature, output)
    return os.path.abspath(model)


class Backend(Protocol):
    """The workers behind a pool. Methods may be called from any thread once started."""

    def start(self) -> list[WorkerReady]:
        """Start every worker, load the model once in each; one record per worker."""
        ...

    def submit(
        self,
        requests: list[ShardRequest],
        bounded: bool = True,
        finish: Callable[[dict[str, np.ndarray]], Any] | None = None,
    ) -> list[Future]:
        """Queue the shards of one call, in order; each future resolves to ``{output name:
        array}`` for its rows, or to ``finish(outputs)`` when ``finish`` is given (the pool
        passes it for one-shard calls, so their future is the caller's, with no second one).
        When ``bounded``, raises :class:`pool.QueueFullError` at once, queueing nothing, if
        ``max_queued_requests`` calls are already waiting (``imap``, which bounds itself,
        passes ``bounded=False``: it is counted, never refused)."""
        ...

    def stats(self) -> list[WorkerStats]:
        """One record per worker (a snapshot)."""
        ...

    def worker_pids(self) -> list[int]:
        """Pids of the live worker processes (on this machine, or as the cluster reports)."""
        ...

    def queued_requests(self) -> int:
        """Calls with at least one shard waiting to be dispatched."""
        ...

    def shutdown(self, kill: bool) -> None:
        """Stop: after queued shards are answered, or at once with ``kill``."""
        ...


def positive(name: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value
