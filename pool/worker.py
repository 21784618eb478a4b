"""The worker side: code that runs inside each worker process.

``main`` is the process's entry point. It ignores SIGINT (the parent owns Ctrl-C), watches for
the parent's death, then :func:`load_model` pins the process to its CPUs, sizes TensorFlow's
thread pools, imports :mod:`pool.model` (and so TensorFlow), loads the model exactly once and
warms it up (a converted model, ``runtime=``, loads through :mod:`pool.runtimes` instead, with
no TensorFlow). It reports ``WorkerReady`` (or ``LoadFailed`` with the real reason) and then
answers one ``Batch`` after another until the parent sends ``None`` or goes away::

    recv Batch ──▶ inputs: views of the arena (no copy), or arrays carried in the message
               ──▶ model(inputs)  (one call for every shard of the batch)
               ──▶ outputs: copied into the batch's arena region if they fit, else carried
    send BatchDone / BatchFailed

This module imports no TensorFlow at import time: the parent imports it to name ``main``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import psutil

from . import sharding, transport
from .errors import WorkerError
from .messages import (
    ArenaRef,
    Batch,
    BatchDone,
    BatchFailed,
    LoadFailed,
    NewArena,
    ShardRequest,
    ShardResult,
    WorkerConfig,
    WorkerReady,
)

#: How often a worker checks that its parent is still alive, in seconds.
PARENT_POLL_SECONDS = 0.5

#: Set to ``1`` in the environment of the process that starts the pool (``python -m pool
#: predict -v`` sets it) to see TensorFlow's C++ start-up lines from workers and the fork server.
TF_LOGS_VARIABLE = "POOL_TF_LOGS"

#: TensorFlow's C++ start-up lines that say nothing to a CPU user: absl's banner for lines
#: logged before TensorFlow reads ``TF_CPP_MIN_LOG_LEVEL``, info/warning lines in absl's format
#: (``I0000 00:00:...``, oneDNN, the CUDA stub loader, CPU features), and the CUDA probe's
#: ``failed call to cuInit`` error on a machine without a GPU driver.
_TF_NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]"
    rb"|E\d{4} \d\d:\d\d:\d+\.\d+ +\d+ cuda_\w+\.cc:\d+\].*(cuInit|CUDA)"
    rb"|To enable the following instructions: .* rebuild TensorFlow)"
)


def tensorflow_logs_wanted() -> bool:
    """Whether the user asked for TensorFlow's C++ start-up lines (``POOL_TF_LOGS=1``)."""
    return os.environ.get(TF_LOGS_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def tensorflow_start_quietly() -> Any:
    """Hold back TensorFlow's C++ start-up lines written to fd 2 inside the block.

    Some are written by absl before TensorFlow reads ``TF_CPP_MIN_LOG_LEVEL``, so only the
    file descriptor can hold them back. Used around ``import tensorflow`` and the runtime's
    start in worker processes and the fork server only (never in the user's process), so real
    errors later still show. Everything written meanwhile is written back afterwards except
    the lines of :data:`_TF_NOISE`; if the block raises, everything is written back. No-op with
    ``POOL_TF_LOGS=1``."""
    if tensorflow_logs_wanted():
        yield
        return
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().splitlines(keepends=True)
            kept = lines if failed else [line for line in lines if not _TF_NOISE.match(line)]
            if kept:
                os.write(2, b"".join(kept))


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
    if config.runtime != "tensorflow":  # a converted model: TensorFlow is never imported
        from . import runtimes

        def load() -> Any:
            return runtimes.load(config)

        intra, inter = config.intra_op_threads, 1
    else:
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(config.intra_op_threads)
        os.environ["TF_NUM_INTEROP_THREADS"] = str(config.inter_op_threads)
        if not tensorflow_logs_wanted():
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with tensorflow_start_quietly():
            from . import model as model_module  # imports TensorFlow, after pinning

            intra, inter = model_module.configure_threads(
                config.intra_op_threads, config.inter_op_threads
            )
            model_module.start_runtime()  # probes for CUDA: a line on fd 2 on a CPU-only machine

        def load() -> Any:
            return model_module.load(config.model, config.signature, config.output)

    started = time.perf_counter()
    model = load()
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
        runtime=config.runtime,
    )
    return model, ready


def one_line(exc: BaseException) -> str:
    """``"Type: message"`` on one line: TensorFlow's messages span several lines ("Graph
    execution error:", the node, the assertion); the full text stays in the traceback."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def call_model(model: Any, request: ShardRequest, name: str = "the model") -> ShardResult:
    """Call the model on one shard; a model failure, or outputs without one row per input row,
    become a ``WorkerError`` naming the rows (and the model, as ``name``)."""
    started = time.perf_counter()
    try:
        outputs = model(request.inputs)
    except Exception as exc:
        raise WorkerError(
            f"rows {request.start}:{request.stop}: the model raised {one_line(exc)}",
            traceback.format_exc(),
            type(exc).__name__,
        ) from None
    wrong = sharding.wrong_rows_error(outputs, request, name)
    if wrong is not None:
        raise wrong
    return ShardResult(outputs=outputs, busy_seconds=time.perf_counter() - started, pid=os.getpid())


def run_batch(model: Any, batch: Batch, arena: transport.Arena | None) -> BatchDone | BatchFailed:
    """Call the model once on a batch; put the outputs in the arena where they fit."""
    inputs = {
        name: arena.view(value) if isinstance(value, ArenaRef) and arena else value
        for name, value in batch.inputs.items()
    }
    started = time.perf_counter()
    try:
        outputs = model(inputs)
    except Exception as exc:
        return BatchFailed(
            batch.batch_id,
            one_line(exc),
            traceback.format_exc(),
            type(exc).__name__,
        )
    busy = time.perf_counter() - started
    del inputs
    carried: dict[str, Any] = {}
    start, end = batch.out_region if batch.out_region and arena else (0, 0)
    for name, value in outputs.items():
        value = np.asarray(value)
        placed = None
        if end and value.dtype != object and value.ndim > 0 and value.flags.c_contiguous:
            placed = arena.put([value], start, end) if arena else None
        if placed is None:
            carried[name] = value
        else:
            carried[name], start = placed
    return BatchDone(batch.batch_id, carried, busy)


def main(config: WorkerConfig, conn: Connection) -> None:
    """The worker process: load once, then answer batches until told to stop."""
    # The parent owns the workers' lives: Ctrl-C (SIGINT) and a SIGTERM sent to the whole
    # process group (systemd's stop, ``timeout``) reach the parent, which drains and then
    # stops its workers itself; the pool kills a worker with SIGKILL.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(
        target=_watch_parent,
        args=(config.parent_pid, config.parent_create_time),
        name="pool-parent-watch",
        daemon=True,
    ).start()
    try:
        model, ready = load_model(config)
    except BaseException as exc:
        transport.send(conn, LoadFailed(f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}"))
        return
    transport.send(conn, ready)
    arena: transport.Arena | None = None
    while True:
        try:
            message = transport.recv(conn)
        except (EOFError, OSError):  # the parent is gone
            return
        if message is None:
            return
        if isinstance(message, NewArena):
            if arena is not None:
                arena.close()
            arena = transport.receive_arena(conn, message)
            continue
        transport.send(conn, run_batch(model, message, arena))
