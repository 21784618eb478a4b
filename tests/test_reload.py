"""``PredictionPool.reload``: a new generation of workers loads the new model while the old one
answers; traffic moves when every new worker is ready; a call is answered by one model only;
a model that cannot load never replaces the working one; nothing of either generation is left
behind. Real worker processes throughout; cheap factories (tests/factories.py) where the model
does not matter, two real SavedModels (and a converted runtime) where it does."""

from __future__ import annotations

import functools
import os
import threading
import time

import factories
import numpy as np
import psutil
import pytest
from conftest import arena_handles, assert_rows_equal, in_process, pool_processes, wait_until

from pool import ModelLoadError, PoolClosedError, PoolError, PredictionPool, sharding
from pool.runtimes import installed

pytestmark = pytest.mark.usefixtures("nothing_left_behind")

RNG = np.random.default_rng(16)


def rows(n: int, width: int = 3) -> np.ndarray:
    return RNG.random((n, width)).astype(np.float32)


def scale(factor: float):
    return functools.partial(factories.scale, factor=factor)


def in_process_scale(factor: float, x: np.ndarray) -> dict[str, np.ndarray]:
    """The factory's model called in this process on the same rows: the ground truth."""
    return factories.scale(factor)(x)


def answered_by(result: dict[str, np.ndarray], x: np.ndarray) -> float:
    """Which model answered a call: one factor for every row, and every row equal to that
    model called in-process on the same row."""
    factors = set(result["factor"].tolist())
    assert len(factors) == 1, f"one call answered by several models: factors {factors}"
    (factor,) = factors
    assert_rows_equal(result, in_process_scale(factor, x))
    return factor


def gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


@pytest.fixture(scope="module")
def serving():
    """A pool shared by the tests whose reloads fail: it must keep serving generation 1."""
    with PredictionPool(scale(1.0), workers=2, shard_size=2) as pool:
        yield pool


def assert_still_serving(pool: PredictionPool, pids: list[int], factor: float = 1.0) -> None:
    assert pool.worker_pids() == pids, "the working generation was replaced or restarted"
    assert {s.state for s in pool.stats()} == {"ready"}
    x = rows(5)
    assert answered_by(pool.predict(x), x) == factor
    new = {p.pid for p in pool_processes()} - set(pids)
    _, alive = psutil.wait_procs([psutil.Process(p) for p in new if psutil.pid_exists(p)], 10)
    assert not [p for p in alive if p.status() != "zombie"], "a failed generation was left"


# --- 1. under load: no failed call, one model per call, answers move from old to new ---------
def hold_first_validation(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make the first call validated in another thread than this one wait, once validated,
    until ``go`` is set (``validated`` is set when it waits): a call checked before a reload
    moves traffic and submitted after it."""
    validated, go = threading.Event(), threading.Event()
    prepare, caller = sharding.prepare, threading.current_thread()

    def slow_prepare(*args, **kwargs):
        result = prepare(*args, **kwargs)
        if threading.current_thread() is not caller and not validated.is_set():
            validated.set()
            go.wait(60)
        return result

    monkeypatch.setattr(sharding, "prepare", slow_prepare)
    return validated, go


def test_reload_under_load_fails_no_call_and_answers_move_from_old_to_new():
    stop = threading.Event()
    seen: list[list[float]] = [[] for _ in range(9)]
    failures: list[BaseException] = []

    with PredictionPool(scale(1.0), workers=2, shard_size=2) as pool:
        old_pids = pool.worker_pids()

        def call_in_a_loop(i: int) -> None:
            while not stop.is_set():
                x = rows(1 + i % 6)  # 1 to 6 rows: up to three shards per call
                try:
                    seen[i].append(answered_by(pool.predict(x), x))
                except BaseException as exc:  # noqa: BLE001 (a failed call is the finding)
                    failures.append(exc)
                    return

        def stream() -> None:  # imap: each batch is one call, answered by one model
            def batches():
                while not stop.is_set():
                    x = rows(4)
                    sent.append(x)
                    yield x

            sent: list[np.ndarray] = []
            try:
                for k, result in enumerate(pool.imap(batches(), max_in_flight=4)):
                    seen[8].append(answered_by(result, sent[k]))
            except BaseException as exc:  # noqa: BLE001
                failures.append(exc)

        threads = [threading.Thread(target=call_in_a_loop, args=(i,)) for i in range(8)]
        threads.append(threading.Thread(target=stream))
        for t in threads:
            t.start()
        wait_until(lambda: all(len(s) >= 3 for s in seen), timeout=60)
        new = scale(2.0)
        assert pool.reload(new) == 2
        # reload returned: traffic has moved and the old generation is gone
        assert gone(old_pids)
        assert pool.generation == 2 and pool.model is new
        mark = [len(s) for s in seen]
        wait_until(
            lambda: all(len(s) >= m + 3 for s, m in zip(seen, mark, strict=True)), timeout=60
        )
        stop.set()
        for t in threads:
            t.join(30)
        assert not failures, failures[:3]
        for s in seen:  # each caller moves from the old model to the new one, never back
            assert s == sorted(s) and s[0] == 1.0 and s[-1] == 2.0, s
        stats = pool.stats()
        assert [(r.generation, r.model, r.state) for r in stats] == [
            (2, "functools.partial(factories.scale)", "ready")
        ] * 2
        assert not set(pool.worker_pids()) & set(old_pids)


def test_a_call_validated_before_traffic_moved_goes_whole_to_the_new_generation(monkeypatch):
    """A caller validates against generation 1, a reload then moves traffic and stops
    generation 1, and only then the call is submitted: it is answered, by generation 2."""
    with PredictionPool(scale(1.0), workers=1, shard_size=2) as pool:
        validated, go = hold_first_validation(monkeypatch)
        x = rows(5)
        results: list = []
        late = threading.Thread(target=lambda: results.append(pool.predict(x)))
        late.start()
        assert validated.wait(30)
        pool.reload(scale(3.0))  # returns once generation 1 has stopped
        go.set()
        late.join(30)
        assert answered_by(results[0], x) == 3.0


# --- 2. a new model that cannot load never replaces the working one ----------------------------
def test_a_factory_that_raises_keeps_the_old_model_serving(serving):
    pids = serving.worker_pids()
    with pytest.raises(ModelLoadError) as info:
        serving.reload(factories.broken)
    message = str(info.value)
    assert "reload to the factory factories.broken failed" in message
    assert "this factory cannot load its model" in message  # the worker's own reason
    assert "generation 1) keeps serving" in message
    assert serving.generation == 1 and serving.model.keywords == {"factor": 1.0}
    assert_still_serving(serving, pids)


def test_a_path_that_is_not_a_savedmodel_keeps_the_old_model_serving(serving, tmp_path):
    (tmp_path / "saved_model.pb").write_bytes(b"not a protobuf")
    pids = serving.worker_pids()
    for path, reason in [
        (tmp_path / "missing", "no such directory"),
        (tmp_path, "saved_model.pb"),
    ]:
        with pytest.raises(ModelLoadError, match=reason) as info:
            serving.reload(path)
        assert f"reload to the model at {path} failed" in str(info.value)
    assert_still_serving(serving, pids)


def test_a_model_not_ready_within_timeout_is_stopped_and_the_old_keeps_serving(serving):
    pids = serving.worker_pids()
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="did not load it within timeout=1.5 s"):
        serving.reload(factories.slow_load, timeout=1.5)
    assert time.monotonic() - started < 30
    assert_still_serving(serving, pids)


def test_a_runtime_that_cannot_run_the_new_model_is_refused_in_the_parent(serving):
    """Runtime resolution runs in the parent before any worker starts: a factory cannot be
    converted, so ``runtime='onnxruntime'`` refuses it and no new worker is ever started."""
    pids = serving.worker_pids()
    children = {p.pid for p in pool_processes()}
    with pytest.raises(ModelLoadError, match="can only run on TensorFlow"):
        serving.reload(scale(2.0), runtime="onnxruntime")
    assert {p.pid for p in pool_processes()} == children
    with pytest.raises(ValueError, match="runtime must be one of"):
        serving.reload(scale(2.0), runtime="pytorch")
    with pytest.raises(TypeError, match="cannot be sent to the worker processes"):
        serving.reload(lambda: None)
    with pytest.raises(TypeError, match="model must be a SavedModel path"):
        serving.reload(42)  # type: ignore[arg-type]
    assert_still_serving(serving, pids)


# --- 3. a different signature: refused unless allowed; then validation switches with traffic ---
def test_a_different_signature_is_refused_unless_allowed(monkeypatch):
    narrow, wide = rows(4, width=3), rows(4, width=5)
    with PredictionPool(
        functools.partial(factories.typed_scale, factor=2.0, width=3), workers=1
    ) as pool:
        np.testing.assert_allclose(pool.predict(narrow), narrow * 2)
        pids = pool.worker_pids()
        wider = functools.partial(factories.typed_scale, factor=3.0, width=5)
        with pytest.raises(ModelLoadError, match="allow_signature_change=True") as info:
            pool.reload(wider)
        assert "x: float32[None, 3]" in str(info.value) and "x: float32[None, 5]" in str(info.value)
        assert pool.worker_pids() == pids
        np.testing.assert_allclose(pool.predict(narrow), narrow * 2)

        # A call validated against the old signature but submitted after traffic moved is
        # validated again, against the model that will answer it.
        validated, go = hold_first_validation(monkeypatch)
        errors: list[BaseException] = []

        def late_call() -> None:
            try:
                pool.predict(narrow)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        late = threading.Thread(target=late_call)
        late.start()
        assert validated.wait(30)
        assert pool.reload(wider, allow_signature_change=True) == 2
        go.set()
        late.join(30)
        assert len(errors) == 1 and isinstance(errors[0], ValueError), errors
        assert "float32[None, 5]" in str(errors[0])
        np.testing.assert_allclose(pool.predict(wide), wide * 3)
        with pytest.raises(ValueError):
            pool.predict(narrow)


# --- 4. nothing is left behind: processes, descriptors, arenas ---------------------------------
def test_several_reloads_keep_processes_descriptors_and_arenas_flat():
    me = psutil.Process()
    x = rows(4)
    with PredictionPool(scale(1.0), workers=2, shard_size=2) as pool:
        pool.reload(scale(0.5))  # the first reload's one-time costs (e.g. imports) are paid
        assert answered_by(pool.predict(x), x) == 0.5
        fds, arenas = me.num_fds(), arena_handles()
        for generation, factor in enumerate([2.0, 3.0, 4.0, 5.0], start=3):
            assert pool.reload(scale(factor)) == generation
            assert answered_by(pool.predict(x), x) == factor
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (me.num_fds() > fds or arena_handles() > arenas):
            time.sleep(0.05)
        after = me.num_fds(), arena_handles()
        assert after[0] <= fds and after[1] <= arenas, f"before {(fds, arenas)}, after {after}"
        assert len(pool_processes()) <= 2 + 2  # two workers (+ fork server, tracker)
        assert {s.generation for s in pool.stats()} == {6}


# --- 5. reload against shutdown, another reload, a stopped pool, a cluster ---------------------
def test_reload_against_shutdown_another_reload_and_a_stopped_pool():
    pool = PredictionPool(scale(1.0), workers=1).start()
    outcome: list[BaseException | int] = []

    def slow_reload() -> None:
        try:
            outcome.append(pool.reload(factories.slow_load))  # loads for a minute
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    loading = threading.Thread(target=slow_reload)
    loading.start()
    wait_until(lambda: any(s.generation == 2 for s in pool.stats()))
    assert [(s.generation, s.state) for s in pool.stats()] == [(1, "ready"), (2, "starting")]
    assert len(pool.worker_pids()) == 2  # both generations resident
    with pytest.raises(PoolError, match=r"still running .* expected one reload at a time"):
        pool.reload(scale(2.0))
    x = rows(3)
    assert answered_by(pool.predict(x), x) == 1.0  # the old generation serves meanwhile
    started = time.monotonic()
    pool.shutdown()  # kills the generation loading; the running reload raises
    loading.join(30)
    assert time.monotonic() - started < 30
    assert len(outcome) == 1 and isinstance(outcome[0], PoolClosedError), outcome
    assert "shut down while" in str(outcome[0])
    assert [s.generation for s in pool.stats()] == [1]  # final stats: what served
    with pytest.raises(PoolClosedError, match="not running"):
        pool.reload(scale(2.0))
    with pytest.raises(PoolClosedError, match="not running"):
        PredictionPool(scale(1.0), workers=1).reload(scale(2.0))


def test_a_cluster_pool_cannot_reload_and_names_the_alternative():
    pool = PredictionPool(factories.plain_double, cluster=object(), workers=1)
    with pytest.raises(NotImplementedError, match=r"start a new PredictionPool\(new_model"):
        pool.reload(factories.plain_double)


# --- 6. real SavedModels: same signature, other weights; and a converted runtime ---------------
def build_dense(path, seed: int) -> str:
    """``x`` float32 [N, 4] -> ``y`` float32 [N, 3]: the same signature for every seed."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    module = tf.Module()
    module.w = tf.Variable(rng.normal(size=(4, 3)).astype("float32"))
    module.b = tf.Variable(rng.normal(size=(3,)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def serve(x):
        return {"y": tf.matmul(x, module.w) + module.b}

    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    return str(path)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("dense")
    return build_dense(root / "v1", seed=1), build_dense(root / "v2", seed=2)


def test_reload_between_two_savedmodels_and_onto_a_converted_runtime(dense, tmp_path, monkeypatch):
    v1, v2 = dense
    x = rows(6, width=4)
    want1, want2 = in_process(v1, x)["y"], in_process(v2, x)["y"]
    assert not np.allclose(want1, want2)
    with PredictionPool(v1, workers=1, shard_size=3) as pool:
        assert_rows_equal(pool.predict(x), want1)
        pool.reload(v2)
        assert_rows_equal(pool.predict(x), want2)
        assert pool.stats()[0].model == v2 and pool.model == v2
        if not installed("onnxruntime", converting=True):
            pytest.skip(
                "ONNX Runtime or tf2onnx is not installed: pip install 'prediction-pool[onnx]'"
            )
        monkeypatch.setenv("POOL_RUNTIME_CACHE", str(tmp_path / "runtime-cache"))
        assert pool.reload(v1, runtime="onnxruntime") == 3
        assert pool.runtime_info()["runtime"] == "onnxruntime"
        assert pool.start_method == "spawn"  # converted workers start without TensorFlow
        assert_rows_equal(pool.predict(x), want1, rtol=1e-4, atol=1e-5)
        pool.reload(v2, runtime="tensorflow")  # and back: TensorFlow workers again
        assert pool.runtime_info()["runtime"] == "tensorflow"
        assert_rows_equal(pool.predict(x), want2)


def test_reload_in_a_forked_child_is_refused(serving, monkeypatch):
    """The pool belongs to the process that started it: in a child made with ``os.fork()``
    (seen here as another pid, without forking a process that may hold TensorFlow), ``reload``
    raises ``PoolClosedError`` like every call, and starts nothing."""
    pids, children = serving.worker_pids(), {p.pid for p in pool_processes()}
    with monkeypatch.context() as patch:
        patch.setattr(os, "getpid", lambda: 1)
        with pytest.raises(PoolClosedError, match="forked from it"):
            serving.reload(scale(2.0))
    assert {p.pid for p in pool_processes()} == children
    assert_still_serving(serving, pids)
