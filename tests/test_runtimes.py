"""``runtime=``: the same SavedModels converted to OpenVINO and ONNX Runtime, against the model
called in-process with TensorFlow, row by row; the conversion cache; ``auto`` and its fallback.

Each converted runtime's tests are skipped, with the reason, when it is not installed
(``pip install 'prediction-pool[openvino]'`` / ``'prediction-pool[onnx]'``).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_rows_equal, in_process

from pool import ModelLoadError, PredictionPool
from pool.runtimes import TOLERANCES, installed
from pool.runtimes.cache import MANIFEST, read_manifest, valid_manifest
from pool.runtimes.resolve import resolve

OPENVINO = pytest.param(
    "openvino",
    marks=pytest.mark.skipif(
        not installed("openvino", converting=True),
        reason="OpenVINO is not installed: pip install 'prediction-pool[openvino]'",
    ),
)
ONNXRUNTIME = pytest.param(
    "onnxruntime",
    marks=pytest.mark.skipif(
        not installed("onnxruntime", converting=True),
        reason="ONNX Runtime or tf2onnx is not installed: pip install 'prediction-pool[onnx]'",
    ),
)
CONVERTED = [OPENVINO, ONNXRUNTIME]
RNG = np.random.default_rng(14)


@pytest.fixture(scope="module", autouse=True)
def runtime_cache(tmp_path_factory):
    """A conversion cache of this module's own (the pool reads ``$POOL_RUNTIME_CACHE``)."""
    root = tmp_path_factory.mktemp("runtime-cache")
    before = os.environ.get("POOL_RUNTIME_CACHE")
    os.environ["POOL_RUNTIME_CACHE"] = str(root)
    yield root
    if before is None:
        del os.environ["POOL_RUNTIME_CACHE"]
    else:
        os.environ["POOL_RUNTIME_CACHE"] = before


def build_scaled(path: Path, seed: int = 0, side: int | None = 16) -> str:
    """A small convolutional model whose logits have a real scale (about ±10), so a tolerance
    relative to that scale means something: ``images`` [N, 16, 16, 3] -> ``logits`` [N, 5] and
    ``features`` [N, 8]. ``side=None``: images of any size."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    module = tf.Module()
    module.kernel = tf.Variable(rng.normal(size=(3, 3, 3, 8)).astype("float32"))
    module.dense = tf.Variable((rng.normal(size=(8, 5)) * 3).astype("float32"))
    module.bias = tf.Variable(rng.normal(size=(5,)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([None, side, side, 3], tf.float32, name="images")])
    def serve(images):
        hidden = tf.nn.relu(tf.nn.conv2d(images, module.kernel, 1, "SAME"))
        features = tf.reduce_mean(hidden, axis=[1, 2])
        return {"logits": tf.matmul(features, module.dense) + module.bias, "features": features}

    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    return str(path)


@pytest.fixture(scope="module")
def scaled(tmp_path_factory) -> str:
    return build_scaled(tmp_path_factory.mktemp("scaled") / "model")


def sample(model: str, rows: int) -> np.ndarray | dict[str, np.ndarray]:
    if model == "multi_io":
        return {
            "a": RNG.standard_normal((rows, 4)).astype("float32"),
            "b": RNG.integers(-5, 5, size=(rows, 3)).astype("int32"),
        }
    side = {"mobilenet_v2": 224, "small_cnn": 32, "scaled": 16}[model]
    return RNG.standard_normal((rows, side, side, 3)).astype("float32")


def assert_close(got, want) -> None:
    """Row by row within the f32 tolerance, relative to each output's scale."""
    if isinstance(want, dict):
        assert set(got) == set(want)
        for name in want:
            assert_close(got[name], want[name])
        return
    scale = float(np.max(np.abs(want)))
    assert_rows_equal(got, want, rtol=0, atol=TOLERANCES["f32"] * scale + 1e-7)


def no_tensorflow_in(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "libtensorflow" not in f.read()


def only(values):
    return values if isinstance(values, dict) else {"probabilities": values}


@pytest.mark.parametrize("model", ["scaled", "multi_io", "small_cnn", "mobilenet_v2"])
@pytest.mark.parametrize("runtime", CONVERTED)
def test_a_converted_runtime_answers_every_row_like_tensorflow(runtime, model, models, scaled):
    path = scaled if model == "scaled" else models[model]
    rows = 9 if model == "mobilenet_v2" else 23
    inputs = sample(model, rows)
    want = in_process(path, inputs)
    if model == "scaled":
        assert np.max(np.abs(want["logits"])) > 5  # a real scale: the tolerance means something
    with PredictionPool(path, workers=2, shard_size=4, runtime=runtime) as pool:
        info = pool.runtime_info()
        assert info["runtime"] == runtime and info["requested"] == runtime
        assert set(info["differences"]) == {t.name for t in pool.signature.outputs}
        assert all(d["max_rel"] <= TOLERANCES["f32"] for d in info["differences"].values())
        assert [r.runtime for r in pool.ready_info] == [runtime, runtime]
        assert info["start_method"] == pool.start_method == "spawn"  # not the TF fork server
        assert all(no_tensorflow_in(pid) for pid in pool.worker_pids())
        got = pool.predict(inputs)
        assert_close(only(got), want)
        # imap: batches of several sizes (the batch dimension changes between calls), in order
        sizes = [1, 5, rows - 6]
        batches, start = [], 0
        for n in sizes:
            batches.append(
                {k: v[start : start + n] for k, v in inputs.items()}
                if isinstance(inputs, dict)
                else inputs[start : start + n]
            )
            start += n
        streamed = list(pool.imap(batches))
        for got_part, batch in zip(streamed, batches, strict=True):
            assert_close(only(got_part), in_process(path, batch))
        if model == "scaled":  # a SIGKILLed worker: its shards re-run, rows stay in order
            os.kill(pool.worker_pids()[0], signal.SIGKILL)
            assert_close(pool.predict(inputs), want)
            assert all(no_tensorflow_in(pid) for pid in pool.worker_pids())


@pytest.mark.parametrize("runtime", CONVERTED)
def test_an_explicit_runtime_refuses_a_string_model_naming_the_ops(runtime, models):
    with pytest.raises(ModelLoadError, match="StringSplitV2") as error:
        resolve(models["text_embedding"], runtime=runtime)
    assert "StringToHashBucketFast" in str(error.value)


@pytest.mark.skipif(not installed("openvino"), reason="OpenVINO is not installed")
def test_auto_runs_a_string_model_on_tensorflow_and_says_why_in_one_line(models, caplog):
    path = models["text_embedding"]
    texts = np.array(["the quick brown fox", "", "Pool of workers", "a b c"], dtype=object)
    with caplog.at_level(logging.INFO, logger="pool"):
        with PredictionPool(path, workers=1, runtime="auto") as pool:
            info = pool.runtime_info()
            got = pool.predict(texts)
            # the probe the converted-runtime tests rely on does see TensorFlow in a worker
            assert not any(no_tensorflow_in(pid) for pid in pool.worker_pids())
    assert info["runtime"] == "tensorflow" and info["requested"] == "auto"
    assert "StringSplitV2" in info["fallback"]
    fallbacks = [r for r in caplog.records if "runs the model on TensorFlow" in r.getMessage()]
    assert len(fallbacks) == 1 and "StringSplitV2" in fallbacks[0].getMessage()
    np.testing.assert_array_equal(got, in_process(path, texts)["embedding"])  # TF: identical


def test_auto_picks_the_fastest_measured_runtime(scaled):
    if not (installed("openvino", True) or installed("onnxruntime", True)):
        pytest.skip("no converted runtime is installed")
    inputs = sample("scaled", 9)
    with PredictionPool(scaled, workers=2, shard_size=8, runtime="auto") as pool:
        info = pool.runtime_info()
        timings = info["timings_rows_per_second"]
        assert "tensorflow" in timings and len(timings) >= 2 and info["time_rows"] == 8
        assert info["runtime"] == max(timings, key=lambda r: timings[r])
        assert_close(pool.predict(inputs), in_process(scaled, inputs))
    # The choice and its figures are cached with the artifacts: the second start measures nothing.
    again = resolve(scaled, runtime="auto", shard_size=8)
    assert again.info["timings_rows_per_second"] == timings


@pytest.mark.parametrize("runtime", CONVERTED)
def test_a_difference_past_the_tolerance_refuses_or_falls_back(runtime, scaled, caplog):
    first = resolve(scaled, runtime=runtime)
    worst = max(d["max_rel"] for d in first.info["differences"].values())
    if worst == 0:
        pytest.skip(f"{runtime} matched TensorFlow bit for bit on this model: nothing to exceed")
    with pytest.raises(ModelLoadError, match=r"output '(logits|features)' differs .* by up to"):
        resolve(scaled, runtime=runtime, tolerance=worst / 10)
    with caplog.at_level(logging.WARNING, logger="pool"):
        fallback = resolve(scaled, runtime="auto", tolerance=1e-30)
    assert fallback.runtime == "tensorflow" and "past the tolerance" in fallback.info["fallback"]


@pytest.mark.parametrize("runtime", [OPENVINO])
def test_a_corrupt_or_partial_cache_entry_is_rebuilt_never_loaded(runtime, models, caplog):
    path = models["multi_io"]
    entry = Path(resolve(path, runtime=runtime).artifact)
    weights = next(p for p in entry.iterdir() if p.name != MANIFEST and p.suffix == ".bin")
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated, as a crash mid-copy leaves it
    assert valid_manifest(entry) is None
    with caplog.at_level(logging.INFO, logger="pool"):
        again = resolve(path, runtime=runtime)
    assert Path(again.artifact) == entry and valid_manifest(entry) is not None
    assert weights.read_bytes() == good
    assert any("rebuilding the broken cache entry" in r.getMessage() for r in caplog.records)
    (entry / MANIFEST).unlink()  # partial: the manifest is written last
    with PredictionPool(path, workers=1, runtime=runtime) as pool:
        inputs = sample("multi_io", 7)
        assert_close(pool.predict(inputs), in_process(path, inputs))
    assert valid_manifest(entry) is not None


@pytest.mark.parametrize("runtime", CONVERTED)
def test_a_changed_savedmodel_invalidates_the_cache(runtime, tmp_path):
    path = tmp_path / "model"
    build_scaled(path, seed=1)
    before = resolve(str(path), runtime=runtime)
    shutil.rmtree(path)
    build_scaled(path, seed=2)  # same path, same signature, other weights
    after = resolve(str(path), runtime=runtime)
    assert after.artifact != before.artifact
    assert (
        read_manifest(after.artifact)["key"]["model"]
        != read_manifest(before.artifact)["key"]["model"]
    )
    inputs = sample("scaled", 5)
    with PredictionPool(str(path), workers=1, runtime=runtime) as pool:
        assert_close(pool.predict(inputs), in_process(str(path), inputs))


@pytest.mark.parametrize("runtime", [OPENVINO])
def test_two_pools_starting_at_once_convert_once(runtime, tmp_path, caplog):
    path = tmp_path / "model"
    build_scaled(path, seed=3)
    results: list = []
    with caplog.at_level(logging.INFO, logger="pool"):
        threads = [
            threading.Thread(target=lambda: results.append(resolve(str(path), runtime=runtime)))
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 2 and results[0].artifact == results[1].artifact
    conversions = [r for r in caplog.records if r.getMessage().startswith("converting ")]
    assert len(conversions) == 1


def test_runtime_options_are_validated():
    with pytest.raises(ValueError, match="runtime must be one of"):
        PredictionPool("unused", runtime="tflite")
    with pytest.raises(ValueError, match="precision must be one of"):
        PredictionPool("unused", runtime="openvino", precision="fp8")
    with pytest.raises(ValueError, match="precision='bf16' applies to runtime='openvino'"):
        PredictionPool("unused", runtime="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="runtime_tolerance must be a positive number"):
        PredictionPool("unused", runtime="openvino", runtime_tolerance=0)
    PredictionPool("unused", runtime="auto", cluster="tcp://127.0.0.1:1")  # accepted


def test_a_factory_model_runs_only_on_tensorflow():
    with pytest.raises(ModelLoadError, match="a factory callable can only run on TensorFlow"):
        resolve(lambda: None, runtime="openvino")
    assert resolve(lambda: None, runtime="auto").runtime == "tensorflow"


@pytest.mark.parametrize("runtime", [OPENVINO])
def test_converting_ahead_of_time_fills_the_cache_a_pool_uses(runtime, models, runtime_cache):
    import json
    import subprocess
    import sys

    path = models["multi_io"]
    done = subprocess.run(
        [sys.executable, "-m", "pool", "compile", path, "--runtime", runtime],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        env={**os.environ, "POOL_RUNTIME_CACHE": str(runtime_cache)},
    )
    report = json.loads(done.stdout)
    assert report["runtime"] == runtime and set(report["differences"]) == {"logits", "sum"}
    assert resolve(path, runtime=runtime).artifact == report["artifact"]


@pytest.mark.parametrize("runtime", CONVERTED)
def test_output_picks_one_output_of_a_converted_model(runtime, scaled):
    inputs = sample("scaled", 6)
    with PredictionPool(scaled, workers=1, runtime=runtime, output="logits") as pool:
        got = pool.predict(inputs)
    assert isinstance(got, np.ndarray)
    assert_close(got, in_process(scaled, inputs)["logits"])


@pytest.mark.parametrize("runtime", [OPENVINO])
def test_bf16_only_when_asked_with_its_difference_reported(runtime, scaled):
    f32 = resolve(scaled, runtime=runtime)
    bf16 = resolve(scaled, runtime=runtime, precision="bf16")
    assert bf16.artifact != f32.artifact  # precision is part of the key
    worst_f32 = max(d["max_rel"] for d in f32.info["differences"].values())
    worst_bf16 = max(d["max_rel"] for d in bf16.info["differences"].values())
    assert worst_f32 <= TOLERANCES["f32"] and worst_bf16 <= TOLERANCES["bf16"]
    assert bf16.info["tolerance"] == TOLERANCES["bf16"]
    inputs = sample("scaled", 5)
    with PredictionPool(scaled, workers=1, runtime=runtime, precision="bf16") as pool:
        assert pool.runtime_info()["precision"] == "bf16"
        got = pool.predict(inputs)
    want = in_process(scaled, inputs)
    for name in want:
        scale = float(np.max(np.abs(want[name])))
        assert_rows_equal(got[name], want[name], rtol=0, atol=TOLERANCES["bf16"] * scale)


@pytest.mark.parametrize("runtime", CONVERTED)
def test_concurrent_callers_combined_into_one_call_each_get_their_rows(runtime, scaled):
    calls = [sample("scaled", n) for n in (1, 3, 2, 5, 1, 4, 2, 3)]
    # a batch timeout makes the waiting shards combine: batch sizes vary from call to call
    with PredictionPool(scaled, workers=1, runtime=runtime, batch_timeout_micros=200_000) as pool:
        futures = [pool.submit(x) for x in calls]
        results = [f.result() for f in futures]
        stats = pool.stats()
    assert sum(s.batches for s in stats) < sum(s.shards for s in stats)  # some combined
    for got, x in zip(results, calls, strict=True):
        assert_close(got, in_process(scaled, x))


@pytest.mark.parametrize("runtime", [ONNXRUNTIME])
def test_recycled_workers_reload_the_artifact_and_cancelled_calls_never_run(runtime, scaled):
    """Memory recycling and cancellation keep their guarantees on a converted runtime: each
    replacement loads the artifact (never TensorFlow) and answers exactly its rows; a call
    cancelled while queued is dropped and the ones behind it are answered."""
    x = sample("scaled", 12)
    with PredictionPool(
        scaled, workers=1, shard_size=2, runtime=runtime, max_shards_per_worker=2
    ) as pool:
        got = pool.predict(x)
        inputs = [sample("scaled", 2) for _ in range(6)]
        queued = [pool.submit(one) for one in inputs]
        cancelled = [f.cancel() for f in queued[3:]]
        answered = [f.result(timeout=120) for f in queued[:3]]
        stats = pool.stats()
        assert all(no_tensorflow_in(pid) for pid in pool.worker_pids())
    assert_close(only(got), in_process(scaled, x))
    assert stats[0].shards == 6 + 3 + cancelled.count(False), stats  # cancelled never ran
    assert stats[0].restarts >= (stats[0].shards - 1) // 2, stats  # recycled every 2 shards
    assert len(answered) == 3 and any(cancelled)
    for one, result in zip(inputs, answered, strict=False):
        assert_close(only(result), in_process(scaled, one))
    assert all(f.cancelled() for f, c in zip(queued[3:], cancelled, strict=True) if c)


@pytest.mark.parametrize("runtime", CONVERTED)
def test_a_model_without_fixed_shapes_verifies_on_the_users_sample(runtime, tmp_path):
    path = build_scaled(tmp_path / "model", seed=4, side=None)  # images [N, ?, ?, 3]
    with pytest.raises(ModelLoadError, match="cannot synthesise input images"):
        resolve(path, runtime=runtime)
    given = sample("scaled", 6)
    inputs = sample("scaled", 7)
    with PredictionPool(path, workers=1, runtime=runtime, runtime_sample=given) as pool:
        info = pool.runtime_info()
        got = pool.predict(inputs)
    assert info["runtime"] == runtime and set(info["differences"]) == {"logits", "features"}
    assert_close(got, in_process(path, inputs))


@pytest.mark.parametrize("runtime", [ONNXRUNTIME])
def test_predict_on_the_command_line_takes_runtime(runtime, scaled, tmp_path, runtime_cache):
    """``python -m pool predict --runtime``: the shared pool options reach the pool; every row
    within the f32 tolerance of TensorFlow in-process, in order."""
    import subprocess
    import sys

    x = sample("scaled", 12)
    np.save(tmp_path / "in.npy", x)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pool", "predict", scaled),
            *("-i", str(tmp_path / "in.npy"), "-o", str(tmp_path / "out.npy")),
            *("--model-output", "logits", "--runtime", runtime, "--workers", "1", "-q"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "POOL_RUNTIME_CACHE": str(runtime_cache)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert_close(np.load(tmp_path / "out.npy"), in_process(scaled, x)["logits"])
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "pool",
            "predict",
            scaled,
            "-i",
            "x",
            "-o",
            "y",
            "--runtime",
            "nope",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "expected one of tensorflow" in refused.stderr, refused


@pytest.mark.parametrize("runtime", [OPENVINO])
def test_serve_takes_runtime_and_answers_like_tensorflow(runtime, scaled, runtime_cache):
    """``python -m pool serve --runtime``: a real server and a real HTTP client; the answers
    within the f32 tolerance of TensorFlow in-process, the runtime and its difference logged."""
    serve_helpers = pytest.importorskip("serve_helpers")
    x = sample("scaled", 5)
    server = serve_helpers.Server(scaled, "--runtime", runtime, "--workers", "1", "-v")
    try:
        answer = server.predict({"instances": x.tolist()})
        assert answer.status_code == 200, answer.text
        rows = answer.json()["predictions"]
        got = {name: np.asarray([row[name] for row in rows], np.float32) for name in rows[0]}
        assert_close(got, in_process(scaled, x))
        assert any(
            f"runtime {runtime} (asked: {runtime}); largest difference to TensorFlow" in line
            for line in server.lines
        ), server.stderr[-3000:]
        assert all(no_tensorflow_in(pid) for pid in server.worker_pids())
    finally:
        assert server.stop() == 0


def test_a_worker_that_cannot_see_the_artifact_says_where_it_must_be(tmp_path):
    """On a cluster the artifact is read from the runtime cache on the worker's machine: a
    missing or partial one is refused with what to do, never loaded."""
    from pool.messages import WorkerConfig
    from pool.runtimes import load

    config = WorkerConfig(
        model="/models/resnet",
        signature="serving_default",
        output=None,
        intra_op_threads=1,
        inter_op_threads=1,
        cpus=None,
        warmup_rows=1,
        parent_pid=os.getpid(),
        parent_create_time=0.0,
        runtime=OPENVINO,
        artifact=str(tmp_path / "missing"),
    )
    with pytest.raises(FileNotFoundError, match=r"POOL_RUNTIME_CACHE.*python -m pool compile"):
        load(config)
