"""PredictionPool against the same models called in-process, row by row."""

from __future__ import annotations

import functools
import gc
import itertools
import subprocess
import sys
import threading
import time
import tracemalloc
import weakref

import factories
import numpy as np
import psutil
import pytest
import row_factories
from conftest import assert_rows_equal, in_process

from pool import ModelLoadError, PoolClosedError, PredictionPool, WorkerError, sharding
from pool.sharding import describe_model

RNG = np.random.default_rng(42)


def images(n: int, side: int = 32) -> np.ndarray:
    return RNG.random((n, side, side, 3), dtype=np.float32)


TEXTS = [
    "the quick brown fox",
    "jumps over the lazy dog",
    "",
    "Pool of workers",
    "émbeddings für alle",
    "a b c d e f g",
    "tensorflow hub",
]


@pytest.fixture(scope="module")
def cnn_pool(models):
    # The test process has loaded and called TensorFlow before the pool starts.
    in_process(models["small_cnn"], images(1))
    with PredictionPool(models["small_cnn"], workers=2, shard_size=3) as pool:
        yield pool


@pytest.fixture(scope="module")
def multi_pool(models):
    with PredictionPool(models["multi_io"], workers=2, shard_size=2) as pool:
        yield pool


@pytest.fixture(scope="module")
def text_pool(models):
    with PredictionPool(models["text_embedding"], workers=2, shard_size=2) as pool:
        yield pool


# --- results equal in-process results ------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 31])
def test_predict_matches_in_process(cnn_pool, models, n):
    x = images(n)
    assert_rows_equal(cnn_pool.predict(x), in_process(models["small_cnn"], x)["probabilities"])


def test_predict_with_automatic_and_per_call_shard_size(cnn_pool, models):
    x = images(23)
    want = in_process(models["small_cnn"], x)["probabilities"]
    before = sum(s.shards for s in cnn_pool.stats())
    assert_rows_equal(cnn_pool.predict(x, shard_size=5), want)
    assert sum(s.shards for s in cnn_pool.stats()) - before == 5  # ceil(23 / 5)
    assert_rows_equal(cnn_pool.predict(x, shard_size=100), want)


def test_zero_rows_gives_empty_result_of_right_shape(cnn_pool, text_pool, multi_pool):
    out = cnn_pool.predict(np.zeros((0, 32, 32, 3), np.float32))
    assert out.shape == (0, 10) and out.dtype == np.float32
    assert text_pool.predict([]).shape == (0, 64)
    both = multi_pool.predict({"a": np.zeros((0, 4), np.float32), "b": np.zeros((0, 3), np.int32)})
    assert both["logits"].shape == (0, 5) and both["sum"].shape == (0, 1)


def test_imap_keeps_order_over_uneven_batches(cnn_pool, models):
    batches = [images(n) for n in (5, 1, 8, 2, 3, 13)]
    got = list(cnn_pool.imap(batches))
    assert len(got) == len(batches)
    for batch, out in zip(batches, got, strict=True):
        assert_rows_equal(out, in_process(models["small_cnn"], batch)["probabilities"])


def test_imap_over_endless_generator_keeps_memory_bounded(cnn_pool, models):
    produced = itertools.count()
    made = []

    def endless():
        while True:
            next(produced)
            batch = images(3)
            made.append(batch)
            yield batch

    results = cnn_pool.imap(endless(), max_in_flight=4)
    for i, out in enumerate(itertools.islice(results, 12)):
        # At most max_in_flight shards (one per batch here) are produced ahead of the consumer.
        assert len(made) <= i + 1 + 4
        assert_rows_equal(out, in_process(models["small_cnn"], made[i])["probabilities"])
    results.close()


def test_imap_yields_everything_before_a_failing_generator(cnn_pool, models):
    batches = [images(2) for _ in range(3)]

    def broken():
        yield from batches
        raise RuntimeError("source failed at batch 3")

    got = []
    with pytest.raises(RuntimeError, match="source failed"):
        for out in cnn_pool.imap(broken()):
            got.append(out)
    assert len(got) == 3
    for batch, out in zip(batches, got, strict=True):
        assert_rows_equal(out, in_process(models["small_cnn"], batch)["probabilities"])


def test_imap_yields_earlier_results_before_a_bad_batch(cnn_pool):
    got = []
    with pytest.raises(ValueError, match="images"):
        for out in cnn_pool.imap([images(2), images(3), images(2, side=16)]):
            got.append(out)
    assert [len(o) for o in got] == [2, 3]


def test_submit_returns_futures(cnn_pool, models):
    xs = [images(n) for n in (4, 9, 1)]
    futures = [cnn_pool.submit(x) for x in xs]
    for x, future in zip(xs, futures, strict=True):
        assert_rows_equal(
            future.result(timeout=60), in_process(models["small_cnn"], x)["probabilities"]
        )


def test_concurrent_callers_each_get_their_own_rows(cnn_pool, models):
    inputs = {i: images(5 + i) for i in range(6)}
    results: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        results[i] = cnn_pool.predict(inputs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, x in inputs.items():
        assert_rows_equal(results[i], in_process(models["small_cnn"], x)["probabilities"])


# --- input kinds -----------------------------------------------------------------------------
def test_multi_input_multi_output_returns_dict(multi_pool, models):
    x = {"a": RNG.normal(size=(7, 4)).astype(np.float32), "b": RNG.integers(0, 9, (7, 3), np.int32)}
    assert_rows_equal(multi_pool.predict(x), in_process(models["multi_io"], x))


def test_output_picks_one_key(models):
    x = {"a": RNG.normal(size=(5, 4)).astype(np.float32), "b": RNG.integers(0, 9, (5, 3), np.int32)}
    with PredictionPool(models["multi_io"], workers=1, output="sum") as pool:
        assert_rows_equal(pool.predict(x), in_process(models["multi_io"], x)["sum"])
    with pytest.raises(ModelLoadError, match="'nope'.*logits"):
        PredictionPool(models["multi_io"], workers=1, output="nope").start()


def test_signature_picks_the_signature(models):
    a = RNG.normal(size=(5, 4)).astype(np.float32)
    with PredictionPool(models["multi_io"], workers=1, signature="scaled") as pool:
        assert_rows_equal(
            pool.predict(a), in_process(models["multi_io"], {"a": a}, "scaled")["scaled"]
        )


@pytest.mark.parametrize(
    "texts",
    [TEXTS, [t.encode() for t in TEXTS], np.array(TEXTS), np.array(TEXTS, dtype=object)],
    ids=["str", "bytes", "numpy-str", "numpy-object"],
)
def test_string_inputs(text_pool, models, texts):
    want = in_process(models["text_embedding"], np.array(TEXTS, dtype=object))["embedding"]
    assert_rows_equal(text_pool.predict(texts), want)


def test_float64_and_uint8_inputs_are_cast_like_in_process(cnn_pool, models):
    x = images(4)
    want = in_process(models["small_cnn"], x)["probabilities"]
    assert_rows_equal(cnn_pool.predict(x.astype(np.float64)), want)
    pixels = (x * 255).astype(np.uint8)
    want = in_process(models["small_cnn"], pixels.astype(np.float32))["probabilities"]
    assert_rows_equal(cnn_pool.predict(pixels), want)


def test_factory_callable_with_preprocessing(models):
    pixels = RNG.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    with PredictionPool(factories.uint8_small_cnn, workers=2, shard_size=4) as pool:
        got = pool.predict(pixels)
        assert [s.loads for s in pool.stats()] == [1, 1]
    want = in_process(models["small_cnn"], pixels.astype(np.float32) / 255.0)["probabilities"]
    assert_rows_equal(got, want)


def test_plain_callable_without_signature():
    x = RNG.normal(size=(6, 3))
    with PredictionPool(factories.plain_double, workers=1, shard_size=4) as pool:
        np.testing.assert_array_equal(pool.predict(x), x * 2)
        assert pool.predict(np.zeros((0, 3))).shape == (0, 3)


# --- bad input fails in the caller, before dispatch --------------------------------------------
@pytest.mark.parametrize(
    "bad, error, words",
    [
        (np.zeros((2, 16, 16, 3), np.float32), ValueError, "axis 1 is 16, not 32"),
        (np.zeros((2, 32, 32), np.float32), ValueError, "expected rank 4"),
        (np.zeros((2, 32, 32, 3), np.complex64), TypeError, "cannot be cast safely"),
        (np.full((2, 32, 32, 3), "a"), TypeError, "expected float32"),
        ([[[[0.0] * 3] * 32] * 32, [[[0.0] * 3] * 32] * 31], ValueError, "same shape"),
        (3.0, TypeError, "batch axis"),
        ({"images": images(1), "extra": images(1)}, ValueError, "unexpected \\['extra'\\]"),
        ({"pixels": images(1)}, ValueError, "missing \\['images'\\]"),
    ],
    ids=[
        "trailing-shape",
        "rank",
        "dtype",
        "strings",
        "ragged",
        "scalar",
        "extra-key",
        "wrong-key",
    ],
)
def test_bad_image_input_raises_before_dispatch(cnn_pool, bad, error, words):
    before = sum(s.shards for s in cnn_pool.stats())
    with pytest.raises(error, match=words) as info:
        cnn_pool.predict(bad)
    assert "images: float32[None, 32, 32, 3]" in str(info.value)  # names the signature
    assert sum(s.shards for s in cnn_pool.stats()) == before


@pytest.mark.parametrize(
    "bad, error, words",
    [
        ({"a": np.zeros((2, 4), np.float32)}, ValueError, "missing \\['b'\\]"),
        (np.zeros((2, 4), np.float32), TypeError, "pass a dict"),
        (
            {"a": np.zeros((2, 4), np.float32), "b": np.zeros((2, 3), np.float32)},
            TypeError,
            "int32",
        ),
        (
            {"a": np.zeros((2, 4), np.float32), "b": np.zeros((3, 3), np.int32)},
            ValueError,
            "same number of rows",
        ),
    ],
    ids=["missing-key", "not-a-dict", "float-into-int", "row-mismatch"],
)
def test_bad_multi_input_raises(multi_pool, bad, error, words):
    with pytest.raises(error, match=words):
        multi_pool.predict(bad)


@pytest.mark.parametrize(
    "bad", ["one string", [1, 2], [b"ok", None]], ids=["bare-str", "ints", "none"]
)
def test_bad_text_input_raises(text_pool, bad):
    with pytest.raises(TypeError, match="text: string"):
        text_pool.predict(bad)


# --- errors inside workers ---------------------------------------------------------------------
def test_model_error_reaches_caller_and_pool_stays_usable(models):
    a = np.ones((6, 4), np.float32)
    a[4, 0] = -1.0
    with PredictionPool(models["multi_io"], workers=2, signature="checked", shard_size=2) as pool:
        with pytest.raises(WorkerError) as info:
            pool.predict(a)
        text = str(info.value)
        assert "rows 4:6" in text and "a < 0" in text and "InvalidArgumentError" in text
        assert "Traceback" in info.value.remote_traceback
        good = np.abs(a)
        assert_rows_equal(
            pool.predict(good), in_process(models["multi_io"], {"a": good}, "checked")["checked"]
        )


def test_missing_model_path_fails_fast(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        PredictionPool(str(tmp_path / "nope"), workers=1).start()


def test_not_a_saved_model_fails_with_worker_reason_and_no_process_left(tmp_path):
    (tmp_path / "empty").mkdir()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ModelLoadError, match="could not load the model.*saved_model"):
        with PredictionPool(str(tmp_path / "empty"), workers=2):
            pass
    psutil.wait_procs(
        [p for p in psutil.Process().children(recursive=True) if p.pid not in before], timeout=10
    )
    after = {p.pid for p in psutil.Process().children(recursive=True) if p.status() != "zombie"}
    leftover = after - before
    helpers = {p.pid for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())}
    assert leftover <= helpers


def test_unknown_signature_names_the_available_ones(models):
    with pytest.raises(ModelLoadError, match="'nope'.*serving_default"):
        PredictionPool(models["multi_io"], workers=1, signature="nope").start()


# --- lifecycle, stats, threads ------------------------------------------------------------------
def test_stats_count_each_worker_and_one_load_each(cnn_pool):
    cnn_pool.predict(images(12))
    stats = cnn_pool.stats()
    assert len(stats) == 2
    assert len({s.pid for s in stats}) == 2
    assert sorted(s.pid for s in stats) == sorted(cnn_pool.worker_pids())
    assert all(s.loads == 1 and s.load_seconds > 0 for s in stats)
    assert all(s.shards > 0 and s.rows > 0 and s.busy_seconds > 0 for s in stats)
    assert all(s.rss_bytes > 50 << 20 for s in stats)
    assert all(s.restarts == 0 for s in stats)


def test_workers_are_pinned_and_threads_sized(cnn_pool):
    allowed = sorted(psutil.Process().cpu_affinity())
    for info in cnn_pool.ready_info:
        assert info.intra_op_threads == 1 and info.inter_op_threads == 1
        assert psutil.Process(info.pid).cpu_affinity() == list(info.cpus)
    if len(allowed) >= 2:
        assert {info.cpus for info in cnn_pool.ready_info} == {(allowed[0],), (allowed[1],)}


def test_no_worker_outlives_the_pool_even_on_exceptions(models):
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with PredictionPool(models["small_cnn"], workers=2) as pool:
                pids = pool.worker_pids()
                pool.submit(images(40), shard_size=1)  # shards still running at the interrupt
                raise exc
        gone, alive = psutil.wait_procs(
            [psutil.Process(p) for p in pids if psutil.pid_exists(p)], 5
        )
        assert not alive
    with pytest.raises(PoolClosedError, match="not running"):
        pool.predict(images(1))
    assert [s.rss_bytes for s in pool.stats()] == [0, 0]  # final counts stay readable
    with pytest.raises(PoolClosedError, match="not running"):
        PredictionPool("unused", workers=1).stats()


def test_threads_and_unpinned_workers(models):
    options = {"threads_per_worker": 2, "inter_op_threads": 2, "pin_cpus": False}
    with PredictionPool(models["small_cnn"], workers=1, **options) as pool:
        (info,) = pool.ready_info
        assert (info.intra_op_threads, info.inter_op_threads, info.cpus) == (2, 2, None)
        allowed = sorted(psutil.Process().cpu_affinity())
        assert sorted(psutil.Process(info.pid).cpu_affinity()) == allowed


def test_start_timeout_names_itself_and_leaves_no_worker():
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="within start_timeout=2"):
        PredictionPool(factories.slow_load, workers=2, start_timeout=2).start()
    assert time.monotonic() - started < 30  # the module fixture checks no worker is left


def test_spawn_start_method_works(models):
    x = images(5)
    with PredictionPool(models["small_cnn"], workers=1, start_method="spawn") as pool:
        assert pool.start_method == "spawn"
        assert_rows_equal(pool.predict(x), in_process(models["small_cnn"], x)["probabilities"])


def test_fork_is_refused():
    with pytest.raises(ValueError, match="fork is not safe"):
        PredictionPool("unused", workers=1, start_method="fork")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"workers": 0}, "workers must be a positive"),
        ({"shard_size": -1}, "shard_size must be a positive"),
        ({"threads_per_worker": 0}, "threads_per_worker"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"timeout": 0}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
    ],
)
def test_bad_options_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        PredictionPool("unused", **kwargs)


def test_parent_never_imports_tensorflow(models):
    """The dispatcher and lifecycle stay TensorFlow-free: only workers load it."""
    code = (
        "import sys, numpy as np\n"
        "from pool import PredictionPool\n"
        "if __name__ == '__main__':\n"
        f"    with PredictionPool({models['small_cnn']!r}, workers=1) as pool:\n"
        "        pool.predict(np.zeros((3, 32, 32, 3), np.float32))\n"
        "    heavy = ('tensorflow', 'tensorflow_hub', 'keras', 'tf_keras')\n"
        "    loaded = [m for m in sys.modules if m.split('.')[0] in heavy or m == 'pool.model']\n"
        "    print(sorted(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


# --- the result path: row counts, input snapshots, callbacks, freeing (issue 19) ----------------
@pytest.fixture(scope="module")
def slow_faulty():
    """One worker taking 0.2 s per model call, so that calls queue behind the running one."""
    with PredictionPool(
        functools.partial(factories.faulty, delay=0.2), workers=1, max_batch_rows=1
    ) as pool:
        yield pool


def float_rows(n: int, value: float | None = None) -> np.ndarray:
    x = RNG.random((n, 3)).astype(np.float32)
    if value is not None:
        x[:] = value
    return x


@pytest.mark.parametrize(
    "factory, got", [(row_factories.short_by_one, 4), (row_factories.long_by_one, 6)]
)
def test_an_output_with_the_wrong_number_of_rows_is_a_worker_error(factory, got):
    x = float_rows(10)
    with PredictionPool(factory, workers=1, shard_size=5) as pool:
        with pytest.raises(WorkerError) as info:
            pool.predict(x)
        text = str(info.value)
        name = f"the factory row_factories.{factory.__name__} returned {got} rows of output"
        assert name in text and "for 5 input rows" in text
        assert "rows 0:5" in text  # the first shard fails, the call's other shard is cancelled


def test_an_output_with_no_batch_axis_is_passed_through_for_a_one_shard_call():
    x = float_rows(4)
    with PredictionPool(row_factories.with_total, workers=1) as pool:
        out = pool.predict(x, shard_size=4)
        np.testing.assert_array_equal(out["y"], x)
        assert out["total"] == pytest.approx(float(x.astype(np.float64).sum()))
        with pytest.raises(ValueError, match="'total' is a scalar with no batch axis"):
            pool.predict(x, shard_size=2)


def test_imap_over_a_generator_that_refills_one_buffer_gets_every_batch(slow_faulty):
    def refilled():  # a reader that reuses its buffer for every batch
        buffer = np.zeros((1, 3), np.float32)
        for i in range(6):
            buffer[:] = i
            yield buffer

    got = list(slow_faulty.imap(refilled(), max_in_flight=6))
    assert [float(out["y"][0, 0]) for out in got] == [0, 1, 2, 3, 4, 5]


def test_submit_snapshots_its_inputs_when_the_call_is_accepted(slow_faulty):
    busy = slow_faulty.submit(float_rows(1))  # the call below waits behind this one
    x = float_rows(4, value=1.0)
    views = {"x": x[:, :]}  # a dict of views of the caller's array
    future = slow_faulty.submit(x)
    dict_future = slow_faulty.submit(views["x"][:2])
    x[:] = 9.0  # the caller reuses its array at once
    busy.result(timeout=60)
    np.testing.assert_array_equal(future.result(timeout=60)["y"], np.ones((4, 3), np.float32))
    np.testing.assert_array_equal(dict_future.result(timeout=60)["y"], np.ones((2, 3)))


def test_prepare_never_returns_memory_of_the_callers_input(cnn_pool):
    signature = cnn_pool.signature
    f32 = images(2)
    f64 = images(2).astype(np.float64)
    buffer = bytearray(f32.tobytes())
    for given in (f32, f32[:1], f64, np.frombuffer(buffer, np.float32).reshape(f32.shape)):
        arrays, _ = sharding.prepare(given, signature)
        assert not np.may_share_memory(arrays["images"], given)
        np.testing.assert_array_equal(arrays["images"], given.astype(np.float32))
    listed = f32.tolist()
    arrays, _ = sharding.prepare(listed, signature)
    np.testing.assert_array_equal(arrays["images"], f32)


def test_a_done_callback_may_call_the_pool_and_never_runs_on_the_dispatcher(slow_faulty):
    seen: dict[str, object] = {}
    called = threading.Event()

    def callback(future):
        seen["thread"] = threading.current_thread().name
        try:  # predict() from a callback, with a timeout so that a deadlock cannot hang the test
            seen["inner"] = slow_faulty.submit(float_rows(2, value=5.0)).result(timeout=20)
        except BaseException as exc:
            seen["error"] = exc
        called.set()

    for shards in (1, 2):  # a one-shard call's future and a combined call's future
        seen.clear()
        called.clear()
        busy = slow_faulty.submit(float_rows(1))  # the call below waits behind this one
        future = slow_faulty.submit(float_rows(2), shard_size=2 // shards)
        assert not future.done()
        future.add_done_callback(callback)
        busy.result(timeout=60)
        assert called.wait(60), "the callback never ran"
        assert "error" not in seen, f"the callback's predict failed: {seen['error']!r}"
        assert seen["thread"] != "pool-dispatcher"
        np.testing.assert_array_equal(seen["inner"]["y"], np.full((2, 3), 5.0))
    done = slow_faulty.submit(float_rows(1))
    done.result(timeout=60)
    here = []
    done.add_done_callback(lambda f: here.append(threading.current_thread()))
    assert here == [threading.current_thread()]  # added once done: runs at once, as for any Future


@pytest.mark.parametrize("raised", [SystemExit(3), KeyboardInterrupt(), ValueError("bad")])
def test_a_callback_raising_anything_never_stops_the_pool(slow_faulty, caplog, raised):
    def callback(future):
        raise raised

    for shards in (1, 2):
        busy = slow_faulty.submit(float_rows(1))  # the calls below wait behind this one
        first = slow_faulty.submit(float_rows(2), shard_size=2 // shards)
        queued = slow_faulty.submit(float_rows(3, value=2.0))  # pending when the callback raises
        assert not first.done()
        first.add_done_callback(callback)
        busy.result(timeout=30)
        np.testing.assert_array_equal(queued.result(timeout=30)["y"], np.full((3, 3), 2.0))
        assert first.result(timeout=30)["y"].shape == (2, 3)
    later = slow_faulty.submit(float_rows(1, value=4.0)).result(timeout=30)
    np.testing.assert_array_equal(later["y"], np.full((1, 3), 4.0))
    assert any("callback" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_finished_call_frees_its_inputs_and_outputs_without_the_cycle_collector():
    def settled(condition) -> bool:
        deadline = time.monotonic() + 5  # the dispatcher may still be leaving _on_done
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)
        return condition()

    def one_call(pool: PredictionPool, shard_size: int) -> weakref.ref:
        x = np.ones((64, 4096))  # 2 MiB of input (and of its snapshot), 2 MiB of output
        future = pool.submit(x, shard_size=shard_size)
        out = future.result(timeout=60)
        np.testing.assert_array_equal(out, x * 2)
        return weakref.ref(out)

    with PredictionPool(factories.plain_double, workers=1, max_batch_rows=64) as pool:
        for shard_size in (64, 16):  # warm every code path once: first uses allocate for good
            one_call(pool, shard_size)
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            for shard_size in (64, 16):  # one shard (one future), four shards (a combined one)
                before = tracemalloc.get_traced_memory()[0]
                freed = one_call(pool, shard_size)
                assert settled(lambda r=freed: r() is None), f"output kept alive ({shard_size=})"

                def held(start: int = before) -> int:
                    return tracemalloc.get_traced_memory()[0] - start

                assert settled(lambda h=held: h() < 256 << 10), (
                    f"{held() >> 10} KiB held ({shard_size=})"
                )
        finally:
            tracemalloc.stop()
            gc.enable()


def test_errors_name_the_model_by_its_path_or_its_factory():
    assert describe_model("/models/resnet") == "the model at /models/resnet"
    assert describe_model(factories.plain_double) == "the factory factories.plain_double"
    partial = functools.partial(factories.faulty, delay=1.0)
    assert describe_model(partial) == "the factory functools.partial(factories.faulty)"


def test_asyncio_wrap_future_bridge_stays_inline_and_other_callbacks_go_to_the_callback_thread():
    import asyncio

    from pool.futures import PoolFuture

    async def main() -> tuple[object, list[str]]:
        loop = asyncio.get_running_loop()
        future = PoolFuture()
        waiter = asyncio.wrap_future(future)
        threads: list[str] = []
        future.add_done_callback(lambda f: threads.append(threading.current_thread().name))
        scheduled = loop.call_soon_threadsafe

        def spy(*args):  # asyncio's bridge schedules onto the loop from the completing thread
            threads.append(threading.current_thread().name)
            return scheduled(*args)

        loop.call_soon_threadsafe = spy  # type: ignore[method-assign]
        completer = threading.Thread(target=future.set_result, args=(7,), name="completer")
        completer.start()
        result = await asyncio.wait_for(waiter, 10)
        completer.join()
        for _ in range(100):  # the handed-off callback runs on its own thread, soon
            if len(threads) == 2:
                break
            await asyncio.sleep(0.01)
        return result, sorted(threads)

    assert asyncio.run(main()) == (7, ["completer", "pool-callbacks"])


def test_shutdown_returns_once_the_callbacks_of_answered_calls_have_run():
    ran: list[str] = []

    def slow_callback(future) -> None:
        time.sleep(0.3)
        ran.append(threading.current_thread().name)

    model = functools.partial(factories.faulty, delay=0.2)
    with PredictionPool(model, workers=1) as pool:
        futures = [pool.submit(float_rows(1)) for _ in range(3)]
        assert not futures[0].done()
        for future in futures:
            future.add_done_callback(slow_callback)
    assert ran == ["pool-callbacks"] * 3  # shutdown drained the calls, then their callbacks


# --- casting by value (issue 17 item 3, issue 19) ----------------------------------------------
def test_python_integers_reach_an_int32_input_and_out_of_range_rows_are_named(multi_pool, models):
    a = [[0.5, -1.0, 2.0, 0.25], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]
    b = [[1, 2, 3], [-7, 0, 2_147_483_647], [4, 5, 6]]  # Python ints: int64 arrays
    want = in_process(
        models["multi_io"], {"a": np.asarray(a, np.float32), "b": np.asarray(b, np.int32)}
    )
    assert_rows_equal(multi_pool.predict({"a": a, "b": b}), want)
    unsigned = np.abs(np.asarray(b)).astype(np.uint64)
    want_unsigned = in_process(
        models["multi_io"], {"a": np.asarray(a, np.float32), "b": unsigned.astype(np.int32)}
    )
    assert_rows_equal(multi_pool.predict({"a": a, "b": unsigned}), want_unsigned)
    ints = [[1, 2, 3, 4], [-5, 0, 16_777_216, 7]]  # integers into the float32 input: exact
    want = in_process(
        models["multi_io"], {"a": np.asarray(ints, np.float32), "b": np.asarray(b[:2], np.int32)}
    )
    assert_rows_equal(multi_pool.predict({"a": ints, "b": b[:2]}), want)
    with pytest.raises(
        ValueError,
        match=r"int32 values in \[-2147483648, 2147483647\], got "
        r"2147483648 \(int64\) in row 2",
    ):
        multi_pool.predict({"a": a, "b": [[1, 2, 3], [4, 5, 6], [7, 2**31, -(2**31) - 1]]})
    with pytest.raises(ValueError, match=r"input 'a'.*got 16777217 \(int64\) in row 1"):
        multi_pool.predict({"a": [[0, 0, 0, 0], [16_777_217, 0, 0, 0]], "b": b[:2]})
    with pytest.raises(TypeError, match=r"expected int32, got float64, which cannot be cast"):
        multi_pool.predict({"a": a, "b": np.asarray(b, np.float64)})


def test_float64_beyond_float32_is_refused_with_its_row_not_made_infinite(models):
    """Up to float32's largest value (and what rounds to it), float64 casts as before; a finite
    value that float32 would make infinite is an error naming its row."""
    top = float(np.finfo(np.float32).max)
    fits = np.array(
        [[top, -top, np.nextafter(top, np.inf), 1e-300], [1.5, np.nan, np.inf, -np.inf]]
    )
    with PredictionPool(models["multi_io"], workers=1, signature="scaled") as pool:
        got = pool.predict(fits)
        want = in_process(models["multi_io"], {"a": fits.astype(np.float32)}, "scaled")["scaled"]
        assert_rows_equal(got, want)
        assert np.isinf(got[0, :3]).all() and np.isinf(want[0, :3]).all()  # doubled: inf in TF
        too_big = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [0.0, -3.5e38, 0, 0]])
        with pytest.raises(ValueError, match=r"input 'a'.*got -3\.5e\+38 \(float64\) in row 2"):
            pool.predict(too_big)
        with pytest.raises(ValueError, match=r"in row 0"):
            pool.predict([[1e39, 0.0, 0.0, 0.0]])


def test_dict_outputs_come_in_the_signatures_order(multi_pool):
    x = {"a": np.zeros((5, 4), np.float32), "b": np.zeros((5, 3), np.int32)}
    names = [t.name for t in multi_pool.signature.outputs]
    assert names == ["logits", "sum"]
    for rows in (1, 2, 5):
        part = {k: v[:rows] for k, v in x.items()}
        assert list(multi_pool.predict(part, shard_size=2)) == names
        assert list(multi_pool.submit(part).result()) == names
