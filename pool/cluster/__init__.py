"""The same :class:`pool.PredictionPool` on a Dask cluster: ``PredictionPool(model, cluster=X)``.

``X`` is a ``distributed.Client``, a scheduler address (``"tcp://10.0.0.5:8786"``) or a cluster
object (``LocalCluster``, ``KubeCluster``, ``SLURMCluster``, ...). ``dask`` and ``distributed``
are the optional ``dask`` extra (``pip install 'prediction-pool[dask]'``); ``import pool`` never
imports this package, ``PredictionPool`` imports it only when ``cluster=`` is given::

    caller: pool.predict / submit / imap / pool.etl.map_batches        (client process)
      ▼  sharding.prepare, split           validated in the client, before anything is sent
      ▼  backend.DaskBackend.submit        shards in parcels (one per worker, at most
      │                                    max_batch_rows rows): Client.scatter(direct=True)
      │                                    straight into the workers' memory, then one small
      │                                    task per parcel (the scheduler sees keys and sizes)
      ▼  Dask workers                      plugin.ModelPlugin: the model loaded once per worker
      │                                    (in a thread; again after a Nanny restart; a
      │                                    converted runtime's artifact carried in the plugin)
      │                                    plugin.ShardBatcher: the shards waiting on a worker
      │                                    combined into model calls (pool.batching.BatchQueue)
      ▲  backend gatherer thread           Client.gather(direct=True) from the workers; lost
      │                                    copies sent again (suspects), timeouts, errors
      ▲  sharding.gather                   in input order
    caller: np.ndarray, or dict[str, np.ndarray]

    dask DataFrame ──frames.map_partitions──▶ dask DataFrame with prediction columns
                   (each partition runs as a Dask task on the worker's loaded model)

    predict_file(..., cluster=X) ──files.run──▶ one task per partition of the input file:
                   the worker reads it, predicts, writes its part into .OUT.partial/; the
                   client renames the assembled output (it never holds a row)

Modules: ``plugin`` (runs on the workers), ``backend`` (the client side), ``frames``
(Dask DataFrames), ``files`` (file jobs). See docs/scale-out.md.
"""

from __future__ import annotations

try:
    import distributed  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "PredictionPool(cluster=...) needs Dask distributed: pip install 'prediction-pool[dask]'"
    ) from exc

from .backend import DaskBackend, connect
from .frames import map_partitions
from .plugin import ModelPlugin, ShardTimedOut

__all__ = ["DaskBackend", "ModelPlugin", "ShardTimedOut", "connect", "map_partitions"]
