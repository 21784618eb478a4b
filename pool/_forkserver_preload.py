"""Imported by multiprocessing's fork server before it forks any worker (never by the parent).

TensorFlow is imported here once, before any TensorFlow runtime starts, so every worker forks
with it already imported. TensorFlow's C++ start-up chatter (CUDA probing on CPU machines) is
quietened unless the user set ``TF_CPP_MIN_LOG_LEVEL`` themselves; this changes the fork
server's environment only.
"""

import os
import signal

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# A SIGTERM sent to the whole process group (systemd's stop, ``timeout``) is for the parent,
# which drains and stops its workers; the fork server must outlive that to start replacements.
# It still exits when the parent's end of its pipe closes.
signal.signal(signal.SIGTERM, signal.SIG_IGN)

from . import model  # noqa: E402, F401  (the import is the point)
