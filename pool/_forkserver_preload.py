"""Imported by multiprocessing's fork server before it forks any worker (never by the parent).

TensorFlow is imported here once, before any TensorFlow runtime starts, so every worker forks
with it already imported. TensorFlow's C++ start-up chatter (CUDA probing on CPU machines) is
quietened unless the user set ``TF_CPP_MIN_LOG_LEVEL`` themselves; this changes the fork
server's environment only.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from . import model  # noqa: E402, F401  (the import is the point)
