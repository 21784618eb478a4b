"""Smoke test of an installed wheel: run it in a fresh virtual environment, away from the checkout.

``nox -s wheel`` (part of ``make test``) installs the built wheel alone, with the dependencies it
declares and nothing else, and runs this script from a temporary directory. It fails if the
package imports from the checkout instead of the environment, if package data (``py.typed``) or
a declared dependency is missing, if ``python -m pool --version`` disagrees with the metadata, or
if a one-worker pool does not answer a reference model exactly as the model does in-process.
Nothing is downloaded: the reference model is built here, into a temporary directory.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DISTRIBUTION = "prediction-pool"


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"wheel smoke test failed: {message}")


def main() -> int:
    import pool

    package = Path(pool.__file__).resolve().parent
    checkout = Path(__file__).resolve().parent.parent
    check(
        package != checkout / "pool" and "site-packages" in package.parts,
        f"pool was imported from {package}, not from the installed wheel's site-packages",
    )
    version = importlib.metadata.version(DISTRIBUTION)
    check(pool.__version__ == version, f"pool.__version__ {pool.__version__!r} != {version!r}")
    check((package / "py.typed").is_file(), f"py.typed is missing from {package}")
    loaded = [m for m in ("tensorflow", "pandas", "pyarrow", "pool.etl") if m in sys.modules]
    check(not loaded, f"`import pool` loaded {loaded}")

    shown = subprocess.run(
        [sys.executable, "-m", "pool", "--version"], capture_output=True, text=True, timeout=60
    )
    check(shown.returncode == 0, f"python -m pool --version failed: {shown.stderr}")
    check(version in shown.stdout, f"--version printed {shown.stdout!r}, expected {version}")

    import numpy as np

    from pool import PredictionPool, reference_models

    with tempfile.TemporaryDirectory() as cache:
        model = reference_models.ensure("small_cnn", cache)
        described = subprocess.run(
            [sys.executable, "-m", "pool", "inspect", model, "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        check(described.returncode == 0, f"python -m pool inspect failed: {described.stderr}")
        inputs = json.loads(described.stdout)["signatures"]["serving_default"]["inputs"]
        check(
            inputs == [{"name": "images", "dtype": "float32", "shape": [None, 32, 32, 3]}],
            f"inspect showed the inputs {inputs}",
        )

        images = np.random.default_rng(0).random((5, 32, 32, 3), dtype=np.float32)
        with PredictionPool(model, workers=1, shard_size=2) as running:
            got = running.predict(images)

        import tensorflow as tf
        import tensorflow_hub as hub

        serve = hub.load(model).signatures["serving_default"]
        want = serve(images=tf.constant(images))["probabilities"].numpy()
        check(got.shape == want.shape and got.dtype == want.dtype, f"{got.shape} {want.shape}")
        for row in range(len(want)):
            np.testing.assert_allclose(got[row], want[row], rtol=1e-5, atol=1e-6)
    sys.stderr.write(
        f"wheel smoke test passed: {DISTRIBUTION} {version} on Python "
        f"{sys.version.split()[0]}, imported from {package}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
