"""Imported by multiprocessing's fork server before it forks any worker (never by the parent).

TensorFlow is imported here once, before any TensorFlow runtime starts, so every worker forks
with it already imported. TensorFlow's C++ start-up lines (the CUDA stub loader, oneDNN, absl's
banner) are held back around the import (:func:`pool.worker.tensorflow_start_quietly`) and
``TF_CPP_MIN_LOG_LEVEL`` defaults to 2, unless ``POOL_TF_LOGS=1``; this changes the fork
server's environment and stderr only.
"""

import os
import signal

from .worker import tensorflow_logs_wanted, tensorflow_start_quietly

if not tensorflow_logs_wanted():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# A SIGTERM sent to the whole process group (systemd's stop, ``timeout``) is for the parent,
# which drains and stops its workers; the fork server must outlive that to start replacements.
# It still exits when the parent's end of its pipe closes.
signal.signal(signal.SIGTERM, signal.SIG_IGN)

with tensorflow_start_quietly():
    from . import model  # noqa: F401  (the import is the point)
