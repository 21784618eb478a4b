"""Fault injection on real worker processes: every row answered exactly once, in order, or a
clear error naming the rows; no process or shared-memory segment left behind."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import conftest
import factories
import numpy as np
import psutil
import pytest
from conftest import assert_rows_equal, default_sigint, in_process

from pool import PredictionPool, WorkerCrashedError

pytestmark = pytest.mark.usefixtures("nothing_left_behind")

RNG = np.random.default_rng(7)


def rows(n: int, width: int = 3) -> np.ndarray:
    return RNG.random((n, width)).astype(np.float32)


def expected(x: np.ndarray) -> np.ndarray:
    """The fault model called in-process: identity on healthy rows."""
    return factories.faulty()(x)["y"]


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_sigkill_mid_predict_loses_no_row(models):
    slow = functools.partial(factories.faulty, delay=0.03)
    x = rows(240)
    # One shard per model call (max_batch_rows=3): 80 calls, so the kill lands mid-call.
    with PredictionPool(slow, workers=2, shard_size=3, max_batch_rows=3) as pool:
        future = pool.submit(x)
        wait_until(lambda: sum(s.shards for s in pool.stats()) >= 6)
        assert not future.done()
        victim = pool.stats()[0].pid
        os.kill(victim, signal.SIGKILL)
        got = future.result(timeout=120)
        wait_until(lambda: pool.stats()[0].restarts == 1)
        stats = pool.stats()
        assert stats[0].restarts == 1 and stats[0].pid != victim and stats[0].loads == 1
        assert stats[1].restarts == 0
        assert sum(s.rows for s in stats) == len(x)  # each row answered exactly once
    np.testing.assert_array_equal(got["y"], expected(x))
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"


def test_sigkill_mid_predict_on_a_real_model(models):
    x = RNG.random((1600, 32, 32, 3), dtype=np.float32)
    # Small batches, so that the worker is killed while the call still has work queued.
    with PredictionPool(models["small_cnn"], workers=2, shard_size=1, max_batch_rows=4) as pool:
        future = pool.submit(x)
        wait_until(lambda: sum(s.shards for s in pool.stats()) >= 8)
        assert not future.done()
        os.kill(pool.stats()[1].pid, signal.SIGKILL)
        got = future.result(timeout=120)
        assert pool.stats()[1].restarts == 1
    assert_rows_equal(got, in_process(models["small_cnn"], x)["probabilities"])


def test_shard_that_always_kills_its_worker_fails_with_its_rows():
    x = rows(12)
    x[7, 0] = factories.KILL
    with PredictionPool(
        factories.faulty, workers=2, shard_size=4, max_retries=1, max_batch_rows=4
    ) as pool:  # one shard per model call: the rule for a shard running alone
        with pytest.raises(WorkerCrashedError, match=r"rows 4:8 killed their worker process 2"):
            pool.predict(x)
        healthy = rows(9)
        np.testing.assert_array_equal(pool.predict(healthy)["y"], expected(healthy))
        stats = pool.stats()
        assert sum(s.restarts for s in stats) == 2
        assert sum(s.retries for s in stats) == 1


def test_shard_that_kills_once_is_rerun_and_answered(tmp_path):
    x = rows(20)
    x[9, 0] = factories.KILL_ONCE
    model = functools.partial(factories.faulty, marker=str(tmp_path / "died"))
    with PredictionPool(model, workers=2, shard_size=2) as pool:
        out = pool.predict(x)
        assert sum(s.restarts for s in pool.stats()) == 1
        assert sum(s.retries for s in pool.stats()) == 1
    np.testing.assert_array_equal(out["y"], expected(x))


def test_worker_dying_mid_send_is_noticed_and_its_rows_named():
    """CPython's executor alone would wait forever for the rest of a half-sent result."""
    x = rows(6)
    x[3, 0] = factories.HALF_SENT
    with PredictionPool(factories.faulty, workers=1, shard_size=2, max_retries=0) as pool:
        with pytest.raises(WorkerCrashedError, match=r"rows 2:4 killed their worker process 1"):
            pool.submit(x).result(timeout=30)
        healthy = rows(5)
        np.testing.assert_array_equal(pool.predict(healthy)["y"], expected(healthy))
        # The three shards ran as one combined call first; after that death each re-ran alone.
        assert pool.stats()[0].restarts == 2


def test_hanging_shard_times_out_with_its_rows_and_pool_recovers():
    x = rows(6)
    x[3, 0] = factories.HANG
    with PredictionPool(
        factories.faulty, workers=2, shard_size=2, timeout=1.0, max_retries=0
    ) as pool:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"rows 2:4 ran past the timeout of 1.0 s"):
            pool.predict(x)
        assert time.monotonic() - started < 30
        healthy = rows(5)
        np.testing.assert_array_equal(pool.predict(healthy)["y"], expected(healthy))


def test_memory_limit_replaces_worker_without_losing_work():
    with PredictionPool(factories.faulty, workers=1, shard_size=1) as probe:
        baseline = probe.stats()[0].rss_bytes
    x = rows(8)
    x[:, 0] = factories.LEAK  # every shard keeps 50 MB more alive
    limit = baseline + (120 << 20)
    with PredictionPool(
        factories.faulty, workers=1, shard_size=1, max_batch_rows=1, max_worker_memory=limit
    ) as pool:  # one model call per shard: each call leaks 50 MB
        out = pool.predict(x)
        # ~3 shards per process before passing the limit (+1 queued behind); the last
        # replacement may happen just after the call is answered.
        wait_until(lambda: pool.stats()[0].restarts >= 2 and pool.stats()[0].loads == 1)
        stats = pool.stats()[0]
        assert stats.rows == len(x) and stats.loads == 1
    np.testing.assert_array_equal(out["y"], x)


def test_max_shards_per_worker_recycles_processes(models):
    x = RNG.random((10, 32, 32, 3), dtype=np.float32)
    with PredictionPool(
        models["small_cnn"], workers=1, shard_size=2, max_shards_per_worker=2
    ) as pool:
        first = pool.stats()[0].pid
        got = pool.predict(x)
        stats = pool.stats()[0]
        assert stats.restarts == 2 and stats.pid != first and stats.loads == 1
    assert_rows_equal(got, in_process(models["small_cnn"], x)["probabilities"])


def test_exception_in_with_block_stops_hanging_workers_promptly():
    x = rows(4)
    x[:, 0] = factories.HANG
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="user code failed"):
        with PredictionPool(factories.faulty, workers=2, shard_size=1) as pool:
            pids = pool.worker_pids()
            pool.submit(x)
            time.sleep(0.5)  # the workers are inside the hanging shards now
            exit_started = time.monotonic()
            raise RuntimeError("user code failed")
    assert time.monotonic() - exit_started < 5
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], 5)
    assert not alive, time.monotonic() - started


SCRIPT = """
import functools, json, sys
import numpy as np
import factories
from pool import PredictionPool

if __name__ == "__main__":
    model = functools.partial(factories.faulty, delay=0.2)
    with PredictionPool(model, workers=2, shard_size=1, max_batch_rows=1) as pool:
        print(json.dumps(pool.worker_pids()), flush=True)
        pool.predict(np.zeros((1000, 2), np.float32))  # about 100 s of work
"""


def start_script(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    proc = conftest.start_script(tmp_path, SCRIPT, preexec_fn=default_sigint)
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return proc, json.loads(line)


def test_ctrl_c_in_a_script_ends_it_and_its_workers(tmp_path):
    proc, pids = start_script(tmp_path)
    time.sleep(1.0)  # shards are running
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    proc.wait(timeout=10)
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in proc.stderr.read()
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], 5)
    assert not alive


def test_workers_exit_on_their_own_when_the_parent_is_killed(tmp_path):
    proc, pids = start_script(tmp_path)
    helpers = psutil.Process(proc.pid).children()  # fork server and friends
    time.sleep(1.0)
    proc.kill()  # not reaped until the workers are gone: they must not wait for the reaping
    procs = [psutil.Process(p) for p in pids if psutil.pid_exists(p)]
    _, alive = psutil.wait_procs(procs, timeout=10)
    assert not [p for p in alive if p.is_running() and p.status() != "zombie"]
    proc.wait(timeout=10)
    procs = [psutil.Process(p) for p in pids if psutil.pid_exists(p)] + helpers
    _, alive = psutil.wait_procs(procs, timeout=10)
    assert not [p for p in alive if p.is_running() and p.status() != "zombie"]


def test_eight_threads_at_once_each_get_their_own_rows(models):
    inputs = [RNG.random((3 + i, 32, 32, 3), dtype=np.float32) for i in range(8)]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def caller(i: int) -> None:
        try:
            x = inputs[i]
            mine = [pool.predict(x), pool.submit(x, shard_size=2).result(60)]
            mine += list(pool.imap([x[:2], x[2:]], shard_size=1))
            results[i] = mine
        except BaseException as exc:  # reported below
            errors.append(exc)

    with PredictionPool(models["small_cnn"], workers=2, shard_size=3) as pool:
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors
    for i, x in enumerate(inputs):
        want = in_process(models["small_cnn"], x)["probabilities"]
        predicted, submitted, head, tail = results[i]
        assert_rows_equal(predicted, want)
        assert_rows_equal(submitted, want)
        assert_rows_equal(np.concatenate([head, tail]), want)


def test_nan_check_names_the_rows(models):
    x = RNG.random((6, 32, 32, 3), dtype=np.float32)
    x[2, 0, 0, 0] = np.nan
    x[5, 1, 1, 1] = np.inf
    with PredictionPool(models["small_cnn"], workers=1) as pool:
        with pytest.raises(ValueError, match=r"finite.*2 row\(s\), first rows \[2, 5\]"):
            pool.predict(x, check_finite=True)
        assert pool.stats()[0].shards == 0
        assert pool.predict(x).shape == (6, 10)  # unchecked, NaN flows through like in-process


def test_workers_and_fork_server_leave_sigterm_to_the_parent():
    """systemd's stop and `timeout` send SIGTERM to the whole process group: the parent
    decides (a server drains, then stops its workers); workers must not die under it."""
    with PredictionPool(factories.faulty, workers=2, shard_size=1) as pool:
        pids = pool.worker_pids()
        helpers = [
            p
            for p in psutil.Process().children()
            if "forkserver" in " ".join(p.cmdline()) and p.pid not in pids
        ]
        for pid in pids + [p.pid for p in helpers]:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        x = rows(6)
        np.testing.assert_array_equal(pool.predict(x)["y"], expected(x))
        assert pool.worker_pids() == pids and all(s.restarts == 0 for s in pool.stats())
        assert all(p.is_running() for p in helpers)
