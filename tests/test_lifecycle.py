"""Worker lifecycle on real processes: exit without shutdown(), recycling without leaks,
shutdown that always ends, replacements that cannot start or load, a failed start, a fork.

Every failure a caller sees is a ``PoolError``; nothing (process, descriptor, shared memory)
outlives what owns it."""

from __future__ import annotations

import functools
import gc
import json
import os
import resource
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import conftest
import factories
import numpy as np
import psutil
import pytest
from conftest import arena_handles, assert_rows_equal, in_process, pool_processes, wait_until

from pool import ModelLoadError, PoolClosedError, PredictionPool
from pool.dispatcher import Dispatcher
from pool.process import make_context

pytestmark = pytest.mark.usefixtures("nothing_left_behind")

RNG = np.random.default_rng(19)


def rows(n: int, width: int = 3) -> np.ndarray:
    return RNG.random((n, width)).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def warm():
    """Start the fork server (and its descriptors) once, so descriptor counts compare."""
    with PredictionPool(factories.faulty, workers=1) as pool:
        pool.predict(rows(2))


def run_script(tmp_path: Path, body: str, timeout: float = 60) -> tuple[str, float]:
    """Run ``body`` as a script (tests/ on the path) in its own session; return its stdout
    and how long it took. On a timeout, kill its whole group and fail."""
    started = time.monotonic()
    proc = conftest.start_script(tmp_path, body)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the script did not exit within {timeout} s:\n{out}\n{err}")
    assert proc.returncode == 0, err
    return out, time.monotonic() - started


# --- 1. the interpreter exits whether or not the pool was shut down ------------------------
def test_a_script_that_never_calls_shutdown_exits_and_leaves_no_worker(tmp_path):
    out, seconds = run_script(
        tmp_path,
        """
        import json
        import numpy as np
        import factories
        from pool import PredictionPool

        if __name__ == "__main__":
            pool = PredictionPool(factories.faulty, workers=2, shard_size=1).start()
            x = np.arange(12, dtype=np.float32).reshape(4, 3)
            assert (pool.predict(x)["y"] == x).all()
            print(json.dumps(pool.worker_pids()), flush=True)
            # no shutdown(): the interpreter must still exit, and take the workers with it
        """,
    )
    pids = json.loads(out)
    assert len(pids) == 2
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], 5)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_a_pool_dropped_without_shutdown_drains_then_frees_everything():
    before = psutil.Process().num_fds()
    x = rows(6)

    def use_and_drop():
        pool = PredictionPool(
            functools.partial(factories.faulty, delay=0.2), workers=1, shard_size=2
        ).start()
        return pool.submit(x), pool.worker_pids()

    future, pids = use_and_drop()  # the pool is garbage now, its call still running
    gc.collect()
    np.testing.assert_array_equal(future.result(timeout=60)["y"], x)  # drained, not dropped
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], 30)
    assert not alive
    wait_until(lambda: not [t for t in threading.enumerate() if t.name == "pool-dispatcher"])
    wait_until(lambda: psutil.Process().num_fds() <= before, timeout=10)


# --- 2. recycling: descriptors and shared memory stay flat; a failed spawn is survived ----
#: Calls in the long test; each recycles both workers once (240 recycles, 260 with warm-up).
#: Measured 0.14-0.2 s per recycle (forkserver with TensorFlow preloaded, a cheap model) on a
#: 2-core machine shared with other test runs: 300 recycles took 43-64 s, so 240 keeps the
#: test under about a minute.
RECYCLE_CALLS = 120


def recycled(pool: PredictionPool, restarts: int) -> int:
    """Wait until ``restarts`` replacements happened and every replacement has loaded."""
    wait_until(
        lambda: (
            sum(s.restarts for s in pool.stats()) == restarts
            and all(s.loads == 1 for s in pool.stats())
        )
    )
    return restarts


def test_hundreds_of_recycles_keep_descriptors_and_shared_memory_flat():
    me = psutil.Process()
    x = rows(2)
    with PredictionPool(
        factories.faulty, workers=2, shard_size=1, max_batch_rows=1, max_shards_per_worker=1
    ) as pool:
        for _ in range(10):
            np.testing.assert_array_equal(pool.predict(x)["y"], x)
        recycled(pool, 2 * 10)
        fds, arenas = me.num_fds(), arena_handles()
        started = time.monotonic()
        for _ in range(RECYCLE_CALLS):
            np.testing.assert_array_equal(pool.predict(x)["y"], x)
        seconds = time.monotonic() - started
        restarts = recycled(pool, 2 * (10 + RECYCLE_CALLS))  # one per shard
        # Every replaced process is reaped when its sentinel fires (at most a moment later).
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (me.num_fds() > fds or arena_handles() > arenas):
            time.sleep(0.05)
        after = me.num_fds(), arena_handles()
        assert after[0] <= fds and after[1] <= arenas, f"before {(fds, arenas)}, after {after}"
        assert len(pool_processes()) <= 2 + 2  # two workers (+ fork server, tracker)
    print(f"{restarts} recycles in {seconds:.1f} s")


def lowest_free_fd() -> int:
    fd = os.dup(0)
    os.close(fd)
    return fd


def test_a_replacement_that_cannot_be_started_does_not_kill_the_dispatcher():
    """EMFILE while starting a replacement (a real one: RLIMIT_NOFILE lowered to what is
    open): the caller gets ModelLoadError with the reason; the position retries and recovers."""
    x = rows(2)
    with PredictionPool(factories.faulty, workers=1, shard_size=2, max_shards_per_worker=1) as pool:
        np.testing.assert_array_equal(pool.predict(x)["y"], x)
        wait_until(lambda: pool.stats()[0].restarts == 1 and pool.stats()[0].loads == 1)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd(), hard))
            # Answered by the worker, which is then replaced: that replacement cannot start.
            np.testing.assert_array_equal(pool.predict(x)["y"], x)
            wait_until(lambda: pool.stats()[0].state == "dead")
            started = time.monotonic()
            with pytest.raises(ModelLoadError, match="Too many open files"):
                pool.predict(x)
            assert time.monotonic() - started < 5  # fails at submit, not after a wait
            stats = pool.stats()[0]
            assert "could not start a worker process" in stats.error
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        wait_until(lambda: pool.stats()[0].state == "ready", timeout=60)  # retried, backoff
        np.testing.assert_array_equal(pool.predict(x)["y"], x)
        assert pool.stats()[0].error is None


# --- 3. shutdown always ends ------------------------------------------------------------------
def test_shutdown_drains_while_workers_reach_their_shard_limit():
    model = functools.partial(factories.faulty, delay=0.05)
    pool = PredictionPool(model, workers=1, max_shards_per_worker=2, shard_size=1).start()
    backend = pool.backend
    inputs = [rows(1) for _ in range(6)]
    futures = [pool.submit(x) for x in inputs]
    closer = threading.Thread(target=pool.shutdown)
    closer.start()
    closer.join(90)
    if closer.is_alive():
        backend.shutdown(kill=True)
        closer.join(10)
        pytest.fail("shutdown() did not return: queued calls were never dispatched")
    for future, x in zip(futures, inputs, strict=True):
        np.testing.assert_array_equal(future.result(timeout=0)["y"], x)


# --- 4. a replacement that cannot load the model ---------------------------------------------
def test_a_replacement_that_cannot_load_fails_calls_with_the_reason_then_recovers(models, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(models["small_cnn"], path)
    x = RNG.random((2, 32, 32, 3), dtype=np.float32)
    want = in_process(models["small_cnn"], x)["probabilities"]
    with PredictionPool(str(path), workers=1, shard_size=2, max_shards_per_worker=1) as pool:
        shutil.rmtree(path)  # the loaded worker does not need it; its replacement will
        futures = [pool.submit(x) for _ in range(3)]
        assert_rows_equal(futures[0].result(timeout=120), want)
        for future in futures[1:]:
            with pytest.raises(ModelLoadError, match="could not load the model") as failure:
                future.result(timeout=120)
            assert str(path) in str(failure.value)  # the load's own reason
        started = time.monotonic()
        with pytest.raises(ModelLoadError, match=str(path)):
            pool.predict(x)  # no loadable worker: refused at submit
        assert time.monotonic() - started < 5
        stats = pool.stats()[0]
        assert stats.state in ("dead", "starting") and str(path) in stats.error
        shutil.copytree(models["small_cnn"], path)  # the position retries with backoff
        wait_until(lambda: pool.stats()[0].state == "ready", timeout=120)
        assert_rows_equal(pool.predict(x), want)
        assert pool.stats()[0].error is None


def test_every_failure_a_caller_sees_is_a_pool_error_when_shutdown_kills():
    x = rows(4)
    x[:, 0] = factories.HANG
    pool = PredictionPool(factories.faulty, workers=1, shard_size=1, max_batch_rows=1).start()
    running = pool.submit(x[:1])
    queued = [pool.submit(x[i : i + 1]) for i in range(1, 4)]
    wait_until(lambda: pool.queued_requests() <= 3)
    pool.shutdown(kill=True)
    for future in [running, *queued]:
        assert isinstance(future.exception(timeout=10), PoolClosedError)


# --- 5. a failed start leaks nothing ------------------------------------------------------
def test_a_failed_dispatcher_start_leaks_no_descriptor_or_worker():
    me = psutil.Process()
    settings = PredictionPool(factories.faulty, workers=3)._settings
    config = settings.worker_config(factories.faulty, me.pid, me.create_time())

    def config_for(index: int):  # worker 1 cannot be pickled: worker 0 is already running
        return config if index == 0 else replace(config, model=lambda: factories.faulty())

    fds = me.num_fds()
    children = {p.pid for p in pool_processes()}
    with pytest.raises(Exception, match="pickle"):
        Dispatcher(settings, make_context(None), config_for)
    assert me.num_fds() == fds
    new = [p for p in pool_processes() if p.pid not in children]
    _, alive = psutil.wait_procs(new, timeout=10)
    assert not alive


def test_a_factory_the_workers_cannot_import_is_a_type_error():
    with pytest.raises(TypeError, match="lambda"):
        PredictionPool(lambda: factories.faulty(), workers=2).start()


# --- 6. a forked child --------------------------------------------------------------------
def test_a_forked_child_gets_pool_closed_error_and_the_parent_pool_goes_on(tmp_path):
    out, _ = run_script(
        tmp_path,
        """
        import json, os
        import numpy as np
        import factories
        from pool import PoolClosedError, PredictionPool

        if __name__ == "__main__":
            pool = PredictionPool(factories.faulty, workers=1, shard_size=1).start()
            x = np.arange(6, dtype=np.float32).reshape(2, 3)
            pids = pool.worker_pids()
            r, w = os.pipe()
            child = os.fork()
            if child == 0:
                os.close(r)
                try:
                    pool.predict(x)
                    said = "answered"
                except PoolClosedError as exc:
                    said = f"PoolClosedError: {exc}"
                except BaseException as exc:
                    said = type(exc).__name__
                pool.shutdown()  # must leave the parent's workers alone
                os.write(w, said.encode())
                os._exit(0)
            os.close(w)
            said = b""
            while chunk := os.read(r, 4096):
                said += chunk
            os.waitpid(child, 0)
            same = pool.worker_pids() == pids
            answered = (pool.predict(x)["y"] == x).all()
            pool.shutdown()
            print(json.dumps({"child": said.decode(), "same": same, "answered": bool(answered)}))
        """,
    )
    result = json.loads(out)
    assert result["child"].startswith("PoolClosedError"), result
    assert "forked" in result["child"] and "start a new PredictionPool" in result["child"]
    assert result["same"] and result["answered"]
