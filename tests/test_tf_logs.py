"""TensorFlow's C++ start-up lines (absl's banner, the CUDA stub loader, ``failed call to
cuInit``, oneDNN) stay out of a CPU-only run's stderr unless asked for (``POOL_TF_LOGS=1`` or
``predict -vv``), and the filter holds back nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pool import worker

ROOT = Path(__file__).parent.parent

#: What TensorFlow 2.x prints at start-up on a machine without a GPU driver.
NOISE = (
    "All log messages before absl::InitializeLog()",
    "Could not find cuda drivers",
    "failed call to cuInit",
    "cudart_stub.cc",
    "oneDNN custom operations",
)


def tf_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(n in line for n in NOISE)]


def predict(models, tmp_path: Path, name: str, *extra: str, **env: str) -> str:
    images = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    np.save(tmp_path / "in.npy", images)
    environment = {k: v for k, v in os.environ.items() if k not in ("POOL_TF_LOGS",)}
    environment.update(PYTHONPATH=str(ROOT), **env)
    done = subprocess.run(
        [sys.executable, "-m", "pool", "predict", models["small_cnn"], "--workers", "2"]
        + ["-i", str(tmp_path / "in.npy"), "-o", str(tmp_path / f"{name}.npy"), *extra],
        capture_output=True,
        text=True,
        env=environment,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert np.load(tmp_path / f"{name}.npy").shape == (4, 10)
    return done.stderr


@pytest.mark.parametrize("level", [None, "3"])
def test_predict_prints_nothing_from_tensorflow(models, tmp_path, level):
    env = {} if level is None else {"TF_CPP_MIN_LOG_LEVEL": level}
    stderr = predict(models, tmp_path, "out", **env)
    assert tf_lines(stderr) == [], stderr
    assert stderr.strip().splitlines() == [stderr.strip().splitlines()[-1]], stderr
    assert stderr.strip().startswith("wrote 4 rows"), stderr


def test_the_escape_hatches_bring_the_lines_back(models, tmp_path):
    stderr = predict(models, tmp_path, "asked", POOL_TF_LOGS="1")
    assert any("Could not find cuda drivers" in line for line in tf_lines(stderr)), stderr
    stderr = predict(models, tmp_path, "verbose", "-vv")
    assert any("Could not find cuda drivers" in line for line in tf_lines(stderr)), stderr


BANNER = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
CUDA = (
    b"I0000 00:00:1796552623.736364    6090 cudart_stub.cc:31] Could not find cuda drivers on "
    b"your machine, GPU will not be used.\n"
)
CUINIT = (
    b"E0000 00:00:1796552627.439136    6090 cuda_platform.cc:52] failed call to cuInit: "
    b"INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n"
)
REAL = b"E0000 00:00:1796552627.460282    6090 loader.cc:10] a real error\nTraceback: real\n"


def test_the_filter_holds_back_only_tensorflows_start_up_lines(capfd, monkeypatch):
    monkeypatch.delenv("POOL_TF_LOGS", raising=False)
    with worker.tensorflow_start_quietly():
        os.write(2, BANNER + CUDA + REAL + CUINIT)
    assert capfd.readouterr().err.encode() == REAL


def test_everything_comes_back_when_the_block_fails(capfd, monkeypatch):
    monkeypatch.delenv("POOL_TF_LOGS", raising=False)
    with pytest.raises(ImportError), worker.tensorflow_start_quietly():
        os.write(2, BANNER + CUDA + REAL)
        raise ImportError("no tensorflow")
    assert capfd.readouterr().err.encode() == BANNER + CUDA + REAL


def test_nothing_is_held_back_when_asked(capfd, monkeypatch):
    monkeypatch.setenv("POOL_TF_LOGS", "1")
    with worker.tensorflow_start_quietly():
        os.write(2, BANNER + CUDA)
    assert capfd.readouterr().err.encode() == BANNER + CUDA
