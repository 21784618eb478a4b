"""Shared fixtures: reference models built once per session, in-process reference calls,
and a check that no worker process or shared-memory segment outlives a test module."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import psutil
import pytest

from pool import reference_models


@pytest.fixture(scope="session")
def models() -> dict[str, str]:
    """Paths of every reference SavedModel (built on first use, then cached)."""
    return {name: reference_models.ensure(name) for name in reference_models.BUILDERS}


@functools.cache
def _loaded(path: str):
    import tensorflow_hub as hub

    return hub.load(path)


def in_process(path: str, inputs, signature: str = "serving_default") -> dict[str, np.ndarray]:
    """The same model called in this process on the same inputs: the ground truth."""
    import tensorflow as tf

    fn = _loaded(path).signatures[signature]
    if not isinstance(inputs, Mapping):
        (name,) = fn.structured_input_signature[1]
        inputs = {name: inputs}
    out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in out.items()}


def assert_rows_equal(got, want, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Row by row: the pool's answer equals the in-process answer (float32 round-off)."""
    if isinstance(want, Mapping):
        assert isinstance(got, Mapping), f"expected a dict of outputs, got {type(got).__name__}"
        assert set(got) == set(want)
        for key in want:
            assert_rows_equal(got[key], want[key], rtol, atol)
        return
    assert isinstance(got, np.ndarray), f"expected an ndarray, got {type(got).__name__}"
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape)
    for i in range(len(want)):
        np.testing.assert_allclose(got[i], want[i], rtol=rtol, atol=atol, err_msg=f"row {i}")


def default_sigint() -> None:
    """``preexec_fn`` for a child a test interrupts with SIGINT: a suite started in the
    background by a shell without job control inherits SIGINT ignored, and so would the child,
    which then could not see the Ctrl-C the test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def shm_segments() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(("psm_", "pool"))}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True, scope="module")
def no_leftover_processes():
    """After each test module: no child process and no pool /dev/shm segment remains."""
    before_shm = shm_segments()
    yield
    gone, alive = psutil.wait_procs(pool_processes(), timeout=10)
    assert not alive, f"worker processes outlived the pool: {[p.pid for p in alive]}"
    assert shm_segments() <= before_shm, f"leaked shared memory: {shm_segments() - before_shm}"


def pool_processes() -> list[psutil.Process]:
    """Descendants of this process except multiprocessing's fork server and resource tracker
    (process-wide helpers that live as long as this process); the workers they host count."""
    me = psutil.Process()
    helpers = []
    for child in me.children():
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "forkserver" in cmd or "resource_tracker" in cmd:
            helpers.append(child)
    workers = [c for c in me.children(recursive=True) if c not in helpers]
    return workers


@pytest.fixture
def nothing_left_behind():
    """After the test: no worker process and no ``/dev/shm`` segment it created is left. Fault
    and lifecycle modules use it for every test (``pytestmark``)."""
    before_shm = shm_segments()
    before = {p.pid for p in pool_processes()}
    yield
    new = [p for p in pool_processes() if p.pid not in before]
    _, alive = psutil.wait_procs(new, timeout=10)
    assert not alive, f"processes outlived the test: {[p.pid for p in alive]}"
    assert shm_segments() <= before_shm


def start_script(tmp_path, body: str, **popen) -> subprocess.Popen:
    """Write ``body`` as ``job.py`` and run it with tests/ and the checkout on its path, in a
    session of its own (so a test can signal its whole group); stdout and stderr piped."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(body))
    tests = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests), str(tests.parent)]))
    return subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        **popen,
    )


def wait_until(condition, timeout: float = 30.0) -> None:
    """Poll ``condition()`` every 20 ms until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def arena_handles() -> tuple[int, int]:
    """The parent's shared memory: open arena descriptors, and arena mappings."""
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:pool-arena")
        except OSError:
            pass
    with open("/proc/self/maps") as maps:
        mapped = sum("memfd:pool-arena" in line for line in maps)
    return fds, mapped
