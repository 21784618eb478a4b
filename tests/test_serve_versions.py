"""Versions, labels and several models in ``python -m pool serve`` (docs/serving.md, "Versions
and several models"): real servers in subprocesses, real HTTP clients, answers compared with
each version's model called in this process.

Two servers are shared by the tests of this module, which run in file order: ``base`` (a base
path polled every 0.2 s: a version added under load, a broken one, a half-written one) and
``configured`` (a model config file with two models, labels, and a reload of the file)."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import in_process
from serve_helpers import Server

from pool.errors import ModelLoadError
from pool.reference_models import build_affine
from pool.serve import model_config
from pool.serve.model_config import ConfigError, ModelSpec, VersionPolicy, parse_policy
from pool.serve.models import ModelNotFound, ModelRegistry, default_workers

X = np.arange(12, dtype=np.float32).reshape(3, 4) / 7.0
POLL = "0.2"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[int, str]:
    """Versions 1, 2, 3 of one model: same signature, weights drawn from seeds 1, 2, 3."""
    root = tmp_path_factory.mktemp("store")
    out = {}
    for seed in (1, 2, 3):
        build_affine(root / str(seed), seed)
        out[seed] = str(root / str(seed))
    return out


@pytest.fixture(scope="module")
def want(store) -> dict[int, np.ndarray]:
    """Each version's answer to ``X``, from the model called in this process."""
    return {seed: in_process(path, X)["y"] for seed, path in store.items()}


def which(rows: list, want: dict[int, np.ndarray]) -> int:
    """The version whose in-process answer equals ``rows`` (row by row), else fail."""
    got = np.asarray(rows, np.float32)
    matches = [v for v, w in want.items() if np.allclose(got, w, rtol=1e-5, atol=1e-6)]
    assert len(matches) == 1, f"the answer equals no single version's model: {got}"
    return matches[0]


def status(url: str) -> dict[str, tuple[str, str]]:
    answer = requests.get(url, timeout=30)
    assert answer.status_code == 200, answer.text
    return {
        e["version"]: (e["state"], e["status"]["error_message"])
        for e in answer.json()["model_version_status"]
    }


def wait_for(check, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# --- the config file and policies, no server ------------------------------------------------
def test_model_config_list_parses_without_tensorflow_and_refuses_what_it_cannot_do():
    specs = model_config.parse(
        """
        model_config_list {
          config {
            name: "a" base_path: "/m/a" model_platform: "tensorflow"
            model_version_policy { specific { versions: 2 versions: 1 } }
            version_labels { key: "stable" value: 1 }
            version_labels { key: "canary" value: 2 }
          }
          config { name: "b" base_path: "/m/b" model_version_policy { latest { num_versions: 2 } } }
          config { name: "c" base_path: "/m/c" model_version_policy { all {} } }
          config { name: "d" base_path: "/m/d" }
        }
        """
    )
    assert [(s.name, s.base_path, s.policy, s.labels) for s in specs] == [
        ("a", "/m/a", VersionPolicy("specific", versions=(1, 2)), {"stable": 1, "canary": 2}),
        ("b", "/m/b", VersionPolicy("latest", 2), {}),
        ("c", "/m/c", VersionPolicy("all"), {}),
        ("d", "/m/d", VersionPolicy("latest", 1), {}),
    ]
    assert VersionPolicy("latest", 2).select([3, 1, 7]) == [3, 7]
    assert VersionPolicy("specific", versions=(1, 9)).select([1, 2]) == [1]
    assert parse_policy("latest:3") == VersionPolicy("latest", 3)
    assert parse_policy("specific:2,1") == VersionPolicy("specific", versions=(1, 2))
    a = 'config { name: "a" base_path: "/x" '
    for bad, message in [
        (a + "logging_config {} }", "logging_config"),
        ('config { name: "a" }', "base_path is missing"),
        (a + 'model_platform: "pytorch" }', "pytorch"),
        (a + '} config { name: "a" base_path: "/y" }', "twice"),
    ]:
        with pytest.raises(ConfigError, match=message):
            model_config.parse(f"model_config_list {{ {bad} }}")
    with pytest.raises(ConfigError, match="at least one config"):
        model_config.parse("")
    with pytest.raises(ValueError, match="expected a version policy"):
        parse_policy("newest")


# --- the registry's rules, with stand-in pools (no worker, no TensorFlow) ------------------
class _FakePool:
    """Stands in for a PredictionPool: ``start`` fails for a version directory holding ``BAD``."""

    def __init__(self, path: str, workers: int = 1) -> None:
        self.path, self.workers, self.running = path, workers, False
        self.signature_name = "serving_default"

    def start(self) -> None:
        if (Path(self.path) / "BAD").exists():
            raise ModelLoadError(f"cannot load {self.path}")
        self.running = True

    def shutdown(self, kill: bool = False) -> None:
        self.running = False


def _version(root: Path, n: int, bad: bool = False) -> None:
    (root / str(n) / "variables").mkdir(parents=True)
    (root / str(n) / "variables" / "variables.index").write_bytes(b"i")
    (root / str(n) / "saved_model.pb").write_bytes(b"pb")
    if bad:
        (root / str(n) / "BAD").write_bytes(b"")


def test_registry_rules_failed_half_written_removed_versions_and_oversubscription(tmp_path, caplog):
    root = tmp_path / "m"
    _version(root, 1)
    spec = ModelSpec("m", str(root))
    registry = ModelRegistry([spec], lambda path, spec: _FakePool(path), poll_seconds=0)
    registry.start()

    def states() -> dict[str, str]:
        return {e["version"]: e["state"] for e in registry.status("m")["model_version_status"]}

    assert states() == {"1": "AVAILABLE"}
    _version(root, 2)
    registry.poll()  # seen once: not loaded yet (could be a copy in progress)
    assert states() == {"1": "AVAILABLE"} and registry.lookup("m").number == 1
    registry.poll()  # unchanged since the last poll: loaded, then version 1 unloaded
    assert states() == {"1": "END", "2": "AVAILABLE"}
    held = registry.acquire("m")
    assert held.number == 2
    registry.release(held)
    _version(root, 3, bad=True)
    registry.poll()
    registry.poll()
    assert states() == {"1": "END", "2": "AVAILABLE", "3": "END"}
    assert (
        "cannot load"
        in registry.status("m", 3)["model_version_status"][0]["status"]["error_message"]
    )
    registry.poll()  # a failed version is not tried again while its files are the same
    assert registry.lookup("m").number == 2
    shutil.rmtree(root / "2")  # the serving version deleted: version 1 (unchanged) comes back
    registry.poll()
    assert states() == {"1": "AVAILABLE", "2": "END", "3": "END"}
    with pytest.raises(ModelNotFound, match=r"Specific\(m, 2\)") as not_found:
        registry.lookup("m", 2)
    assert (not_found.value.code, not_found.value.http_status) == ("NOT_FOUND", 404)
    with pytest.raises(ModelNotFound, match="Unrecognized servable version label: x") as label:
        registry.lookup("m", label="x")
    assert (label.value.code, label.value.http_status) == ("INVALID_ARGUMENT", 400)
    registry.stop()
    assert states() == {"1": "END", "2": "END", "3": "END"}

    two = [ModelSpec("a", str(root)), ModelSpec("b", str(root))]
    registry = ModelRegistry(two, lambda path, spec: _FakePool(path, workers=64), poll_seconds=0)
    with caplog.at_level(logging.WARNING, logger="pool.serve"):
        registry.start()
    registry.stop()
    assert "128 workers for" in caplog.text and "a/1: 64, b/1: 64" in caplog.text
    assert default_workers(2, cores=2) == 1 and default_workers(3, cores=8) == 2
    assert default_workers(4, cores=2) == 1


def test_command_line_choices_reach_the_registry_and_mistakes_are_usage_errors(tmp_path, models):
    from pool.serve.server import build_registry

    root = tmp_path / "m"
    for n in (1, 2, 3):
        (root / str(n)).mkdir(parents=True)
        shutil.copy(Path(models["multi_io"]) / "saved_model.pb", root / str(n))
    registry = build_registry(str(root), None, None, "latest:2", 0.5, 0.0, {"workers": 1})
    (spec,) = registry.specs()
    assert (spec.name, spec.policy, registry.poll_seconds) == ("m", VersionPolicy("latest", 2), 0.5)
    one_savedmodel = build_registry(models["multi_io"], None, None, None, 1.0, 0.0, {})
    assert one_savedmodel is None
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "x" base_path: "{root}" }} }}')
    for args, message in [
        ((str(root), None, str(config), None), "either MODEL or --model_config_file"),
        ((None, None, None, None), "expected MODEL or --model_config_file"),
        ((models["multi_io"], None, None, "all"), "needs a base path"),
        ((str(root), None, None, "newest"), "expected a version policy"),
        ((str(root), None, None, None, 1.0, 0.0, {"signature": "nope"}), "expected signature"),
        ((str(root), None, None, None, 1.0, 0.0, {"workers": 0}), "workers"),
    ]:
        full = args if len(args) == 7 else (*args, 1.0, 0.0, {})
        with pytest.raises(ValueError, match=message):
            build_registry(*full)


# --- one base path, polled --------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("base") / "affine"
    root.mkdir()
    shutil.copytree(store[1], root / "1")
    server = Server(str(root), "--workers", "1", "--file-system-poll-wait-seconds", POLL, "-v")
    server.root = root  # type: ignore[attr-defined]
    yield server
    assert server.stop() == 0


def test_a_version_added_under_load_fails_no_request_and_moves_traffic(base, store, want):
    assert (base.name, base.version) == ("affine", "1")
    failures: list[str] = []
    seen: list[list[int]] = [[] for _ in range(4)]
    stop = threading.Event()

    def client(i: int) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                r = session.post(base.model_url(":predict"), json={"instances": X.tolist()})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                    continue
                seen[i].append(which(r.json()["predictions"], want))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(len(s) > 5 for s in seen), what="answers from version 1")
        # copied file by file while the server polls: loaded only once complete and unchanged
        shutil.copytree(store[2], base.root / "2")
        wait_for(lambda: all(s[-3:] == [2, 2, 2] for s in seen), what="traffic on version 2")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == []
    for answers in seen:  # each client saw version 1, then version 2, never back
        assert answers[0] == 1 and answers[-1] == 2
        switch = answers.index(2)
        assert set(answers[:switch]) == {1} and set(answers[switch:]) == {2}
    # the policy (latest 1) unloaded version 1 once version 2 was AVAILABLE
    wait_for(lambda: status(base.model_url())["1"][0] == "END", what="version 1 END")
    assert status(base.model_url()) == {"1": ("END", ""), "2": ("AVAILABLE", "")}
    pinned = requests.post(base.model_url("/versions/1:predict"), json={"instances": X.tolist()})
    assert pinned.status_code == 404
    assert "Servable not found for request: Specific(affine, 1)" in pinned.json()["error"]
    pinned = requests.post(base.model_url("/versions/2:predict"), json={"instances": X.tolist()})
    assert which(pinned.json()["predictions"], want) == 2
    assert "model 'affine' version 1: unloading" in base.stderr
    scrape = requests.get(f"{base.url}/monitoring/prometheus/metrics", timeout=30)
    assert scrape.ok and "pool_workers 1.0" in scrape.text  # the serving version's pool


def test_a_broken_or_half_written_version_never_replaces_the_working_one(base, want):
    half = base.root / "4" / "variables"  # no saved_model.pb yet: a copy in progress
    half.mkdir(parents=True)
    (half / "variables.data-00000-of-00001").write_bytes(b"\0" * 64)
    broken = base.root / "3"
    (broken / "variables").mkdir(parents=True)
    (broken / "variables" / "variables.index").write_bytes(b"not an index")
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    wait_for(lambda: "3" in status(base.model_url()), what="version 3 tried")
    wait_for(lambda: status(base.model_url())["3"][0] == "END", what="version 3 failed")
    state, error = status(base.model_url())["3"]
    assert error, "a failed version shows its error"
    assert status(base.model_url())["2"] == ("AVAILABLE", "")
    assert "4" not in status(base.model_url())
    answer = base.predict({"instances": X.tolist()})
    assert answer.status_code == 200 and which(answer.json()["predictions"], want) == 2
    assert "model 'affine' version 3 failed to load; version(s) 2 keep serving" in base.stderr
    one = requests.get(base.model_url("/versions/3"), timeout=30).json()["model_version_status"]
    assert [e["version"] for e in one] == ["3"] and one[0]["status"]["error_code"] == "UNKNOWN"


# --- a model config file: two models, labels, a reload --------------------------------------
CONFIG = """
model_config_list {{
  config {{
    name: "a" base_path: "{a}" model_platform: "tensorflow"
    model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}
    version_labels {{ key: "stable" value: 1 }}
    version_labels {{ key: "canary" value: 2 }}
  }}
  config {{ name: "{other}" base_path: "{b}" }}
}}
"""


@pytest.fixture(scope="module")
def configured(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for model, version, seed in (("a", 1, 1), ("a", 2, 2), ("a", 3, 3), ("b", 3, 3), ("c", 1, 1)):
        shutil.copytree(store[seed], root / model / str(version))
    config = root / "models.config"
    config.write_text(CONFIG.format(a=root / "a", b=root / "b", other="b"))
    server = Server(
        f"--model_config_file={config}",  # TF Serving's spelling; no MODEL
        "--workers",
        "1",
        "--model_config_file_poll_wait_seconds",
        "0.3",
        "--file_system_poll_wait_seconds",
        "0",
        "-v",
    )
    server.root = root  # type: ignore[attr-defined]
    yield server
    assert server.stop() == 0


def test_pinned_versions_labels_and_two_models_from_a_config_file(configured, want):
    url = configured.url

    def answer(path: str) -> int:
        r = requests.post(f"{url}/v1/models/{path}:predict", json={"instances": X.tolist()})
        assert r.status_code == 200, (path, r.text)
        return which(r.json()["predictions"], want)

    assert answer("a") == 2  # unpinned: the highest AVAILABLE version (3 is not in the policy)
    assert answer("a/versions/1") == 1 and answer("a/versions/2") == 2
    assert answer("a/labels/stable") == 1 and answer("a/labels/canary") == 2
    assert answer("b") == 3
    assert status(f"{url}/v1/models/a") == {"1": ("AVAILABLE", ""), "2": ("AVAILABLE", "")}
    assert status(f"{url}/v1/models/a/labels/stable") == {"1": ("AVAILABLE", "")}
    meta = requests.get(f"{url}/v1/models/a/labels/stable/metadata", timeout=30).json()
    assert meta["model_spec"]["version"] == "1"
    v2 = requests.get(f"{url}/v2/models/a/versions/1", timeout=30).json()
    assert v2["name"] == "a" and v2["versions"] == ["1"]
    for path, code, message in [
        ("a/versions/3", 404, "Servable not found for request: Specific(a, 3)"),
        ("a/labels/nope", 400, "Unrecognized servable version label: nope"),
        ("b/labels/stable", 400, "Unrecognized servable version label: stable"),
        ("zzz", 404, "Servable not found for request: Latest(zzz); this server serves 'a', 'b'"),
    ]:
        r = requests.post(f"{url}/v1/models/{path}:predict", json={"instances": X.tolist()})
        assert (r.status_code, message in r.json()["error"]) == (code, True), (path, r.text)


def test_grpc_finds_versions_and_labels_through_the_same_registry(configured, want):
    """TF Serving's gRPC client: ``model_spec.version`` / ``version_label`` pick the version,
    ``GetModelStatus`` lists every version, unknown ones get TF Serving's codes."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import (
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    channel = grpc.insecure_channel(configured.grpc_address)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    def predict(name: str, version: int | None = None, label: str | None = None):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        if label is not None:
            request.model_spec.version_label = label
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(X))
        return stub.Predict(request, 60)

    def answer(*args, **kwargs) -> tuple[int, int]:
        response = predict(*args, **kwargs)
        rows = tf.make_ndarray(next(iter(response.outputs.values()))).tolist()
        return which(rows, want), response.model_spec.version.value

    assert answer("a") == (2, 2)
    assert answer("a", version=1) == (1, 1)
    assert answer("a", label="stable") == (1, 1) and answer("a", label="canary") == (2, 2)
    assert answer("b") == (3, 3)
    for kwargs, code, message in [
        ({"name": "a", "version": 3}, grpc.StatusCode.NOT_FOUND, "Specific(a, 3)"),
        ({"name": "a", "label": "nope"}, grpc.StatusCode.INVALID_ARGUMENT, "label: nope"),
        ({"name": "zzz"}, grpc.StatusCode.NOT_FOUND, "Latest(zzz)"),
    ]:
        with pytest.raises(grpc.RpcError) as failed:
            predict(**kwargs)
        assert failed.value.code() == code and message in failed.value.details(), kwargs
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "a"
    got = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status, 30)
    states = {s.version: s.state for s in got.model_version_status}
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert states == {1: available, 2: available}
    channel.close()


def test_a_config_reload_adds_and_removes_models_without_a_restart(configured, want):
    url, root = configured.url, configured.root
    config = root / "models.config"
    config.write_text(
        "# b removed, c added\n" + CONFIG.format(a=root / "a", b=root / "c", other="c")
    )

    def served(name: str) -> int:
        return requests.get(f"{url}/v1/models/{name}", timeout=30).status_code

    def available(name: str) -> bool:
        r = requests.get(f"{url}/v1/models/{name}", timeout=30)
        return r.ok and r.json()["model_version_status"][0]["state"] == "AVAILABLE"

    wait_for(lambda: available("c") and served("b") == 404, what="the reloaded config")
    r = requests.post(f"{url}/v1/models/c:predict", json={"instances": X.tolist()})
    assert which(r.json()["predictions"], want) == 1
    assert requests.post(f"{url}/v1/models/a/versions/2:predict", json={"instances": X.tolist()}).ok
    config.write_text("model_config_list { config { name: 'oops' } }")  # does not parse
    time.sleep(1.0)
    assert served("a") == 200 and served("c") == 200  # the running models are kept
    assert "model config not reloaded, the running models are kept" in configured.stderr
