"""``imap_unordered`` (results as they complete, with each batch's index, in bounded memory)
and the ``progress`` option of ``imap`` and ``imap_unordered``."""

from __future__ import annotations

import itertools

import factories
import numpy as np
import pytest
from conftest import assert_rows_equal, in_process

from pool import PredictionPool, WorkerError


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 32, 32, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def cnn_pool(models):
    with PredictionPool(models["small_cnn"], workers=2) as pool:
        yield pool


@pytest.fixture(scope="module")
def sleepy_pool():
    with PredictionPool(factories.sleepy, workers=2, max_batch_rows=1) as pool:
        yield pool


def test_every_batch_once_with_its_index_equal_to_the_model_in_process(cnn_pool, models):
    batches = [images(n, seed) for seed, n in enumerate((5, 1, 8, 0, 2, 3, 13))]
    got = list(cnn_pool.imap_unordered(batches, shard_size=4))
    assert sorted(index for index, _ in got) == list(range(len(batches)))
    for index, out in got:
        if len(batches[index]) == 0:
            assert out.shape == (0, 10)
            continue
        assert_rows_equal(out, in_process(models["small_cnn"], batches[index])["probabilities"])


def test_a_slow_batch_holds_back_none_of_the_others(sleepy_pool):
    """Batch 0 sleeps 5 s in one worker; the other worker answers the rest meanwhile (a batch
    queued behind batch 0 in its worker may come after it)."""
    batches = [np.full((1, 2), 5.0)] + [np.full((1, 2), i / 1000) for i in (1, 2, 3, 4)]
    got = list(sleepy_pool.imap_unordered(batches))
    order = [index for index, _ in got]
    assert sorted(order) == [0, 1, 2, 3, 4]
    assert order[0] != 0, order
    for index, out in got:
        np.testing.assert_array_equal(out, batches[index])


def test_an_endless_generator_runs_in_bounded_memory(cnn_pool, models):
    made = []

    def endless():
        for seed in itertools.count():
            made.append(images(3, seed))
            yield made[-1]

    results = cnn_pool.imap_unordered(endless(), max_in_flight=4, shard_size=3)
    for done, (index, out) in enumerate(itertools.islice(results, 12)):
        # at most max_in_flight shards (one per batch here) submitted and not yet yielded
        assert len(made) <= done + 1 + 4, (len(made), done)
        assert_rows_equal(out, in_process(models["small_cnn"], made[index])["probabilities"])
    results.close()


def test_a_failing_generator_gets_every_submitted_batch_answered_first(cnn_pool):
    def broken():
        yield images(2)
        yield images(3)
        raise RuntimeError("source failed at batch 2")

    got = []
    with pytest.raises(RuntimeError, match="source failed"):
        for index, out in cnn_pool.imap_unordered(broken()):
            got.append((index, len(out)))
    assert sorted(got) == [(0, 2), (1, 3)]


def test_a_batch_the_model_fails_on_raises_and_the_pool_stays_usable():
    batches = [np.ones((2, 2)) for _ in range(4)]
    batches[2][1, 0] = factories.RAISE
    with PredictionPool(factories.faulty, workers=1) as pool:
        with pytest.raises(WorkerError, match="bad rows"):
            list(pool.imap_unordered(batches))
        assert sorted(i for i, _ in pool.imap_unordered(batches[:2])) == [0, 1]


def test_progress_counts_the_rows_of_each_result(cnn_pool):
    batches = [images(n) for n in (5, 1, 8)]
    seen: list[int] = []
    assert len(list(cnn_pool.imap(batches, progress=seen.append))) == 3
    assert seen == [5, 1, 8]
    seen.clear()
    assert len(list(cnn_pool.imap_unordered(batches, progress=seen.append))) == 3
    assert sorted(seen) == [1, 5, 8]


def test_progress_true_shows_a_tqdm_bar_on_stderr_only(cnn_pool, capsys):
    pytest.importorskip("tqdm")
    out = list(cnn_pool.imap([images(2), images(3)], progress=True))
    assert [len(o) for o in out] == [2, 3]
    assert capsys.readouterr().out == ""  # never on stdout (and off: stderr is no terminal)


def test_a_bad_progress_value_is_refused(cnn_pool):
    with pytest.raises(TypeError, match="progress must be a bool or a callable"):
        list(cnn_pool.imap([images(1)], progress="yes"))
