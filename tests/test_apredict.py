"""``await pool.apredict(x)`` and ``pool.asubmit(x)`` (issue 15): the same answers as the model
called in-process, cancellation that drops the queued call, timeouts, errors with their types,
concurrent awaits combined into model calls; on the local backend and on a Dask LocalCluster.

Real worker processes with the cheap factories of tests/factories.py (no TensorFlow): one
module-scoped pool per backend. The ``batching`` pool waits up to 2 s for 64 rows before a
model call, so that small calls stay queued (observable with ``queued_requests()``) until a
test fills the batch, cancels them or lets them time out.
"""

from __future__ import annotations

import asyncio
import functools
import time

import distributed
import factories
import numpy as np
import pytest
from conftest import assert_rows_equal

from pool import PoolClosedError, PredictionPool, QueueFullError, WorkerError

pytestmark = pytest.mark.timeout(180)


FULL = 64  # rows of a full batch of the ``batching`` pool: dispatched at once


@pytest.fixture(scope="module")
def batching():
    with PredictionPool(
        factories.plain_double,
        workers=1,
        max_batch_rows=FULL,
        batch_timeout_micros=2_000_000,
        max_queued_requests=40,
    ) as pool:
        yield pool


@pytest.fixture(scope="module")
def faulty_pool():
    with PredictionPool(factories.faulty, workers=2, max_retries=0) as pool:
        yield pool


def rows(n: int, first: float = 0.0, width: int = 3, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).random((n, width)).astype(np.float32)
    x[:, 0] = first
    return x


async def until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_apredict_answers_as_the_model_in_process(faulty_pool):
    model = factories.faulty()
    batches = [rows(1, seed=1), rows(7, seed=2), rows(40, seed=3)]

    async def main():
        direct = [await faulty_pool.apredict(b) for b in batches]
        gathered = await asyncio.gather(*(faulty_pool.apredict(b, shard_size=3) for b in batches))
        future = faulty_pool.asubmit(batches[1], check_finite=True)
        assert isinstance(future, asyncio.Future)
        return direct, gathered, await future

    direct, gathered, submitted = asyncio.run(main())
    for got_list in (direct, gathered):
        for got, x in zip(got_list, batches, strict=True):
            assert_rows_equal(got["y"], model(x)["y"])
    assert_rows_equal(submitted["y"], model(batches[1])["y"])


def test_cancelling_the_awaiting_task_drops_its_queued_call(batching):
    async def main():
        rows_before = sum(s.rows for s in batching.stats())
        waiting = [asyncio.ensure_future(batching.apredict(rows(2, seed=i))) for i in range(5)]
        await until(lambda: batching.queued_requests() == 5)
        for task in waiting:
            task.cancel()
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        assert batching.queued_requests() == 0  # dropped at once, not at the batch timeout
        full = rows(FULL, seed=9)
        assert_rows_equal(await batching.apredict(full), full * 2)  # the pool goes on
        await asyncio.sleep(2.5)  # past the batch timeout: a call still queued would run
        return sum(s.rows for s in batching.stats()) - rows_before

    assert asyncio.run(main()) == FULL  # only the full call's rows: no cancelled row ran


def test_a_timeout_raises_timeout_error_and_drops_the_call(batching):
    async def main():
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batching.apredict(rows(3)), 0.2)
        assert time.monotonic() - started < 1.5  # at its timeout, not the batch's
        assert batching.queued_requests() == 0

    asyncio.run(main())


def test_errors_propagate_with_their_types(faulty_pool, batching):
    async def main():
        bad = rows(4)
        bad[2, 0] = factories.RAISE
        with pytest.raises(WorkerError, match=r"rows 2:3: the model raised ValueError") as raised:
            await faulty_pool.apredict(bad)
        assert raised.value.error_type == "ValueError"
        with pytest.raises(ValueError, match="NaN"):  # at once: nothing is queued
            faulty_pool.asubmit(np.full((2, 3), np.nan, np.float32), check_finite=True)
        # a full queue is refused at once, in the calling coroutine
        queued = [batching.asubmit(rows(1)) for _ in range(40)]
        with pytest.raises(QueueFullError):
            batching.asubmit(rows(1))
        for future in queued:
            future.cancel()
        await until(lambda: batching.queued_requests() == 0)

    asyncio.run(main())
    closed = PredictionPool(factories.plain_double, workers=1)
    with pytest.raises(PoolClosedError):
        asyncio.run(closed.apredict(np.ones((1, 2))))


def test_concurrent_awaits_are_combined_into_model_calls(batching):
    inputs = [rows(2, seed=100 + i) for i in range(FULL // 2)]

    async def main():
        before = batching.stats()[0]
        results = await asyncio.gather(*(batching.apredict(x, shard_size=2) for x in inputs))
        return before, batching.stats()[0], results

    before, after, results = asyncio.run(main())
    for got, x in zip(results, inputs, strict=True):
        assert_rows_equal(got, x * 2)
    assert after.rows - before.rows == FULL
    assert after.batches - before.batches == 1  # 32 calls, one model call


@pytest.fixture(scope="module")
def cluster_pool():
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
        PredictionPool(
            functools.partial(factories.faulty, delay=0.05), cluster=client, max_retries=0
        ) as pool,
    ):
        yield pool


def test_apredict_on_a_dask_cluster_answers_cancels_and_raises(cluster_pool):
    model = factories.faulty()
    batches = [rows(3, seed=i) for i in range(6)]

    async def main():
        got = await asyncio.gather(*(cluster_pool.apredict(b) for b in batches))
        bad = rows(2)
        bad[0, 0] = factories.RAISE
        with pytest.raises(WorkerError) as raised:
            await cluster_pool.apredict(bad)
        assert raised.value.error_type == "ValueError"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(cluster_pool.apredict(rows(500, seed=7), shard_size=1), 0.1)
        await until(lambda: cluster_pool.queued_requests() == 0)
        return got

    for result, x in zip(asyncio.run(main()), batches, strict=True):
        assert_rows_equal(result["y"], model(x)["y"])
