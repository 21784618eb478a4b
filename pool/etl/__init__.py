"""Data frames, Arrow and files through the pool: the ETL edge of the package.

pandas, pyarrow and tqdm are the optional ``etl`` extra (``pip install 'pool[etl]'``). This package
imports them only inside the functions that use them, so ``import pool`` works without them.

Submodules: ``frames`` (pandas/Arrow <-> NumPy, output columns, ``map_batches``), ``progress``
(the tqdm bar), ``savedmodel_pb`` (the model's signature from ``saved_model.pb``, without
TensorFlow), ``formats`` (Parquet/CSV/.npy sources and sinks, column type checks), ``staging``
(the ``.OUT.partial/`` directory: lock, manifest, commit, atomic assembly), ``files`` (one
:func:`predict_file` job) and ``_common`` (``EtlError``, optional imports, shared helpers).

In memory (``PredictionPool.predict(frame, columns=...)`` and ``PredictionPool.map_batches``)::

    DataFrame / Series / RecordBatch / Table / Arrow array
      ▼ to_inputs             columns -> {model input: ndarray}, each checked against its input
      ▼ PredictionPool.imap   at most max_in_flight shards ahead, results in input order
      ▼ with_predictions      one new column per output (vectors: list / fixed-size-list column)
    each batch, with its predictions, in input order

A file job (:func:`predict_file` and ``python -m pool predict``)::

    files.predict_file        check arguments; peek_signature checks columns before any worker
      ▼ formats._*Source      Parquet row groups / CSV blocks / .npy memory map, a batch at a time
      ▼ files._pieces         <= shard_size rows each, never across a chunk boundary
      ▼ PredictionPool.imap   (files._Job._stream)
      ▼ chunk_rows output rows ──staging.commit──▶ .OUT.partial/part-000007-65536.parquet
      ▼ every chunk committed ──formats._*Sink.assemble──▶ .OUT.partial/.tmp-output
      ▼ os.replace ──▶ OUT    (see :mod:`pool.etl.staging` for commit and resume)
"""

from ._common import Columns, EtlError, OutputColumns
from .files import (
    MANIFEST_VERSION,
    MAX_CHUNK_ROWS,
    SAMPLE_ROWS,
    TARGET_CHUNK_BYTES,
    FileReport,
    predict_file,
)
from .formats import FORMATS
from .formats import _ParquetSink as _ParquetSink  # for tests, as before the split
from .frames import (
    arrow_column,
    is_table,
    map_batches,
    output_columns,
    resolve_columns,
    to_inputs,
    with_predictions,
)
from .progress import _NoBar as _NoBar  # for tests, as before the split
from .progress import progress_bar
from .savedmodel_pb import peek_signature

__all__ = [
    "FORMATS",
    "MANIFEST_VERSION",
    "MAX_CHUNK_ROWS",
    "SAMPLE_ROWS",
    "TARGET_CHUNK_BYTES",
    "Columns",
    "EtlError",
    "FileReport",
    "OutputColumns",
    "arrow_column",
    "is_table",
    "map_batches",
    "output_columns",
    "peek_signature",
    "predict_file",
    "progress_bar",
    "resolve_columns",
    "to_inputs",
    "with_predictions",
]
