"""Data frames, Arrow and files through the pool: the ETL edge of the package.

The core (:class:`pool.PredictionPool`) takes NumPy arrays and never imports this package; this
edge adapts tables to arrays and calls the core. pandas, pyarrow and tqdm are the optional
``etl`` extra (``pip install 'prediction-pool[etl]'``), imported only inside the functions that
use them, so ``import pool.etl`` works without them.

Modules: ``frames`` (pandas/Arrow <-> NumPy, :func:`predict`, :func:`submit`,
:func:`map_batches`, output columns), ``progress`` (the tqdm bar), ``savedmodel_pb`` (re-exports
the core's reader of ``saved_model.pb``), ``formats`` (Parquet/CSV/.npy sources
and sinks, column type checks), ``staging`` (the ``.OUT.partial/`` directory: lock, manifest,
commit, atomic assembly), ``files`` (one :func:`predict_file` job) and ``common`` (``EtlError``,
optional imports, what the others share). Each offers the others public names only.

In memory (:func:`predict`, :func:`submit`, :func:`map_batches`; any :class:`Predictor`)::

    DataFrame / Series / RecordBatch / Table / Arrow array
      ▼ to_inputs             columns -> {model input: ndarray}, each checked against its input
      ▼ pool.submit / imap    NumPy only; at most max_in_flight shards ahead, in input order
      ▼ with_predictions      one new column per output (vectors: list / fixed-size-list column;
                              [N, 1]: a number column; UTF-8 bytes: text)
    each batch, with its predictions, in input order

A file job (:func:`predict_file` and ``python -m pool predict``)::

    files.predict_file        check arguments; peek_signature checks columns before any worker
      ▼ formats.open_source   Parquet row groups / CSV blocks (+ each record's own bytes for a
                              CSV output) / .npy memory map, a batch at a time
      ▼ files._pieces         <= shard_size rows each, never across a chunk boundary
      ▼ PredictionPool.imap   (files._Job._stream)
      ▼ chunk_rows output rows ──Staging.commit──▶ .OUT.partial/part-000007-65536.parquet
      ▼ every chunk committed ──sink.assemble──▶ .OUT.partial/.tmp-output
      ▼ os.replace ──▶ OUT    (see :mod:`pool.etl.staging` for commit and resume)
"""

from .common import Columns, EtlError, OutputColumns
from .files import (
    MANIFEST_VERSION,
    MAX_CHUNK_ROWS,
    SAMPLE_ROWS,
    TARGET_CHUNK_BYTES,
    FileReport,
    predict_file,
)
from .formats import FORMATS
from .frames import (
    Predictor,
    arrow_column,
    is_table,
    map_batches,
    output_columns,
    predict,
    resolve_columns,
    submit,
    to_inputs,
    with_predictions,
)
from .progress import progress_bar
from .savedmodel_pb import peek_signature, read_signatures

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
    "Predictor",
    "arrow_column",
    "is_table",
    "map_batches",
    "output_columns",
    "peek_signature",
    "predict",
    "predict_file",
    "progress_bar",
    "read_signatures",
    "resolve_columns",
    "submit",
    "to_inputs",
    "with_predictions",
]
