"""Dask DataFrames through a pool on the same cluster: :func:`map_partitions`.

::

    ddf ──map_partitions(ddf, pool, columns=..., output_column=...)──▶ lazy ddf + prediction columns
          meta: the input's empty frame + one empty column per output, from pool.signature
          (nothing is called in the client, so TensorFlow never loads there)

    on compute, one Dask task per partition, on a worker of the pool's cluster:
      predict_partition: pool.etl.to_inputs ─▶ the worker's loaded model, shard_size rows at
                         a time ─▶ pool.etl.with_predictions

The partitions never travel through the client: they are read, predicted and written where
Dask runs them, with the model the pool loaded once in each worker.
"""

from __future__ import annotations

from typing import Any

from distributed import get_worker

from .. import sharding
from ..errors import PoolClosedError
from ..etl.frames import output_columns, output_names, to_inputs, with_predictions
from ..messages import ShardRequest, SignatureInfo
from .backend import DaskBackend
from .plugin import loaded_plugin

#: Rows per model call inside a partition when neither ``shard_size=`` nor the pool says.
DEFAULT_SHARD_ROWS = 256


def map_partitions(
    ddf: Any,
    pool: Any,
    *,
    columns: Any = None,
    output_column: Any = None,
    shard_size: int | None = None,
    meta: Any = None,
) -> Any:
    """A Dask DataFrame: ``ddf`` with one new column per model output, computed lazily.

    ``pool`` is a running :class:`pool.PredictionPool` on the cluster that will compute the
    result (``cluster=``); it must stay running until the result is computed. ``columns`` and
    ``output_column`` mean what they mean for :func:`pool.etl.map_batches`. Each partition is
    predicted ``shard_size`` rows at a time (default: the pool's ``shard_size``, else 256) by
    the model the pool loaded in that worker. ``meta`` is derived from ``pool.signature``;
    pass it only for a model that declares no outputs (a plain Python callable).
    """
    backend = _backend_of(pool)
    signature = pool.signature
    names = output_names(signature)
    if names is None and meta is None:
        raise TypeError(
            "the model declares no output signature, so the output columns cannot be derived "
            "without calling it: pass meta= (an empty pandas DataFrame of the result)"
        )
    # sorted by output name, as pool.etl.map_batches orders the new columns
    mapping = (
        None if names is None else output_columns(sorted(names), output_column, list(ddf.columns))
    )
    if meta is None:
        meta = _meta(ddf, signature, mapping)
    size = shard_size or pool.shard_size or DEFAULT_SHARD_ROWS
    return ddf.map_partitions(
        predict_partition,
        plugin_name=backend.name,
        signature=signature,
        columns=columns,
        mapping=mapping,
        output_column=output_column,
        shard_size=size,
        meta=meta,
    )


def _backend_of(pool: Any) -> DaskBackend:
    try:
        backend = pool.backend
    except (AttributeError, PoolClosedError):  # not a PredictionPool, or not running
        backend = None
    if not isinstance(backend, DaskBackend):
        raise TypeError(
            "map_partitions needs a running PredictionPool on a Dask cluster "
            "(PredictionPool(model, cluster=client)), got a pool that is local or not running"
        )
    return backend


def _meta(ddf: Any, signature: SignatureInfo, mapping: dict[str, str] | None) -> Any:
    from dask.dataframe.utils import make_meta

    empty = sharding.empty_outputs(signature)
    if empty is None or mapping is None:
        raise TypeError(
            "the model's output shapes are not fully declared, so the output columns cannot be "
            "derived without calling it: pass meta= (an empty pandas DataFrame of the result)"
        )
    return with_predictions(make_meta(ddf), {mapping[n]: empty[n] for n in mapping})


def predict_partition(
    frame: Any,
    *,
    plugin_name: str,
    signature: SignatureInfo,
    columns: Any,
    mapping: dict[str, str] | None,
    output_column: Any,
    shard_size: int,
) -> Any:
    """One partition, on a Dask worker: ``frame`` with its predictions as new columns."""
    from ..worker import call_model

    try:
        worker = get_worker()
    except ValueError:
        raise RuntimeError(
            "map_partitions' result must be computed on the pool's Dask cluster, not with "
            "another scheduler"
        ) from None
    plugin = loaded_plugin(plugin_name, worker)
    model = plugin.model()
    name = sharding.describe_model(plugin.config.model)
    arrays = to_inputs(frame, signature, columns)
    rows = len(frame)
    parts = []
    for start, stop in sharding.split(rows, shard_size):
        request = ShardRequest(start, stop, sharding.take(arrays, start, stop))
        result = call_model(model, request, name)
        plugin.count(request, result.busy_seconds)
        parts.append(result.outputs)
    if parts:
        outputs = sharding.gather(parts)
    else:
        outputs = sharding.empty_outputs(signature) or {}
    if mapping is None:
        mapping = output_columns(sorted(outputs), output_column, list(frame.columns))
    return with_predictions(frame, {mapping[name]: outputs[name] for name in mapping})
