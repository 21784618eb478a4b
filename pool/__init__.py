"""pool: fast TensorFlow / TensorFlow Hub inference on CPU.

A :class:`PredictionPool` starts one worker process per core; each loads the model exactly
once. Calls are validated, split into shards, combined with other callers' waiting shards into
model calls, run on all cores and gathered in input order::

    caller: pool.predict(x) / pool.imap(batches) / pool.imap_unordered(batches) / pool.submit(x)
            / await pool.apredict(x) (asyncio: the call is cancelled with the awaiting task)
      │
      ▼  sharding.prepare      validate against the signature (NumPy only, in the caller);
      │                        the arrays are a snapshot: the caller may reuse its buffers
      ▼  sharding.split        rows -> shards [(start, stop), ...], one Future each
      ▼  batching.BatchQueue   waiting shards, oldest first; bounded by max_queued_requests
      ▼  dispatcher            one thread: a worker with room takes a batch of waiting shards
      │     ├─▶ worker 0 ──socket + shared arena──▶ worker.run_batch ─▶ model.LoadedModel (TF)
      │     └─▶ worker 1 ──socket + shared arena──▶ worker.run_batch ─▶ model.LoadedModel (TF)
      │         (runtime="openvino"/"onnxruntime"/"auto": runtimes.<name> on an artifact that
      │          runtimes.resolve converted, verified and cached before the workers started)
      ▲  outputs split back to each shard; dead workers replaced, their shards re-run
      ▲  _combine + sharding.gather   concatenate a call's shards in input order
    caller: np.ndarray, or dict[str, np.ndarray] for several outputs

Core modules: ``model`` (the only one importing TensorFlow), ``worker`` (inside worker
processes), ``messages`` (what crosses the process boundary), ``transport`` (socket framing
and the shared arena), ``sharding`` (validate, split, gather), ``batching`` (the queue and what
combines), ``futures`` (callers' callbacks run on a callback thread, never on the
dispatcher), ``dispatcher`` (scheduling, retries), ``process`` (one worker process),
``backend`` (the pool/workers seam and the validated settings), ``savedmodel_pb`` (a local
SavedModel's signatures from ``saved_model.pb``, without TensorFlow), ``local`` (the local
backend), ``prediction_pool`` (lifecycle and public API; ``reload(model)`` swaps the model by
starting a new generation of workers, moving traffic once all are ready, then draining and
stopping the old one), ``runtimes`` (``runtime=``: OpenVINO
/ ONNX Runtime / ``auto`` behind one interface; conversion in a subprocess, a verified cache;
workers of a converted model run ``runtimes.<name>`` instead of ``model.LoadedModel`` and never
import TensorFlow). Edges, never imported by the core: ``etl``
(data frames, file formats, staging, file jobs), ``cli`` (the command line), ``serve`` (the
TF Serving-compatible server: REST and gRPC, model versions and several models), ``cluster``
(the Dask backend: shards scattered straight to the workers, batching on them, file jobs
whose workers read and write the files). ``reference_models``
builds the SavedModels used by tests, the demo and benchmarks.
See docs/design.md for the longer story.
"""

from __future__ import annotations

import logging

from .errors import (
    ModelLoadError,
    PoolClosedError,
    PoolError,
    QueueFullError,
    WorkerCrashedError,
    WorkerError,
)
from .messages import SignatureInfo, TensorInfo, WorkerReady, WorkerStats
from .prediction_pool import PredictionPool

logging.getLogger("pool").addHandler(logging.NullHandler())

__all__ = [
    "ModelLoadError",
    "PoolClosedError",
    "PoolError",
    "PredictionPool",
    "QueueFullError",
    "SignatureInfo",
    "TensorInfo",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerReady",
    "WorkerStats",
]
try:  # one source: pyproject.toml's version, read back from the installed package's metadata
    from importlib.metadata import version as _distribution_version

    __version__ = _distribution_version("prediction-pool")
except ImportError:  # PackageNotFoundError: a source checkout that was never installed
    __version__ = "0+unknown"
