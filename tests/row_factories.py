"""Model factories for the result-path tests (workers import them by name): models that answer
with the wrong number of rows, or with an output that has no batch axis."""

from __future__ import annotations

import time

SHORT = -7.0  # a row whose first value is SHORT makes ``short_on_marker`` drop one row


def short_by_one():
    """Returns one row fewer than it was given (say, a model that drops a padding row)."""
    import numpy as np

    def call(x):
        return np.asarray(x)[:-1] * 1.0

    return call


def long_by_one():
    """Returns one row more than it was given."""
    import numpy as np

    def call(x):
        x = np.asarray(x)
        return np.concatenate([x, x[:1]]) * 1.0

    return call


def short_on_marker(delay: float = 0.0):
    """Identity on float rows, but one row short whenever a row's first value is SHORT."""
    import numpy as np

    def call(x):
        time.sleep(delay)
        x = np.asarray(x) * 1.0
        if len(x) and (x[:, 0] == SHORT).any():
            return {"y": x[:-1]}
        return {"y": x}

    return call


def with_total():
    """Identity plus ``total``: one number for the whole call, an output with no batch axis."""
    import numpy as np

    def call(x):
        x = np.asarray(x) * 1.0
        return {"y": x, "total": np.float64(x.sum())}

    return call
