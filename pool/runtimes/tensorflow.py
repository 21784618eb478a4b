"""The TensorFlow runtime: the SavedModel itself, through :mod:`pool.model`.

This is what ``runtime="tensorflow"`` (the default) runs; the worker takes this path through
``pool.worker.load_model`` (which also sizes TensorFlow's thread pools before importing it).
"""

from __future__ import annotations

import os

from ..messages import WorkerConfig


def load(config: WorkerConfig):  # type: ignore[no-untyped-def]
    """Import TensorFlow (after sizing its thread pools) and load the SavedModel."""
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(config.intra_op_threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = str(config.inter_op_threads)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from .. import model as model_module

    model_module.configure_threads(config.intra_op_threads, config.inter_op_threads)
    return model_module.load(config.model, config.signature, config.output)
