"""``python -m pool serve``: a real server in a subprocess on a free loopback port, real HTTP
clients (``requests``), answers compared row by row with the model called in this process.

One server per configuration, started once per module (TensorFlow start-up is heavy); the
SIGTERM tests start their own. Every server must exit 0 on its signal and leave no process.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import psutil
import pytest
import requests
from conftest import assert_rows_equal, in_process
from serve_helpers import REPO, Server, metric, sigkill_a_worker_under_load, wait_idle

pytestmark = pytest.mark.timeout(600)

RNG = np.random.default_rng(11)


def images(rows: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, side, side, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def mobilenet(models):
    server = Server(models["mobilenet_v2"], "--workers", "1")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def cnn(models):
    server = Server(
        models["small_cnn"],
        *("--workers", "2", "--model-name", "cnn", "--max-body-bytes", "2000000"),
        *("-vv", "--log-json"),
    )
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def text(models):
    server = Server(models["text_embedding"], "--workers", "1", "--model-name", "text")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def multi(models, tmp_path_factory):
    """multi_io laid out as TF Serving's model base path: ``mymodel/7`` -> name and version."""
    base = tmp_path_factory.mktemp("layout") / "mymodel"
    base.mkdir()
    os.symlink(models["multi_io"], base / "7")
    server = Server(str(base), "--workers", "1")
    yield server
    assert server.stop(signal.SIGINT) == 0  # Ctrl-C drains and exits 0 as SIGTERM does


@pytest.fixture(scope="module")
def checked(models):
    server = Server(
        models["multi_io"], "--workers", "1", "--signature", "checked", "--model-name", "checked"
    )
    yield server
    assert server.stop() == 0


# --- TF Serving's own client code ----------------------------------------------------------
def test_tf_serving_client_code_verbatim_on_an_image_model(mobilenet, models):
    test_images = images(3, 224)
    # The client code TF Serving's REST tutorial and the seed's Example 3 use, unchanged:
    data = json.dumps({"signature_name": "serving_default", "instances": test_images.tolist()})
    headers = {"content-type": "application/json"}
    json_response = requests.post(
        f"{mobilenet.url}/v1/models/{mobilenet.name}:predict", data=data, headers=headers
    )
    predictions = json.loads(json_response.text)["predictions"]

    want = in_process(models["mobilenet_v2"], test_images)["probabilities"]
    assert json_response.status_code == 200
    assert json_response.headers["content-type"] == "application/json"
    assert_rows_equal(np.asarray(predictions, dtype=np.float32), want, rtol=1e-4, atol=1e-6)

    data = test_images[:1].tolist()  # the one-liner
    predictions = requests.post(
        f"{mobilenet.url}/v1/models/{mobilenet.name}:predict", json={"instances": data}
    ).json()["predictions"]
    assert_rows_equal(np.asarray(predictions, dtype=np.float32), want[:1], rtol=1e-4, atol=1e-6)


def test_status_and_metadata_as_tf_serving_writes_them(mobilenet, models):
    assert mobilenet.name == Path(models["mobilenet_v2"]).name and mobilenet.version == "1"
    assert urlsplit(mobilenet.url).hostname == "127.0.0.1"  # loopback unless told otherwise
    status = requests.get(mobilenet.model_url()).json()
    assert status == {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    assert requests.get(mobilenet.model_url("/versions/1")).json() == status
    meta = requests.get(mobilenet.model_url("/metadata")).json()
    assert meta["model_spec"] == {"name": mobilenet.name, "signature_name": "", "version": "1"}
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    dims = [d["size"] for d in sig["inputs"]["images"]["tensor_shape"]["dim"]]
    assert dims == ["-1", "224", "224", "3"] and sig["inputs"]["images"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in sig["outputs"]["probabilities"]["tensor_shape"]["dim"]] == [
        "-1",
        "1000",
    ]
    assert sig["method_name"] == "tensorflow/serving/predict"


# --- formats ------------------------------------------------------------------------------
def test_columnar_and_row_formats_answer_the_same_rows(cnn, models):
    x = images(5, 32, seed=1)
    want = in_process(models["small_cnn"], x)["probabilities"]
    rows = cnn.predict({"instances": x.tolist()})
    columns = cnn.predict({"inputs": x.tolist(), "signature_name": "serving_default"})
    named = cnn.predict({"inputs": {"images": x.tolist()}})
    assert rows.status_code == columns.status_code == named.status_code == 200
    assert_rows_equal(np.asarray(rows.json()["predictions"], np.float32), want)
    assert_rows_equal(np.asarray(columns.json()["outputs"], np.float32), want)
    assert_rows_equal(np.asarray(named.json()["outputs"], np.float32), want)


def test_gzip_request_bodies(cnn, models):
    x = images(3, 32, seed=4)
    want = in_process(models["small_cnn"], x)["probabilities"]
    url, gz = cnn.model_url(":predict"), {"Content-Encoding": "gzip"}
    body = gzip.compress(json.dumps({"instances": x.tolist()}).encode())
    response = requests.post(url, data=body, headers=gz, timeout=60)
    assert response.status_code == 200, response.text
    assert_rows_equal(np.asarray(response.json()["predictions"], np.float32), want)
    bomb = gzip.compress(b" " * 3_000_000)  # small on the wire, past --max-body-bytes inflated
    assert len(bomb) < 100_000
    for data, headers, status, message in [
        (bomb, gz, 413, "once decompressed"),
        (b"not gzip", gz, 400, "not gzip data"),
        (body[: len(body) // 2], gz, 400, "truncated"),
        (body, {"Content-Encoding": "br"}, 415, "expected gzip or none"),
    ]:
        response = requests.post(url, data=data, headers=headers, timeout=60)
        assert response.status_code == status, response.text
        assert message in response.json()["error"]


def test_multi_input_multi_output_in_both_formats(multi, models):
    a = RNG.normal(size=(4, 4)).astype(np.float32)
    b = RNG.integers(-5, 5, size=(4, 3)).astype(np.int32)
    want = in_process(models["multi_io"], {"a": a, "b": b})
    rows = multi.predict(
        {"instances": [{"a": a[i].tolist(), "b": b[i].tolist()} for i in range(4)]}
    )
    assert rows.status_code == 200, rows.text
    predictions = rows.json()["predictions"]
    assert all(set(p) == {"logits", "sum"} for p in predictions)
    got = {k: np.asarray([p[k] for p in predictions], np.float32) for k in want}
    assert_rows_equal(got, want)
    columns = multi.predict({"inputs": {"a": a.tolist(), "b": b.tolist()}})
    outputs = columns.json()["outputs"]
    assert_rows_equal({k: np.asarray(v, np.float32) for k, v in outputs.items()}, want)


def test_tf_serving_layout_gives_name_and_version(multi):
    assert (multi.name, multi.version) == ("mymodel", "7")
    body = {"instances": [{"a": [0, 1, 2, 3], "b": [1, 1, 1]}]}
    assert requests.post(multi.model_url("/versions/7:predict"), json=body).status_code == 200
    wrong = requests.post(multi.model_url("/versions/1:predict"), json=body)
    assert wrong.status_code == 404 and "serves version 7" in wrong.json()["error"]


def test_strings_unicode_empty_and_b64(text, models):
    texts = ["héllo wörld ✓", "", "日本語 テキスト", "  ", "the quick brown fox", "ÅÄÖ åäö"]
    want = in_process(models["text_embedding"], np.array(texts, dtype=object))["embedding"]
    for body in ({"instances": texts}, {"inputs": texts}, {"inputs": {"text": texts}}):
        response = text.predict(body)
        assert response.status_code == 200, response.text
        key = "predictions" if "instances" in body else "outputs"
        assert_rows_equal(np.asarray(response.json()[key], np.float32), want)
    b64 = [{"b64": base64.b64encode(t.encode()).decode()} for t in texts]
    response = text.predict({"instances": b64})
    assert_rows_equal(np.asarray(response.json()["predictions"], np.float32), want)


def test_open_inference_protocol(cnn, text, multi, models):
    x = images(2, 32, seed=2)
    want = in_process(models["small_cnn"], x)["probabilities"]
    base = f"{cnn.url}/v2/models/{cnn.name}"
    for data in (x.reshape(-1).tolist(), x.tolist()):  # flat and nested data
        body = {
            "id": "q1",
            "inputs": [
                {"name": "images", "shape": list(x.shape), "datatype": "FP32", "data": data}
            ],
        }
        answer = requests.post(f"{base}/infer", json=body).json()
        assert answer["model_name"] == "cnn" and answer["id"] == "q1"
        (out,) = answer["outputs"]
        assert out["name"] == "probabilities" and out["datatype"] == "FP32"
        assert out["shape"] == [2, 10]
        assert_rows_equal(np.asarray(out["data"], np.float32).reshape(2, 10), want)
    assert requests.get(f"{cnn.url}/v2/health/live").json() == {"live": True}
    assert requests.get(f"{cnn.url}/v2/health/ready").json() == {"ready": True}
    assert requests.get(f"{base}/ready").json() == {"name": "cnn", "ready": True}
    meta = requests.get(base).json()
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 32, 32, 3]}]
    assert requests.get(f"{cnn.url}/v2").json()["name"] == "pool"

    texts = ["ünïcode", ""]
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}]}
    answer = requests.post(f"{text.url}/v2/models/text/infer", json=body).json()
    want = in_process(models["text_embedding"], np.array(texts, dtype=object))["embedding"]
    assert_rows_equal(np.asarray(answer["outputs"][0]["data"], np.float32).reshape(2, 64), want)

    a, b = np.ones((1, 4), np.float32), np.arange(3, dtype=np.int32).reshape(1, 3)
    body = {
        "inputs": [
            {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": a.ravel().tolist()},
            {"name": "b", "shape": [1, 3], "datatype": "INT32", "data": b.ravel().tolist()},
        ],
        "outputs": [{"name": "sum"}],
    }
    answer = requests.post(f"{multi.url}/v2/models/mymodel/versions/7/infer", json=body).json()
    want = in_process(models["multi_io"], {"a": a, "b": b})["sum"]
    assert [o["name"] for o in answer["outputs"]] == ["sum"]
    assert_rows_equal(np.asarray(answer["outputs"][0]["data"], np.float32).reshape(1, 1), want)


# --- errors ---------------------------------------------------------------------------------
def _errors(server: Server):
    good = images(1, 32).tolist()
    name, url = server.name, server.url
    predict = f"{url}/v1/models/{name}:predict"
    return [
        ("POST", predict, b"{not json", 400, "JSON Parse error"),
        ("POST", predict, b"[1, 2]", 400, "expected a JSON object"),
        ("POST", predict, {"instances": good, "inputs": good}, 400, "got both"),
        ("POST", predict, {"signature_name": "serving_default"}, 400, "'instances'"),
        ("POST", predict, {"instances": []}, 400, "no values in the 'instances' list"),
        (
            "POST",
            predict,
            {"instances": [good[0], images(1, 31).tolist()[0]]},
            400,
            "rows must all have",
        ),
        (
            "POST",
            predict,
            {"instances": images(1, 16).tolist()},
            400,
            "Expected signature: {images: float32[None, 32, 32, 3]}",
        ),
        ("POST", predict, {"instances": [[["a"] * 3] * 32] * 32}, 400, "expected float32 values"),
        (
            "POST",
            f"{url}/v1/models/other:predict",
            {"instances": good},
            404,
            f"this server serves '{name}'",
        ),
        (
            "POST",
            f"{url}/v1/models/{name}/versions/9:predict",
            {"instances": good},
            404,
            "serves version 1",
        ),
        (
            "POST",
            f"{url}/v1/models/{name}/labels/stable:predict",
            {"instances": good},
            400,
            "Unrecognized servable version label: stable",
        ),
        (
            "POST",
            predict,
            {"signature_name": "other", "instances": good},
            404,
            "signature 'other' not found: this server serves signature 'serving_default'",
        ),
        ("GET", f"{url}/v1/models/other", None, 404, "this server serves"),
        ("POST", f"{url}/v1/models/{name}:classify", {"examples": []}, 501, "not implemented"),
        ("POST", f"{url}/v1/models/{name}:regress", {"examples": []}, 501, "not implemented"),
        ("GET", predict, None, 400, "Malformed request: GET"),
        ("POST", f"{url}/v1/models/{name}:explode", {}, 400, "Malformed request"),
        ("GET", f"{url}/v1/elsewhere", None, 400, "Malformed request"),
        ("POST", predict, b"x" * 3_000_000, 413, "expected at most 2000000 bytes"),
        (
            "POST",
            f"{url}/v2/models/{name}/infer",
            {"inputs": [{"name": "images", "shape": [1], "datatype": "FP64", "data": [1]}]},
            400,
            "expected datatype FP32",
        ),
        ("POST", f"{url}/v2/models/other/infer", {"inputs": []}, 404, "this server serves"),
        ("GET", f"{url}/nowhere", None, 404, "Not Found"),
        ("PUT", f"{url}/v2/models/{name}", None, 405, "Method Not Allowed"),
        ("POST", f"{url}/v2/models/{name}", {}, 405, "POST is not allowed"),
    ]


def test_every_error_has_its_status_and_an_error_body_and_the_server_still_answers(cnn, models):
    for method, url, body, status, message in _errors(cnn):
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        response = requests.request(method, url, data=data, timeout=60)
        where = f"{method} {url} -> {response.status_code} {response.text[:300]}"
        assert response.status_code == status, where
        assert response.headers["content-type"] == "application/json", where
        assert set(response.json()) == {"error"} and message in response.json()["error"], where
    x = images(2, 32, seed=3)
    response = cnn.predict({"instances": x.tolist()})
    assert response.status_code == 200
    want = in_process(models["small_cnn"], x)["probabilities"]
    assert_rows_equal(np.asarray(response.json()["predictions"], np.float32), want)


def _deep(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def _v2(shape, data="[]", datatype='"FP32"', name='"images"') -> str:
    """A V2 infer body with its parts as JSON text (a list ``shape`` is encoded)."""
    shape = shape if isinstance(shape, str) else json.dumps(shape)
    tensor = f'{{"name": {name}, "shape": {shape}, "datatype": {datatype}, "data": {data}}}'
    return f'{{"inputs": [{tensor}]}}'


GZ = {"Content-Encoding": "gzip"}
#: (server fixture, URL suffix after /v1/models/NAME or /v2/models/NAME, body, headers, status,
#: part of the message): every malformed request is a 4xx with TF Serving's error body.
MALFORMED = [
    ("cnn", ":predict", b"[" * 100_000, {}, 400, "nested too deeply"),
    ("cnn", ":predict", '{"instances": ' + _deep(5000) + "}", {}, 400, "nested too deeply"),
    ("cnn", ":predict", '{"instances": ' + _deep(900) + "}", {}, 400, "at most 64 levels"),
    ("cnn", ":predict", b'{"instances": [' + b"1" * 5000 + b"]}", {}, 400, "JSON Parse error"),
    ("cnn", ":predict", b'{"instances": [[1, 2', {}, 400, "JSON Parse error"),
    ("cnn", ":predict", b"", {}, 400, "the document is empty"),
    ("cnn", ":predict", b'"instances"', {}, 400, "expected a JSON object"),
    ("cnn", ":predict", b"42", {}, 400, "expected a JSON object"),
    ("cnn", ":predict", b"null", {}, 400, "expected a JSON object"),
    ("cnn", ":predict", b'{"instances": "\xff"}', {}, 400, "not UTF-8"),
    ("cnn", ":predict", {"instances": 5}, {}, 400, "expected 'instances' to be a list"),
    ("cnn", ":predict", {"instances": [None]}, {}, 400, "expected float32 values"),
    ("cnn", ":predict", {"instances": [True]}, {}, 400, "true/false"),
    ("cnn", ":predict", {"inputs": {"images": "x"}}, {}, 400, "expected float32 values"),
    ("cnn", ":predict", {"inputs": {"wrong": [1]}}, {}, 400, "expected exactly the input names"),
    ("cnn", ":predict", {"signature_name": 5, "instances": [1]}, {}, 400, "must be a string"),
    ("cnn", ":predict", b"not gzip", GZ, 400, "not gzip data"),
    ("cnn", ":predict", gzip.compress(b'{"instances": [1]}')[:-12], GZ, 400, "truncated"),
    ("cnn", ":predict", gzip.compress(b"[" * 100_000), GZ, 400, "nested too deeply"),
    ("cnn", ":predict", b"{}", {"Content-Encoding": "br"}, 415, "expected gzip or none"),
    ("text", ":predict", {"instances": [{"b64": "!!!"}]}, {}, 400, "not valid base64"),
    ("text", ":predict", {"instances": [{"b64": 5}]}, {}, 400, "expected exactly the input"),
    ("text", ":predict", '{"instances": ' + _deep(900, '"a"') + "}", {}, 400, "at most 64"),
    ("text", ":predict", {"instances": ["a", ["b"]]}, {}, 400, "expected a string or"),
    ("cnn", "/infer", _v2([2**40, 2**40]), {}, 400, "holds 1208925819614629174706176 values"),
    ("cnn", "/infer", _v2([2**62, 4], "[1.0]"), {}, 400, "'data' has 1"),
    ("cnn", "/infer", _v2([10**30], "[1.0]"), {}, 400, "'data' has 1"),
    ("cnn", "/infer", _v2([0, 2**62]), {}, 400, "cannot use 'shape'"),
    ("cnn", "/infer", _v2([1] * 65, "[1.0]"), {}, 400, "at most 64 sizes"),
    ("cnn", "/infer", _v2("[1.5]"), {}, 400, "a list of sizes >= 0"),
    ("cnn", "/infer", _v2("[-1]"), {}, 400, "a list of sizes >= 0"),
    ("cnn", "/infer", _v2('"abc"'), {}, 400, "a list of sizes >= 0"),
    ("cnn", "/infer", _v2([1], "[1.0]", datatype="5"), {}, 400, "expected datatype FP32"),
    ("cnn", "/infer", _v2([1], _deep(900)), {}, 400, "nested more than 64 levels"),
    ("cnn", "/infer", _v2([1], '"abc"'), {}, 400, "expected 'data' to be a list"),
    ("cnn", "/infer", _v2([2], "[1, [2]]"), {}, 400, "mixes lists and values"),
    ("cnn", "/infer", _v2([1], "[1]", name="5"), {}, 400, "expected a string 'name'"),
    ("cnn", "/infer", {"inputs": 5}, {}, 400, "non-empty list of tensors"),
    ("cnn", "/infer", {"inputs": [5]}, {}, 400, "expected an object"),
    ("cnn", "/infer", {"id": 5, "inputs": []}, {}, 400, "'id' must be a string"),
    ("cnn", "/infer", b"[1]", {}, 400, "expected a JSON object"),
    ("cnn", "/infer", b"[" * 100_000, {}, 400, "nested too deeply"),
]


@pytest.mark.parametrize(
    "fixture, suffix, body, headers, status, message",
    MALFORMED,
    ids=[f"{i}-{m[0]}{m[1]}-{m[5]}" for i, m in enumerate(MALFORMED)],
)
def test_every_malformed_request_is_a_4xx_with_tf_servings_error_body(
    request, fixture, suffix, body, headers, status, message
):
    server = request.getfixturevalue(fixture)
    base = f"/v2/models/{server.name}" if suffix == "/infer" else f"/v1/models/{server.name}"
    if isinstance(body, str):
        data = body.encode()
    else:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = requests.post(server.url + base + suffix, data=data, headers=headers, timeout=60)
    where = f"{response.status_code} {response.text[:300]}"
    assert response.status_code == status, where
    assert response.headers["content-type"] == "application/json", where
    assert set(response.json()) == {"error"} and message in response.json()["error"], where
    assert server.process.poll() is None
    good = server.predict(
        {"instances": images(1, 32).tolist()} if fixture == "cnn" else {"instances": ["ok"]}
    )
    assert good.status_code == 200, good.text


def test_client_mistakes_log_below_error_and_server_faults_at_error(cnn):
    """A 501 (:classify) or a 400 is the client's mistake: INFO, with the message; never
    ERROR, which is for the server's own faults."""
    seen = len(cnn.lines)  # only what these two requests log
    mark = f"marker-{time.monotonic_ns()}"
    assert requests.post(cnn.model_url(":classify"), json={mark: 1}).status_code == 501
    assert cnn.predict({"instances": [mark]}).status_code == 400
    deadline = time.monotonic() + 10
    while True:
        records = [json.loads(line) for line in cnn.lines[seen:] if line.startswith("{")]
        mine = [r for r in records if r["logger"] == "pool.serve"]
        if len(mine) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [r["level"] for r in mine] == ["INFO", "INFO"], mine
    assert "-> 501" in mine[0]["message"] and ":classify" in mine[0]["message"]
    assert "-> 400" in mine[1]["message"] and mark in mine[1]["message"]
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")], records


def test_a_model_that_raises_on_the_input_is_400_and_the_server_goes_on(checked, models):
    good = RNG.random((3, 4), dtype=np.float32)
    response = checked.predict({"instances": good.tolist()})
    assert response.status_code == 200, response.text
    want = in_process(models["multi_io"], {"a": good}, signature="checked")["checked"]
    assert_rows_equal(np.asarray(response.json()["predictions"], np.float32), want)
    bad = checked.predict({"instances": (-good).tolist()})
    assert bad.status_code == 400, bad.text
    assert "InvalidArgumentError" in bad.json()["error"] and "a < 0" in bad.json()["error"]
    assert "Traceback" not in bad.json()["error"]  # the worker's traceback stays in the log
    meta = requests.get(checked.model_url("/metadata")).json()
    assert list(meta["metadata"]["signature_def"]["signature_def"]) == ["checked"]
    again = checked.predict({"instances": good.tolist()})
    assert_rows_equal(np.asarray(again.json()["predictions"], np.float32), want)


# --- load -----------------------------------------------------------------------------------
def test_64_concurrent_clients_each_get_their_own_rows(cnn, models):
    clients, requests_each = 64, 3
    inputs = {
        (c, r): images(1 + (c + r) % 3, 32, seed=1000 + 10 * c + r)
        for c in range(clients)
        for r in range(requests_each)
    }
    start = threading.Barrier(clients)

    def client(c: int) -> list[tuple[int, int, int, list]]:
        session = requests.Session()
        start.wait()
        out = []
        for r in range(requests_each):
            body = {"instances": inputs[c, r].tolist()}
            response = session.post(cnn.model_url(":predict"), json=body, timeout=300)
            out.append((c, r, response.status_code, response.json().get("predictions")))
        return out

    with ThreadPoolExecutor(clients) as executor:
        answers = [a for result in executor.map(client, range(clients)) for a in result]
    stacked = np.concatenate([inputs[c, r] for c, r, _, _ in answers])
    want = in_process(models["small_cnn"], stacked)["probabilities"]
    offset = 0
    for c, r, status, predictions in answers:
        assert status == 200, (c, r)
        rows = len(inputs[c, r])
        assert_rows_equal(np.asarray(predictions, np.float32), want[offset : offset + rows])
        offset += rows


def test_metrics_count_what_was_sent(cnn):
    before = cnn.metrics()
    sent_rows = 0
    for rows in (1, 2, 3, 1):
        assert cnn.predict({"instances": images(rows, 32).tolist()}).status_code == 200
        sent_rows += rows
    assert cnn.predict({"instances": []}).status_code == 400
    assert cnn.predict({"instances": images(1, 8).tolist()}).status_code == 400
    assert requests.get(f"{cnn.url}/v1/models/nope").status_code == 404
    after = cnn.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("pool_serve_requests_total", api="v1_predict", code="200") == 4
    assert delta("pool_serve_requests_total", api="v1_predict", code="400") == 2
    assert delta("pool_serve_requests_total", api="v1_status", code="404") == 1
    assert delta("pool_serve_request_seconds_count", api="v1_predict") == 6
    assert delta("pool_serve_request_rows_sum", api="v1_predict") == sent_rows
    assert delta("pool_serve_request_rows_count", api="v1_predict") == 4
    assert delta("pool_model_rows_total") == sent_rows  # the refused requests never ran
    assert 1 <= delta("pool_model_calls_total") <= sent_rows  # requests are split and combined
    assert metric(after, "pool_workers") == 2
    assert metric(after, "pool_queued_requests") == 0
    assert metric(after, "pool_serve_requests_in_flight") == 0
    assert ("pool_worker_restarts_total", (("worker", "0"),)) in after


def test_access_log_is_structured(cnn):
    assert cnn.predict({"instances": images(2, 32).tolist()}).status_code == 200
    deadline = time.monotonic() + 10
    records: list[dict] = []
    while time.monotonic() < deadline:
        records = [json.loads(line) for line in cnn.lines if line.startswith("{")]
        if any(r.get("status") == 200 and r.get("rows") == 2 for r in records):
            break
        time.sleep(0.1)
    access = [r for r in records if r["logger"] == "pool.serve.access"]
    assert any(
        r["status"] == 200 and r["rows"] == 2 and r["path"] == f"/v1/models/{cnn.name}:predict"
        for r in access
    ), access[-5:]
    assert all({"time", "level", "message", "method", "seconds", "model"} <= set(r) for r in access)
    assert any(r["logger"] == "pool.serve" and r.get("url") == cnn.url for r in records)


def test_a_worker_sigkilled_under_load_fails_no_request(cnn, models):
    def make_client(seed: int):
        session = requests.Session()

        def send(n: int) -> tuple[np.ndarray, list]:
            x = images(1 + n % 4, 32, seed=seed * 1000 + n)
            response = session.post(cnn.model_url(":predict"), json={"instances": x.tolist()})
            assert response.status_code == 200, f"{response.status_code} {response.text[:200]}"
            return x, response.json()["predictions"]

        return send

    answered = sigkill_a_worker_under_load(cnn, make_client)
    stacked = np.concatenate([x for x, _ in answered])
    want = in_process(models["small_cnn"], stacked)["probabilities"]
    got = np.concatenate([np.asarray(p, np.float32) for _, p in answered])
    assert_rows_equal(got, want)


# --- limits: deadline, overload, disconnect ----------------------------------------------------
@pytest.fixture(scope="module")
def limited(models):
    """A lone request waits up to 3 s for company before its batch is sent (batch timeout), so
    requests stay queued long enough to pass their 1 s deadline or fill the queue."""
    server = Server(
        models["text_embedding"],
        *("--workers", "1", "--model-name", "limited", "--max-batch-rows", "4"),
        *("--batch-timeout-micros", "3000000", "--max-queued-requests", "2"),
        *("--request-timeout", "1"),
    )
    yield server
    assert server.stop() == 0


def test_a_request_past_its_deadline_is_504_and_dropped_from_the_queue(limited, models):
    before = wait_idle(limited)
    started = time.monotonic()
    late = limited.predict({"instances": ["never computed"]})
    assert late.status_code == 504, late.text
    assert "deadline exceeded" in late.json()["error"] and "1.0 s" in late.json()["error"]
    assert 0.9 < time.monotonic() - started < 2.9  # answered at its deadline, not the batch's
    time.sleep(3.5)  # past the batch timeout: had it stayed queued, it would have run by now
    after = wait_idle(limited)
    assert metric(after, "pool_model_rows_total") == metric(before, "pool_model_rows_total")
    full = ["a", "b", "c", "d"]  # a full batch (--max-batch-rows 4) goes at once
    response = limited.predict({"instances": full})
    assert response.status_code == 200, response.text
    want = in_process(models["text_embedding"], np.array(full, dtype=object))["embedding"]
    assert_rows_equal(np.asarray(response.json()["predictions"], np.float32), want)


def test_overload_is_refused_at_once_with_503_and_retry_after(limited):
    wait_idle(limited)
    with ThreadPoolExecutor(2) as executor:
        waiting = [executor.submit(limited.predict, {"instances": [f"w{i}"]}) for i in range(2)]
        deadline = time.monotonic() + 5
        while metric(limited.metrics(), "pool_queued_requests") < 2:
            assert time.monotonic() < deadline, "the two requests never queued"
            time.sleep(0.02)
        started = time.monotonic()
        refused = limited.predict({"instances": ["one too many"]})
        refused_after = time.monotonic() - started
        statuses = sorted(f.result().status_code for f in waiting)
    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"] == "1"
    assert "overloaded" in refused.json()["error"] and "max_queued_requests" in refused.text
    assert refused_after < 0.9  # refused at once, not at the deadline
    assert statuses == [504, 504]
    wait_idle(limited)


def test_a_client_that_disconnects_is_dropped_from_the_queue(limited):
    before = wait_idle(limited)
    with pytest.raises(requests.exceptions.Timeout):
        limited.predict({"instances": ["gone"]}, timeout=0.3)  # the client gives up, closes
    time.sleep(3.5)
    after = wait_idle(limited)
    assert metric(after, "pool_model_rows_total") == metric(before, "pool_model_rows_total")
    gone = metric(after, "pool_serve_requests_total", code="499") - metric(
        before, "pool_serve_requests_total", code="499"
    )
    assert gone == 1


# --- what one client can make the server hold: requests, parse memory, read time --------------
GUARD = {"max_concurrent": 3, "max_parse_bytes": 1_000_000, "body_timeout": 10.0}


@pytest.fixture(scope="module")
def guarded(models):
    """Tight limits, and pool options of the Python API passed on the command line."""
    server = Server(
        models["small_cnn"],
        *("--workers", "1", "--model-name", "guarded", "--request-timeout", "8"),
        *("--max-concurrent-requests", str(GUARD["max_concurrent"])),
        *("--max-body-bytes", str(GUARD["max_parse_bytes"])),
        *("--max-parse-bytes", str(GUARD["max_parse_bytes"])),
        *("--body-timeout", str(GUARD["body_timeout"])),
        *("--threads-per-worker", "1", "--timeout", "60", "--max-batch-bytes", "2000000"),
        *("--max-retries", "1", "--start-timeout", "300"),
    )
    yield server
    assert server.stop() == 0


def _padded(x: np.ndarray, size: int) -> bytes:
    """``{"instances": x}`` padded with trailing spaces (valid JSON) to ``size`` bytes."""
    body = json.dumps({"instances": x.tolist()}).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


def _finish(connection: http.client.HTTPConnection, body: bytes) -> http.client.HTTPResponse:
    connection.send(body[len(body) // 2 :])
    return connection.getresponse()


def _assert_rows(response, x: np.ndarray, models) -> None:
    assert response.status_code == 200, response.text
    want = in_process(models["small_cnn"], x)["probabilities"]
    assert_rows_equal(np.asarray(response.json()["predictions"], np.float32), want)


def _assert_503(response, message: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "1"
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) == {"error"} and message in response.json()["error"]


def test_predictions_past_max_concurrent_requests_get_503_at_once(guarded, models):
    wait_idle(guarded)
    x = images(1, 32, seed=21)
    body = json.dumps({"instances": x.tolist()}).encode()
    holding = [_open_slow_request(guarded, body) for _ in range(GUARD["max_concurrent"])]
    deadline = time.monotonic() + 10
    while metric(guarded.metrics(), "pool_serve_requests_in_flight") < len(holding):
        assert time.monotonic() < deadline, "the slow requests never arrived"
        time.sleep(0.02)
    _assert_503(guarded.predict({"instances": x.tolist()}), "max_concurrent_requests=3")
    assert requests.get(guarded.model_url(), timeout=30).status_code == 200  # GETs are not held
    for connection in holding:  # the admitted ones are answered
        response = _finish(connection, body)
        assert response.status == 200
        got = np.asarray(json.loads(response.read())["predictions"], np.float32)
        assert_rows_equal(got, in_process(models["small_cnn"], x)["probabilities"])
        connection.close()
    _assert_rows(guarded.predict({"instances": x.tolist()}), x, models)


def test_a_body_that_trickles_in_is_cut_off_with_408_and_the_connection_closed(guarded):
    wait_idle(guarded)
    body = json.dumps({"instances": images(1, 32).tolist()}).encode()
    parts = urlsplit(guarded.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=120) as sock:
        head = (
            f"POST /v1/models/{guarded.name}:predict HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body[: len(body) // 2])  # half the body, then nothing
        started = time.monotonic()
        received = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            received += chunk
        waited = time.monotonic() - started
    header, _, content = received.partition(b"\r\n\r\n")
    lines = header.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 408 Request Timeout", received
    assert "connection: close" in [h.lower() for h in lines[1:]]
    assert "content-type: application/json" in [h.lower() for h in lines[1:]]
    error = json.loads(content)
    assert set(error) == {"error"} and "within 10 s (body_timeout)" in error["error"]
    assert waited >= GUARD["body_timeout"] - 1  # cut off at its time, not before


def test_bodies_past_the_parse_budget_wait_and_then_get_503(guarded, models):
    """max_parse_bytes=1 MB: a 0.7 MB body being received holds 0.7 MB of it; a 0.4 MB body
    waits (unread) until the first is parsed, then is answered; one that cannot get its bytes
    before its deadline (--request-timeout 8) gets 503."""
    wait_idle(guarded)
    x, y = images(1, 32, seed=31), images(1, 32, seed=32)
    big, small = _padded(x, 700_000), _padded(y, 400_000)
    url = guarded.model_url(":predict")
    with ThreadPoolExecutor(1) as executor:
        holder = _open_slow_request(guarded, big)
        deadline = time.monotonic() + 10
        while metric(guarded.metrics(), "pool_serve_requests_in_flight") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        waiting = executor.submit(requests.post, url, data=small, timeout=60)
        time.sleep(1.0)
        assert not waiting.done(), waiting.result().text  # its bytes do not fit yet
        response = _finish(holder, big)
        assert response.status == 200
        got = np.asarray(json.loads(response.read())["predictions"], np.float32)
        assert_rows_equal(got, in_process(models["small_cnn"], x)["probabilities"])
        holder.close()
        _assert_rows(waiting.result(), y, models)  # then it was read and answered

        holder = _open_slow_request(guarded, big)
        while metric(guarded.metrics(), "pool_serve_requests_in_flight") < 1:
            time.sleep(0.02)
        refused = requests.post(url, data=small, timeout=60)
        _assert_503(refused, "(max_parse_bytes=1000000)")
        holder.close()  # the client goes away: its bytes are given back
    wait_idle(guarded)
    _assert_rows(requests.post(url, data=small, timeout=60), y, models)


# --- the app mounted into another application --------------------------------------------------
def test_mounted_app_reports_its_pool_and_maps_pool_errors():
    """create_app inside a parent Starlette app (under a prefix), served by uvicorn in a thread
    of this process, around a pool of a signature-less model that fails on marker rows."""
    import factories
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from pool import PredictionPool
    from pool.serve import create_app
    from pool.serve.server import bind, url_of

    pool = PredictionPool(factories.faulty, workers=1, timeout=2.0, max_retries=0)
    serving = create_app(pool, "faulty", model_version=4, request_timeout=60)
    parent = Starlette(routes=[Mount("/serving", app=serving)])
    sock = bind("127.0.0.1", 0)
    base = f"{url_of(sock)}/serving"
    server = uvicorn.Server(uvicorn.Config(parent, lifespan="off", log_config=None))
    sock.listen()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()

    def state() -> str:
        answer = requests.get(f"{base}/v1/models/faulty/versions/4", timeout=30).json()
        return answer["model_version_status"][0]["state"]

    def predict(rows: list) -> requests.Response:
        body = {"instances": rows}
        return requests.post(f"{base}/v1/models/faulty:predict", json=body, timeout=60)

    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert state() == "START"
        refused = predict([[1.0, 2.0]])
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert requests.get(f"{base}/v2/health/ready").status_code == 400
        pool.start()
        assert state() == "AVAILABLE"
        assert requests.get(f"{base}/v2/health/ready").json() == {"ready": True}
        good = predict([[1.0, 2.0], [3.0, 4.5]])
        assert good.status_code == 200, good.text
        rows = good.json()["predictions"]
        assert [r["y"] for r in rows] == [[1.0, 2.0], [3.0, 4.5]]
        assert {r["pid"] for r in rows} <= set(pool.worker_pids())
        raised = predict([[factories.RAISE, 0.0]])
        assert raised.status_code == 500, raised.text
        assert "the model raised ValueError" in raised.json()["error"]
        hung = predict([[factories.HANG, 0.0]])
        assert hung.status_code == 504, hung.text  # the pool's per-shard timeout
        crashed = predict([[factories.KILL, 0.0]])
        assert crashed.status_code == 500, crashed.text
        assert predict([[5.0, 6.0]]).json()["predictions"][0]["y"] == [5.0, 6.0]
        serving.state.serving.draining = True
        assert state() == "UNLOADING"
        assert predict([[1.0, 2.0]]).status_code == 503
        assert requests.get(f"{base}/v2/health/ready").status_code == 400
        serving.state.serving.draining = False
        pool.shutdown()
        assert state() == "END"
        assert predict([[1.0, 2.0]]).status_code == 503
        samples = requests.get(f"{base}/monitoring/prometheus/metrics").text
        assert 'pool_serve_requests_total{api="v1_predict",code="504"} 1.0' in samples
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        pool.shutdown(kill=True)


# --- shutdown -----------------------------------------------------------------------------
def _open_slow_request(server: Server, body: bytes) -> http.client.HTTPConnection:
    """A request whose headers and first half of body are sent; the rest is sent later."""
    parts = urlsplit(server.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    connection.putrequest("POST", f"/v1/models/{server.name}:predict")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(len(body)))
    connection.endheaders()
    connection.send(body[: len(body) // 2])
    return connection


def _refused(server: Server) -> bool:
    parts = urlsplit(server.url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=2).close()
    except OSError:
        return True
    return False


def test_sigterm_drains_requests_in_flight_then_stops_everything(models):
    server = Server(
        models["text_embedding"],
        *("--workers", "1", "--model-name", "t", "--drain-timeout", "4", "-v"),
    )
    try:
        family = server.descendants()
        assert server.worker_pids()
        texts = ["in flight at SIGTERM", "ünïcode"]
        body = json.dumps({"instances": texts}).encode()
        finishing = _open_slow_request(server, body)
        # never completes: cancelled at the drain timeout
        stalled = _open_slow_request(server, body)
        deadline = time.monotonic() + 10
        while metric(server.metrics(), "pool_serve_requests_in_flight") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not _refused(server):  # stops accepting new connections...
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            time.sleep(0.05)
        assert server.process.poll() is None  # ...while it drains
        finishing.send(body[len(body) // 2 :])
        response = finishing.getresponse()
        assert response.status == 200
        want = in_process(models["text_embedding"], np.array(texts, dtype=object))["embedding"]
        assert_rows_equal(np.asarray(json.loads(response.read())["predictions"], np.float32), want)
        started = time.monotonic()
        assert server.process.wait(60) == 0
        assert time.monotonic() - started < 30
        # cancelled at the drain timeout: TF Serving's JSON 503, not uvicorn's plain-text 500
        cancelled = stalled.getresponse()
        assert cancelled.status == 503, (cancelled.status, cancelled.read())
        assert cancelled.getheader("Content-Type") == "application/json"
        assert cancelled.getheader("Retry-After") == "1"
        error = json.loads(cancelled.read())
        assert set(error) == {"error"} and "shutting down" in error["error"]
        stalled.close()
        _, alive = psutil.wait_procs(family, timeout=15)
        assert not alive, [p.pid for p in alive]
        assert "draining" in server.stderr
    finally:
        assert server.stop() == 0


def test_sigterm_while_the_workers_load_exits_143_and_leaves_nothing(models):
    process = subprocess.Popen(
        [sys.executable, "-m", "pool", "serve", models["mobilenet_v2"], "--port", "0", "--no-grpc"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        me = psutil.Process(process.pid)
        deadline = time.monotonic() + 120
        while len(me.children(recursive=True)) < 3:  # fork server, tracker, a worker loading
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        family = me.children(recursive=True)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    assert process.returncode == 143, stderr[-2000:]
    assert "terminated while the workers were loading the model" in stderr
    assert "serving '" not in stderr
    _, alive = psutil.wait_procs(family, timeout=15)
    assert not alive, [p.pid for p in alive]


# --- the command line -----------------------------------------------------------------------
def _serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pool", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_a_port_in_use_fails_fast_with_exit_2(models):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = _serve(models["small_cnn"], "--port", str(port))
    assert done.returncode == 2, done.stderr
    assert f"cannot bind 127.0.0.1:{port}" in done.stderr
    assert time.monotonic() - started < 60  # before any worker loads the model


def test_model_mistakes_are_found_before_any_worker_starts_and_exit_2(tmp_path, models):
    """Found in the parent from saved_model.pb, as predict and inspect do: one line, exit 2,
    no worker started (a worker's failure would be a ModelLoadError, exit 1)."""
    for model, args, message in [
        (str(tmp_path / "nope"), (), "is not a SavedModel directory (no such directory)"),
        (str(tmp_path), (), "is not a SavedModel directory (no saved_model.pb in it"),
        (
            models["multi_io"],
            ("--signature", "nope"),
            "has ['checked', 'scaled', 'serving_default'] (python -m pool inspect",
        ),
    ]:
        done = _serve(model, "--port", "0", *args)
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr  # one line
        assert done.stderr.startswith("error: ") and message in done.stderr, done.stderr
        assert "ModelLoadError" not in done.stderr


def test_bad_options_exit_2(tmp_path):
    for bad in (
        ["--port", "-1"],
        ["--request-timeout", "0"],
        ["--max-batch-rows", "0"],
        ["--max-concurrent-requests", "0"],
        ["--body-timeout", "0"],
        ["--threads-per-worker", "0"],
        ["--max-body-bytes", "2000", "--max-parse-bytes", "1000"],
    ):
        done = _serve(str(tmp_path), *bad)
        assert done.returncode == 2 and done.stderr.startswith("error:"), (bad, done.stderr)
    done = _serve(str(tmp_path), "--max-body-bytes", "2000", "--max-parse-bytes", "1000")
    assert "max_parse_bytes must be >= max_body_bytes (2000)" in done.stderr


def test_the_pool_options_of_the_python_api_are_options_of_serve():
    from pool import argtypes
    from pool.cli import build_parser

    args = build_parser().parse_args(
        [
            *("serve", "m", "--threads-per-worker", "2", "--inter-op-threads", "3"),
            *("--timeout", "1.5", "--max-retries", "0", "--shard-size", "8"),
            *("--max-batch-bytes", "1000", "--max-shards-per-worker", "50"),
            *("--max-worker-memory", "1000000000", "--start-timeout", "60"),
        ]
    )
    assert argtypes.pool_options(args) == {
        "threads_per_worker": 2,
        "inter_op_threads": 3,
        "timeout": 1.5,
        "max_retries": 0,
        "shard_size": 8,
        "max_batch_bytes": 1000,
        "max_shards_per_worker": 50,
        "max_worker_memory": 1000000000,
        "start_timeout": 60.0,
    }
    assert argtypes.pool_options(build_parser().parse_args(["serve", "m"])) == {}
    from pool import PredictionPool

    accepted = PredictionPool.__init__.__code__.co_varnames
    assert {keyword for _, keyword, *_ in argtypes.POOL_OPTIONS} <= set(accepted)


# --- the benchmark ----------------------------------------------------------------------------
def test_serving_benchmark_quick_run(tmp_path):
    done = subprocess.run(
        [
            *(sys.executable, "benchmarks/serving.py", "--quick", "--clients", "1,16"),
            *("--output-dir", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "serving.json").read_text())
    assert set(results["workloads"]) == {"text", "cnn"}
    # wrk when installed (apt-get install wrk), else the Python load generator, with a warning
    assert results["settings"]["load_generator"] in ("wrk", "python")
    for workload in results["workloads"].values():
        assert workload["outputs_match"] is True
        for server in ("pool", "baseline"):
            runs = workload["servers"][server]["runs"]
            protocols = ["rest", "grpc"] if server == "pool" else ["rest"]
            assert [(r["protocol"], r["clients"]) for r in runs] == [
                (p, c) for p in protocols for c in results["settings"]["clients"]
            ]
            for run in runs:
                assert run["requests"] > 0 and run["errors"] == 0, run
                assert 0 < run["latency_ms"]["p50"] <= run["latency_ms"]["p99"]
                assert run["requests_per_second"] > 0
                assert run["server_cpu_us_per_request"] > 0
                assert run["load_generator_cpu_us_per_request"] > 0
        assert workload["servers"]["pool"]["rows_per_model_call"] >= 1
    assert (tmp_path / "serving.png").read_bytes().startswith(b"\x89PNG")
    table = (tmp_path / "serving.md").read_text()
    assert "| connections |" in table and table.strip() == done.stdout.strip()
