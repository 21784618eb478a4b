"""The worker side: code that runs inside each worker process.

``initialize`` is the executor's initializer. It runs once per process, before any task:
it ignores SIGINT (the parent owns Ctrl-C), watches for the parent's death, pins the process to
its CPUs, sizes TensorFlow's thread pools, then imports :mod:`pool.model` (and so TensorFlow),
loads the model exactly once and warms it up. A failure is kept and re-raised by ``describe``,
so the parent sees the real reason instead of a bare ``BrokenProcessPool``.

This module imports no TensorFlow at import time: the parent imports it to name these functions.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import psutil

from .errors import ModelLoadError, WorkerError
from .messages import ShardRequest, ShardResult, WorkerConfig, WorkerReady

#: How often a worker checks that its parent is still alive, in seconds.
PARENT_POLL_SECONDS = 0.5


@dataclass
class _State:
    model: object = None
    ready: WorkerReady | None = None
    error: str | None = None
    loads: int = 0


_STATE = _State()


def _watch_parent(pid: int, create_time: float) -> None:
    """Exit this worker when the parent process is gone (e.g. killed with SIGKILL)."""
    while True:
        time.sleep(PARENT_POLL_SECONDS)
        try:
            parent = psutil.Process(pid)
            # A killed parent that nobody has reaped yet is a zombie: gone all the same.
            alive = parent.create_time() == create_time and parent.status() != "zombie"
        except psutil.NoSuchProcess:
            alive = False
        if not alive:
            os._exit(1)


def load_model(config: WorkerConfig, loads: int = 1) -> tuple[Any, WorkerReady]:
    """Pin this process to ``config.cpus``, size TensorFlow's thread pools, import TensorFlow,
    load the model and warm it up. Returns the loaded model and the report for the parent.

    Shared by the local worker processes and the Dask worker plugin; raises on failure."""
    if config.cpus is not None:
        psutil.Process().cpu_affinity(list(config.cpus))
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(config.intra_op_threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = str(config.inter_op_threads)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from . import model as model_module  # imports TensorFlow, after pinning

    intra, inter = model_module.configure_threads(config.intra_op_threads, config.inter_op_threads)
    started = time.perf_counter()
    model = model_module.load(config.model, config.signature, config.output)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    warmup = model.warmup_inputs(config.warmup_rows)
    if warmup is not None:
        model(warmup)
    ready = WorkerReady(
        pid=os.getpid(),
        load_seconds=load_seconds,
        warmup_seconds=time.perf_counter() - started,
        loads=loads,
        intra_op_threads=intra,
        inter_op_threads=inter,
        cpus=config.cpus,
        signature=model.signature,
    )
    return model, ready


def call_model(model: Any, request: ShardRequest) -> ShardResult:
    """Call the model on one shard; a model failure becomes a ``WorkerError`` naming the rows."""
    started = time.perf_counter()
    try:
        outputs = model(request.inputs)
    except Exception as exc:
        raise WorkerError(
            f"rows {request.start}:{request.stop}: the model raised {type(exc).__name__}: {exc}",
            traceback.format_exc(),
        ) from None
    return ShardResult(outputs=outputs, busy_seconds=time.perf_counter() - started, pid=os.getpid())


def initialize(config: WorkerConfig) -> None:
    """Executor initializer: load the model once in this process. Never raises."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(
        target=_watch_parent,
        args=(config.parent_pid, config.parent_create_time),
        name="pool-parent-watch",
        daemon=True,
    ).start()
    try:
        _STATE.loads += 1
        _STATE.model, _STATE.ready = load_model(config, _STATE.loads)
    except BaseException as exc:  # kept and re-raised by describe()
        _STATE.error = f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}"


def describe() -> WorkerReady:
    """First task of every worker: report the loaded model, or the reason it did not load."""
    if _STATE.ready is None:
        raise ModelLoadError(
            f"worker {os.getpid()} could not load the model: {_STATE.error or 'unknown reason'}"
        )
    return _STATE.ready


def run_shard(request: ShardRequest) -> ShardResult:
    """Call the model on one shard."""
    if _STATE.model is None:
        describe()
    return call_model(_STATE.model, request)
