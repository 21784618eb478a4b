"""Top-level model factories for tests (workers import them by name, so they live in a module).

Each returns a callable, the way a user adds custom loading or preprocessing.
"""

from __future__ import annotations

import os
import time

from pool import reference_models


def uint8_small_cnn():
    """The small CNN behind a preprocessing step: uint8 pixels -> floats in [0, 1]."""
    import tensorflow as tf
    import tensorflow_hub as hub

    model = hub.load(reference_models.ensure("small_cnn"))
    serve = model.signatures["serving_default"]

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.uint8, name="pixels")])
    def predict(pixels):
        return serve(images=tf.cast(pixels, tf.float32) / 255.0)["probabilities"]

    predict.keep = model  # keep the variables alive
    return predict


def slow_load():
    """A factory that takes a minute to load (for start_timeout)."""
    time.sleep(60)
    return plain_double()


def plain_double():
    """A plain Python callable with no signature: doubles its input."""

    def double(x):
        return x * 2

    return double


# --- fault injection: a plain callable whose behaviour depends on the row values -----------
KILL = -1.0  # a row whose first value is KILL makes the worker die (os._exit)
HANG = -2.0  # ... hang for a long time
KILL_ONCE = -3.0  # ... die the first time, in the first worker that sees it (marker file)
LEAK = -4.0  # ... keep 50 MB more memory alive in the worker
HALF_SENT = -5.0  # ... die in the middle of sending a result to the parent
RAISE = -6.0  # ... make the model raise ValueError (a bad request)


def _die_mid_send() -> None:
    """Write the start of a result message on the worker's socket to the parent, then die:
    exactly what a worker killed (OOM, SIGKILL) while sending a large result leaves behind."""
    import gc
    import struct
    from multiprocessing.connection import Connection

    (conn,) = [c for c in gc.get_objects() if isinstance(c, Connection) and not c.closed]
    os.write(conn.fileno(), struct.pack("!i", 1 << 20) + b"partial")
    os._exit(5)


def faulty(marker: str | None = None, delay: float = 0.0):
    """Identity on float rows, with faults triggered by marker values in column 0.

    Use ``functools.partial(faulty, marker=path)`` for KILL_ONCE: the first worker to see it
    creates ``path`` and dies; a re-run finds the file and answers."""
    import numpy as np

    leaked = []

    def call(x):
        time.sleep(delay)
        x = np.asarray(x)
        first = x[:, 0] if x.ndim > 1 and len(x) else np.array([])
        if (first == KILL).any():
            os._exit(3)
        if (first == HANG).any():
            time.sleep(3600)
        if (first == KILL_ONCE).any():
            if marker and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(4)
        if (first == RAISE).any():
            raise ValueError(f"bad rows: {np.flatnonzero(first == RAISE).tolist()}")
        if (first == HALF_SENT).any():
            _die_mid_send()
        if (first == LEAK).any():
            leaked.append(np.ones(50 << 20, dtype=np.uint8))
        return {"y": x * 1.0, "pid": np.full((len(x),), os.getpid(), dtype=np.int64)}

    return call


def sleepy():
    """Identity on float rows that first sleeps as many seconds as the largest value in column 0
    (for results that complete out of order)."""
    import numpy as np

    def call(x):
        x = np.asarray(x)
        if x.ndim > 1 and len(x):
            time.sleep(max(0.0, float(x[:, 0].max())))
        return x * 1.0

    return call


# --- reload: models that differ only in their numbers, or in their signature ---------------
def scale(factor: float = 1.0, delay: float = 0.0):
    """Rows times ``factor``, and ``factor`` once per row (so a test can tell, row by row,
    which model answered). No TensorFlow in the model."""
    import numpy as np

    def call(x):
        if delay:
            time.sleep(delay)
        x = np.asarray(x)
        return {"y": x * np.float32(factor), "factor": np.full((len(x),), factor, np.float32)}

    return call


def broken():
    """A factory that cannot load its model."""
    raise RuntimeError("this factory cannot load its model (tests/factories.py: broken)")


def typed_scale(factor: float = 1.0, width: int = 3):
    """A ``tf.function`` with a declared signature: ``x`` float32 [N, width] -> ``y``."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, width], tf.float32, name="x")])
    def predict(x):
        return {"y": x * factor}

    return predict
