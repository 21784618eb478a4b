"""The batch queue on its own: which waiting shards make one model call, and when."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time

import factories
import numpy as np
import pytest
import row_factories
from conftest import assert_rows_equal, in_process

from pool import PoolClosedError, PredictionPool, QueueFullError, WorkerError
from pool.backend import Batching
from pool.batching import BatchQueue
from pool.messages import ShardRequest


def shard(start: int, stop: int, width: int = 3, dtype=np.float32) -> ShardRequest:
    return ShardRequest(start, stop, {"x": np.zeros((stop - start, width), dtype)})


def queue(**options) -> BatchQueue:
    q = BatchQueue(Batching(**options), wake=lambda: None)
    return q


def rows_of(batch) -> list[tuple[int, int]]:
    return [(t.request.start, t.request.stop) for t in batch]


def test_one_waiting_shard_leaves_at_once_alone():
    q = queue()
    q.put([shard(0, 1)])
    q.collect()
    assert rows_of(q.take(takers=2)) == [(0, 1)]
    assert q.take(takers=2) is None


def test_waiting_shards_of_many_calls_combine_up_to_a_fair_share():
    q = queue()
    for _ in range(16):  # sixteen one-row requests from sixteen callers
        q.put([shard(0, 1)])
    q.collect()
    first = q.take(takers=2)
    assert len(first) == 8  # half of what waits: the other worker gets the other half
    assert len(q.take(takers=1)) == 8
    assert q.queued_calls() == 0


def test_max_batch_rows_and_bytes_bound_a_batch_but_never_split_a_shard():
    q = queue(max_batch_rows=5)
    q.put([shard(0, 2), shard(2, 4), shard(4, 6)])
    q.collect()
    assert rows_of(q.take(takers=1)) == [(0, 2), (2, 4)]
    q = queue(max_batch_bytes=3 * 4 * 3)  # three float32 rows of width 3
    q.put([shard(0, 2), shard(2, 4)])
    q.put([shard(0, 10)])
    q.collect()
    assert rows_of(q.take(takers=1)) == [(0, 2)]
    assert rows_of(q.take(takers=1)) == [(2, 4)]
    assert rows_of(q.take(takers=1)) == [(0, 10)]  # larger than the budget: alone, whole


def test_only_inputs_of_one_dtype_and_trailing_shape_combine():
    q = queue()
    q.put([shard(0, 1)])
    q.put([shard(0, 1, width=4)])
    q.put([shard(0, 1, dtype=np.float64)])
    q.collect()
    assert [len(q.take(takers=1)) for _ in range(3)] == [1, 1, 1]


def test_solo_shards_run_alone_and_requeued_shards_go_first_in_order():
    q = queue()
    q.put([shard(0, 1), shard(1, 2), shard(2, 3)])
    q.collect()
    batch = q.take(takers=1)
    assert len(batch) == 3
    for task in batch:
        task.solo = True
    q.requeue_front(batch)
    q.put([shard(0, 1)])
    q.collect()
    assert [rows_of(q.take(takers=1)) for _ in range(3)] == [[(0, 1)], [(1, 2)], [(2, 3)]]
    assert len(q.take(takers=1)) == 1


def test_cancelled_shards_are_dropped_and_uncounted():
    q = queue()
    futures = q.put([shard(0, 1), shard(1, 2)])
    q.put([shard(0, 1)])
    assert q.queued_calls() == 2
    assert all(f.cancel() for f in futures)
    assert q.queued_calls() == 1  # the cancelled call no longer waits
    q.collect()
    q.purge_cancelled()
    assert len(q) == 1 and rows_of(q.take(takers=1)) == [(0, 1)]


def test_a_full_queue_refuses_a_call_whole_and_at_once():
    q = queue(max_queued_requests=2)
    q.put([shard(0, 1)])
    q.put([shard(0, 1), shard(1, 2)])
    with pytest.raises(QueueFullError, match="max_queued_requests=2"):
        q.put([shard(0, 1)])
    q.collect()
    q.take(takers=1)  # takes the first call and the second (combined)
    assert q.queued_calls() == 0
    q.put([shard(0, 1)])  # room again
    q.close()
    with pytest.raises(PoolClosedError):
        q.put([shard(0, 1)])


def test_batch_timeout_waits_for_company_until_the_oldest_shard_has_waited_it():
    q = queue(batch_timeout_micros=10_000, max_batch_rows=4)
    q.put([shard(0, 1)])
    q.collect()
    queued_at = q.next_deadline() - 0.010
    assert q.take(takers=1, now=queued_at + 0.005) is None  # waits: could grow
    q.put([shard(0, 1)])
    q.collect()
    assert len(q.take(takers=1, now=queued_at + 0.011)) == 2  # the timeout passed
    for _ in range(4):
        q.put([shard(0, 1)])
    q.collect()
    assert len(q.take(takers=1, now=0.0)) == 4  # full: no wait


# --- on real worker processes ----------------------------------------------------------------
RNG = np.random.default_rng(11)


def images(n: int) -> np.ndarray:
    return RNG.random((n, 32, 32, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def cnn(models):
    with PredictionPool(models["small_cnn"], workers=2) as pool:
        yield pool


@pytest.fixture(scope="module")
def slow_pool():
    """One worker that takes 50 ms per model call, so that calls pile up and combine."""
    model = functools.partial(factories.faulty, delay=0.05)
    with PredictionPool(model, workers=1) as pool:
        yield pool


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def fault_rows(n: int, first: float = 0.0) -> np.ndarray:
    x = RNG.random((n, 3)).astype(np.float32)
    if first:
        x[:, 0] = first
    return x


def test_many_threads_uneven_sizes_and_imap_each_get_their_own_rows(cnn, models):
    sizes = [1, 1, 2, 3, 1, 5, 1, 8, 1, 13, 2, 1, 1, 4, 1, 1] * 4
    inputs = [images(n) for n in sizes]
    streamed = [images(n) for n in (1, 2, 1, 3, 1, 1, 2, 1)]
    results: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(len(inputs) + 1)

    def call(i: int) -> None:
        barrier.wait()
        results[i] = cnn.predict(inputs[i])

    before = cnn.stats()
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    barrier.wait()
    got_stream = list(cnn.imap(iter(streamed), shard_size=1))
    for t in threads:
        t.join()
    after = cnn.stats()
    for i, x in enumerate(inputs):
        assert_rows_equal(results[i], in_process(models["small_cnn"], x)["probabilities"])
    for x, got in zip(streamed, got_stream, strict=True):
        assert_rows_equal(got, in_process(models["small_cnn"], x)["probabilities"])
    shards = sum(a.shards - b.shards for a, b in zip(after, before, strict=True))
    calls = sum(a.batches - b.batches for a, b in zip(after, before, strict=True))
    assert shards >= len(inputs) + sum(len(x) for x in streamed)
    assert calls < shards  # waiting shards were combined into fewer model calls


def test_a_request_that_makes_the_model_raise_fails_alone(slow_pool):
    busy = slow_pool.submit(fault_rows(1))  # keeps the worker busy while the others queue
    good = [fault_rows(n) for n in (1, 2, 1, 3)]
    bad = fault_rows(2)
    bad[1, 0] = factories.RAISE
    futures = [slow_pool.submit(x) for x in good[:2]]
    bad_future = slow_pool.submit(bad)
    futures += [slow_pool.submit(x) for x in good[2:]]
    busy.result()
    with pytest.raises(WorkerError, match=r"rows 1:2: the model raised ValueError: bad rows"):
        bad_future.result(timeout=30)
    for x, future in zip(good, futures, strict=True):
        np.testing.assert_array_equal(future.result(timeout=30)["y"], x)


def test_cancelled_requests_are_dropped_from_the_queue(slow_pool):
    before = slow_pool.stats()[0].rows
    busy = slow_pool.submit(fault_rows(1))
    wait_for(busy.running)  # on the worker: the rest queues behind it
    queued = [slow_pool.submit(fault_rows(1)) for _ in range(20)]
    kept = slow_pool.submit(fault_rows(3))
    cancelled = [f for f in queued[-10:] if f.cancel()]  # the last ones still wait
    assert len(cancelled) == 10
    assert not busy.cancel()  # a running call cannot be cancelled
    busy.result()
    assert kept.result(timeout=30)["y"].shape == (3, 3)
    for f in queued[:-10]:
        assert f.result(timeout=30)["y"].shape == (1, 3)
    assert all(f.cancelled() for f in cancelled)
    assert slow_pool.stats()[0].rows - before == 1 + 10 + 3  # the cancelled rows never ran
    assert slow_pool.queued_requests() == 0


def test_queue_bound_refuses_at_once():
    model = functools.partial(factories.faulty, delay=1.0)
    with PredictionPool(model, workers=1, max_queued_requests=2) as pool:
        held = []
        for _ in range(2):  # the worker holds two calls: one running, one queued behind it
            held.append(pool.submit(fault_rows(1)))
            wait_for(lambda: pool.queued_requests() == 0)
        waiting = [pool.submit(fault_rows(1)) for _ in range(2)]
        assert pool.queued_requests() == 2
        started = time.monotonic()
        with pytest.raises(QueueFullError, match="max_queued_requests=2"):
            pool.submit(fault_rows(1))
        assert time.monotonic() - started < 0.1
        for f in held + waiting:
            f.result(timeout=30)
        pool.submit(fault_rows(1)).result(timeout=30)  # room again


def test_sigkill_while_a_combined_batch_runs_loses_no_row():
    model = functools.partial(factories.faulty, delay=0.1)
    with PredictionPool(model, workers=1) as pool:
        xs = [fault_rows(1) for _ in range(24)]
        futures = [pool.submit(xs[0])]
        wait_for(futures[0].running)
        futures += [pool.submit(x) for x in xs[1:]]  # they queue behind the running call...
        # ...and form the next call, which is running once nothing waits any more.
        wait_for(lambda: pool.stats()[0].batches >= 1 and pool.queued_requests() == 0)
        victim = pool.stats()[0].pid
        assert sum(not f.done() for f in futures) == len(xs) - 1
        os.kill(victim, signal.SIGKILL)
        for x, f in zip(xs, futures, strict=True):
            np.testing.assert_array_equal(f.result(timeout=60)["y"], x)
        stats = pool.stats()[0]
        assert stats.restarts == 1 and stats.pid != victim
        assert stats.retries == 1  # the combined call, re-run shard by shard
        assert stats.shards == len(xs) and stats.rows == len(xs)


def test_batch_timeout_trades_a_little_latency_for_bigger_calls(models):
    with PredictionPool(models["small_cnn"], workers=1, batch_timeout_micros=200_000) as pool:
        started = time.monotonic()
        futures = [pool.submit(images(1)) for _ in range(4)]
        for f in futures:
            f.result(timeout=30)
        assert time.monotonic() - started >= 0.15  # the first one waited for company...
        assert pool.stats()[0].batches == 1  # ...and all four went in one model call


def test_imap_is_counted_against_the_queue_bound_but_never_refused():
    model = functools.partial(factories.faulty, delay=0.1)
    with PredictionPool(model, workers=1, max_queued_requests=1, max_batch_rows=1) as pool:
        batches = [fault_rows(1) for _ in range(6)]
        got = list(pool.imap(iter(batches), max_in_flight=6))
        for x, y in zip(batches, got, strict=True):
            np.testing.assert_array_equal(y["y"], x)


def test_a_call_answered_with_the_wrong_number_of_rows_fails_alone_inside_a_combined_call():
    model = functools.partial(row_factories.short_on_marker, delay=0.1)
    with PredictionPool(model, workers=1) as pool:
        busy = pool.submit(fault_rows(1))  # keeps the worker busy while the others queue
        wait_for(busy.running)
        good = [fault_rows(n) for n in (1, 2, 1, 3)]
        bad = fault_rows(2)
        bad[1, 0] = row_factories.SHORT
        futures = [pool.submit(x) for x in good[:2]]
        bad_future = pool.submit(bad)
        futures += [pool.submit(x) for x in good[2:]]
        busy.result(timeout=30)
        with pytest.raises(WorkerError) as info:
            bad_future.result(timeout=30)
        text = str(info.value)
        # Shards of one row: the shard holding the marked row is named, with both counts.
        assert "rows 1:2: the factory functools.partial(row_factories.short_on_marker)" in text
        assert "returned 0 rows of output 'y' for 1 input rows" in text
        for x, future in zip(good, futures, strict=True):
            np.testing.assert_array_equal(future.result(timeout=30)["y"], x)
        stats = pool.stats()[0]
        assert stats.shards > stats.batches  # the calls did share a model call
