"""pool: fast TensorFlow / TensorFlow Hub inference on CPU.

A :class:`PredictionPool` starts one worker process per core; each loads the model exactly
once. Calls are validated, split into shards, run on all cores and gathered in input order::

    caller: pool.predict(x) / pool.imap(batches) / pool.submit(x)
      │
      ▼  sharding.prepare      validate against the signature (NumPy only, in the caller)
      ▼  sharding.split        rows -> shards [(start, stop), ...]
      ▼  Dispatcher            manager thread: each shard -> least-loaded ready worker
      │     ├─▶ WorkerProcess 0 ──pipe──▶ worker.run_shard ─▶ model.LoadedModel (TensorFlow)
      │     └─▶ WorkerProcess 1 ──pipe──▶ worker.run_shard ─▶ model.LoadedModel (TensorFlow)
      ▲  one Future per shard; dead workers replaced, their shards re-run
      ▲  _combine + sharding.gather   concatenate shard outputs in input order
    caller: np.ndarray, or dict[str, np.ndarray] for several outputs

Modules: ``model`` (the only one importing TensorFlow), ``worker`` (inside worker processes),
``messages`` (what crosses the process boundary), ``sharding`` (validate, split, gather),
``dispatcher`` (scheduling, retries), ``process`` (one worker's executor), ``prediction_pool``
(lifecycle and public API), ``etl`` (a subpackage: data frames, file formats, staging, file
jobs; its docstring lists its modules), ``cli`` (the command line), ``reference_models`` (the
SavedModels used by tests, the demo and benchmarks).
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
