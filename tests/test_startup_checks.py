"""Mistakes found in the parent before any worker starts, errors a caller can read, and the
worker's traceback kept out of ``str(WorkerError)``."""

from __future__ import annotations

import functools
import logging
import pickle

import factories
import numpy as np
import pytest

import pool.local
from pool import ModelLoadError, PredictionPool, WorkerError
from pool.process import allowed_cpus


@pytest.fixture
def no_workers(monkeypatch):
    """Fail the test if the pool gets as far as starting a worker process."""

    def started(*args, **kwargs):
        raise AssertionError("a worker process was started")

    monkeypatch.setattr(pool.local, "Dispatcher", started)


def test_unknown_signature_fails_before_any_worker_starts(models, no_workers):
    with pytest.raises(ModelLoadError, match=r"expected signature 'nope'; the model .* has \["):
        PredictionPool(models["small_cnn"], workers=1, signature="nope").start()
    with pytest.raises(ModelLoadError, match=r"'scaled', 'serving_default'"):
        PredictionPool(models["multi_io"], workers=1, signature="nope").start()


def test_unknown_output_fails_before_any_worker_starts(models, no_workers):
    with pytest.raises(ModelLoadError, match=r"output 'nope' is not an output .*'probabilities'"):
        PredictionPool(models["small_cnn"], workers=1, output="nope").start()


def local_factory():
    def make():
        return factories.plain_double()

    return make


@pytest.mark.parametrize(
    "factory", [lambda: factories.plain_double(), local_factory()], ids=["lambda", "nested"]
)
def test_a_factory_that_cannot_reach_the_workers_is_refused_at_construction(factory):
    with pytest.raises(TypeError, match=r"top level of a module \(or functools.partial of one\)"):
        PredictionPool(factory, workers=1)


def test_top_level_factories_and_partials_are_accepted():
    PredictionPool(factories.plain_double, workers=1)
    PredictionPool(functools.partial(factories.faulty, delay=0.0), workers=1)
    pickle.dumps(functools.partial(factories.faulty, delay=0.0))


def test_more_threads_than_cpus_logs_a_warning(models, caplog):
    cpus = len(allowed_cpus() or [0])
    with caplog.at_level(logging.WARNING, logger="pool"):
        PredictionPool(models["small_cnn"], workers=cpus)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="pool"):
        PredictionPool(models["small_cnn"], workers=cpus + 1)
        PredictionPool(models["small_cnn"], workers=1, threads_per_worker=cpus + 1)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2, messages
    assert (
        f"workers={cpus + 1} x threads_per_worker=1 = {cpus + 1} threads on {cpus} CPU"
        in (messages[0])
    )


def test_an_unreachable_hub_handle_raises_model_load_error(tmp_path, monkeypatch, no_workers):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"could not fetch the TF Hub handle 'http://127\."):
        PredictionPool("http://127.0.0.1:1/model.tar.gz", workers=1).start()


def test_an_unreachable_scheduler_fails_at_once():
    pytest.importorskip("distributed")
    with pytest.raises(ModelLoadError, match=r"no Dask scheduler answers at 'tcp://127.0.0.1:1'"):
        PredictionPool(factories.plain_double, cluster="tcp://127.0.0.1:1").start()


def test_str_of_a_worker_error_is_its_message_and_the_traceback_is_its_cause():
    x = np.ones((4, 2))
    x[2, 0] = factories.RAISE
    with PredictionPool(factories.faulty, workers=1, shard_size=2) as p:
        with pytest.raises(WorkerError) as info:
            p.predict(x)
    error = info.value
    assert str(error) == "rows 2:4: the model raised ValueError: bad rows: [0]"
    assert "Traceback (most recent call last)" in error.remote_traceback
    assert "bad rows" in error.remote_traceback and error.error_type == "ValueError"
    assert error.remote_traceback in str(error.__cause__)
    again = pickle.loads(pickle.dumps(error))  # as it crosses a process boundary
    assert str(again) == str(error) and again.remote_traceback in str(again.__cause__)
