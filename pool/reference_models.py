"""Reference models: real SavedModels with deterministic weights, built locally on first use.

Tests, the demo and the benchmarks use these instead of downloading weights. Each is written
with ``tf.saved_model.save`` and loaded back through ``tensorflow_hub.load``, the same path a
user's model takes. Build them all with ``python -m pool.reference_models [--cache-dir DIR]``.

- ``mobilenet_v2``: Keras MobileNetV2 (random weights, seed 0), ``images`` float32
  [N, 224, 224, 3] -> ``probabilities`` float32 [N, 1000].
- ``text_embedding``: ``text`` string [N] -> ``embedding`` float32 [N, 64]: hashed words,
  an embedding table, mean pooling, a dense layer and L2 normalisation.
- ``multi_io``: ``a`` float32 [N, 4] and ``b`` int32 [N, 3] -> ``sum`` float32 [N, 1] and
  ``logits`` float32 [N, 5]; a second signature ``scaled`` (``a`` -> ``scaled``); and a
  signature ``checked`` that fails inside TensorFlow when ``a`` has a negative value.
- ``small_cnn``: ``images`` float32 [N, 32, 32, 3] -> ``probabilities`` float32 [N, 10].

This module imports TensorFlow; the pool itself never imports it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("pool")

#: Bump when a model's definition changes, so stale caches are rebuilt.
VERSION = 1


def cache_dir() -> Path:
    """``$POOL_MODEL_CACHE``, else ``~/.cache/pool/models``."""
    env = os.environ.get("POOL_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pool" / "models"


def _save(module: Any, path: Path, signatures: dict) -> None:
    import tensorflow as tf

    tf.saved_model.save(module, str(path), signatures=signatures)


def _save_classifier(net: Any, side: int, path: Path) -> None:
    """Save a Keras image classifier as ``images`` [N, side, side, 3] -> ``probabilities``."""
    import tensorflow as tf

    module = tf.Module()
    module.net = net

    @tf.function(input_signature=[tf.TensorSpec([None, side, side, 3], tf.float32, name="images")])
    def serve(images):
        return {"probabilities": net(images, training=False)}

    _save(module, path, {"serving_default": serve})


def _build_mobilenet_v2(path: Path) -> None:
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    net = tf_keras.applications.MobileNetV2(
        weights=None, input_shape=(224, 224, 3), classes=1000, classifier_activation="softmax"
    )
    _save_classifier(net, 224, path)


def _build_small_cnn(path: Path) -> None:
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    net = tf_keras.Sequential(
        [
            tf_keras.layers.Input((32, 32, 3)),
            tf_keras.layers.Conv2D(16, 3, activation="relu"),
            tf_keras.layers.MaxPooling2D(),
            tf_keras.layers.Conv2D(32, 3, activation="relu"),
            tf_keras.layers.GlobalAveragePooling2D(),
            tf_keras.layers.Dense(10, activation="softmax"),
        ]
    )
    _save_classifier(net, 32, path)


def _build_text_embedding(path: Path) -> None:
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    buckets, width, dim = 4096, 128, 64
    module = tf.Module()
    module.table = tf.Variable(rng.normal(size=(buckets, width)).astype("float32"))
    module.dense = tf.Variable((rng.normal(size=(width, dim)) / np.sqrt(width)).astype("float32"))
    module.bias = tf.Variable(rng.normal(size=(dim,)).astype("float32") * 0.1)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serve(text):
        words = tf.strings.split(tf.strings.lower(text))
        ids = tf.strings.to_hash_bucket_fast(words, buckets)
        vectors = tf.ragged.map_flat_values(tf.gather, module.table, ids)
        pooled = tf.reduce_mean(vectors, axis=1)
        pooled = tf.where(tf.math.is_nan(pooled), tf.zeros_like(pooled), pooled)  # empty text
        hidden = tf.tanh(tf.matmul(pooled, module.dense) + module.bias)
        return {"embedding": tf.math.l2_normalize(hidden, axis=1)}

    _save(module, path, {"serving_default": serve})


def _build_multi_io(path: Path) -> None:
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(1)
    module = tf.Module()
    module.wa = tf.Variable(rng.normal(size=(4, 5)).astype("float32"))
    module.wb = tf.Variable(rng.normal(size=(3, 5)).astype("float32"))

    spec_a = tf.TensorSpec([None, 4], tf.float32, name="a")
    spec_b = tf.TensorSpec([None, 3], tf.int32, name="b")

    @tf.function(input_signature=[spec_a, spec_b])
    def serve(a, b):
        logits = tf.matmul(a, module.wa) + tf.matmul(tf.cast(b, tf.float32), module.wb)
        total = tf.reduce_sum(a, axis=1, keepdims=True) + tf.cast(
            tf.reduce_sum(b, axis=1, keepdims=True), tf.float32
        )
        return {"logits": logits, "sum": total}

    @tf.function(input_signature=[spec_a])
    def scaled(a):
        return {"scaled": a * 2.0}

    @tf.function(input_signature=[spec_a])
    def checked(a):
        with tf.control_dependencies([tf.debugging.assert_non_negative(a, message="a < 0")]):
            return {"checked": tf.identity(a)}

    _save(module, path, {"serving_default": serve, "scaled": scaled, "checked": checked})


BUILDERS: dict[str, Callable[[Path], None]] = {
    "mobilenet_v2": _build_mobilenet_v2,
    "small_cnn": _build_small_cnn,
    "text_embedding": _build_text_embedding,
    "multi_io": _build_multi_io,
}


def build_affine(path: str | os.PathLike, seed: int, features: int = 4) -> None:
    """A tiny SavedModel ``x`` float32[N, features] -> ``y`` = x @ W + b, W and b drawn from
    ``seed``: versions of one model with the same signature and different weights (the
    version tests and ``benchmarks/version_switch.py`` lay them out as TF Serving's
    ``BASE/1``, ``BASE/2``...)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    module = tf.Module()
    module.w = tf.Variable(rng.normal(size=(features, 3)).astype(np.float32))
    module.b = tf.Variable(rng.normal(size=(3,)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, features], tf.float32, name="x")])
    def serve(x):
        return {"y": tf.matmul(x, module.w) + module.b}

    _save(module, Path(path), {"serving_default": serve})


def ensure(name: str, directory: str | os.PathLike | None = None) -> str:
    """Return the path of reference model ``name``, building it first if it is not cached."""
    if name not in BUILDERS:
        raise ValueError(f"unknown reference model {name!r}; expected one of {sorted(BUILDERS)}")
    root = Path(directory) if directory is not None else cache_dir()
    target = root / f"{name}-v{VERSION}"
    if (target / "saved_model.pb").exists():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    log.info("building reference model %s into %s", name, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        BUILDERS[name](staging / "model")
        try:
            os.rename(staging / "model", target)  # atomic: a reader never sees half a model
        except OSError:
            if not (target / "saved_model.pb").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the reference SavedModels.")
    parser.add_argument("names", nargs="*", default=sorted(BUILDERS), help="models to build")
    parser.add_argument("--cache-dir", default=None, help=f"default: {cache_dir()}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.names:
        log.info("%s: %s", name, ensure(name, args.cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
