"""The plain Dask idiom that ``benchmarks/cluster.py`` compares PredictionPool against.

What a Dask user writes without the pool (as in Dask's machine-learning docs): a
``WorkerPlugin`` whose ``setup`` loads the model, and ``client.map`` of a predict function
over the shards, then ``client.gather``. TensorFlow runs with its default thread pools, the
model loads on the worker's event loop, and nothing re-runs a shard Dask gave up on.
Dask workers import this module by name; it imports TensorFlow only inside the workers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

PLUGIN = "benchmark-model"


class LoadModel(WorkerPlugin):
    """Load a SavedModel's serving signature once per Dask worker, in ``setup``."""

    def __init__(self, path: str, signature: str = "serving_default") -> None:
        self.path = path
        self.signature = signature

    def setup(self, worker: Any) -> None:
        import tensorflow_hub as hub

        self.loaded = hub.load(self.path)  # keeps the variables alive
        self.model = self.loaded.signatures[self.signature]


def predict_shard(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One shard on a worker: ``{output name: array}``."""
    import tensorflow as tf

    model = get_worker().plugins[PLUGIN].model
    outputs = model(**{name: tf.constant(value) for name, value in inputs.items()})
    return {name: value.numpy() for name, value in outputs.items()}
