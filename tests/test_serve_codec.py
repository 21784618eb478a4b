"""TF Serving's REST JSON and the Open Inference Protocol <-> arrays, without a server.

The formats are TF Serving's (``util/json_tensor.cc``) and the protocol's; the end-to-end
checks against the real model are in test_serve.py.
"""

from __future__ import annotations

import base64
import json
import math
import os

import numpy as np
import pytest

from pool.messages import SignatureInfo, TensorInfo
from pool.serve import codec, v2
from pool.serve.codec import RequestError

IMAGES = SignatureInfo(
    inputs=(TensorInfo("images", "float32", (None, 2, 2)),),
    outputs=(TensorInfo("probabilities", "float32", (None, 3)),),
    single_output="probabilities",
)
MULTI = SignatureInfo(
    inputs=(TensorInfo("a", "float32", (None, 4)), TensorInfo("b", "int32", (None, 3))),
    outputs=(TensorInfo("logits", "float32", (None, 5)), TensorInfo("sum", "float32", (None, 1))),
    single_output=None,
)
TEXT = SignatureInfo(
    inputs=(TensorInfo("text", "string", (None,)),),
    outputs=(TensorInfo("embedding", "float32", (None, 64)),),
    single_output="embedding",
)


def parse(body, signature=IMAGES):
    return codec.parse_predict(json.loads(json.dumps(body)), signature)


# --- requests ---------------------------------------------------------------------------------
def test_row_format_single_input_stacks_instances_in_the_signature_dtype():
    rows = [[[1, 2], [3, 4]], [[0.5, 0.25], [1e-3, -2]]]
    got = parse({"instances": rows})
    assert not got.columnar and got.rows == 2
    assert got.inputs["images"].dtype == np.float32
    np.testing.assert_array_equal(got.inputs["images"], np.asarray(rows, dtype=np.float32))


def test_row_format_named_inputs_and_columnar_give_the_same_arrays():
    a = [[1.5, 2, 3, 4], [0, 0, 0, 1]]
    b = [[1, 2, 3], [-4, 5, 2147483647]]
    rows = parse({"instances": [{"a": a[i], "b": b[i]} for i in range(2)]}, MULTI)
    columns = parse({"inputs": {"a": a, "b": b}}, MULTI)
    assert columns.columnar and not rows.columnar
    for got in (rows, columns):
        assert got.inputs["b"].dtype == np.int32 and got.inputs["a"].dtype == np.float32
        np.testing.assert_array_equal(got.inputs["a"], np.asarray(a, np.float32))
        np.testing.assert_array_equal(got.inputs["b"], np.asarray(b, np.int32))


def test_strings_unicode_empty_and_b64():
    texts = ["héllo wörld ✓", "", "日本語のテキスト", "plain"]
    raw = "bytes é".encode()
    got = parse({"instances": [*texts, {"b64": base64.b64encode(raw).decode()}]}, TEXT)
    assert got.inputs["text"].dtype == object
    assert list(got.inputs["text"]) == [*texts, raw]
    column = parse({"inputs": [{"b64": base64.b64encode(b"\xff\x00").decode()}, ""]}, TEXT)
    assert list(column.inputs["text"]) == [b"\xff\x00", ""]


def test_nan_and_infinity_tokens_are_read():
    got = codec.loads(b'{"instances": [[[NaN, Infinity], [-Infinity, 1]]]}')
    images = codec.parse_predict(got, IMAGES).inputs["images"]
    assert math.isnan(images[0, 0, 0]) and images[0, 0, 1] == np.inf and images[0, 1, 0] == -np.inf


BAD_REQUESTS = [
    ({"instances": [], "inputs": []}, IMAGES, "got both"),
    ({"signature_name": "serving_default"}, IMAGES, "expected an 'instances'"),
    ({"instances": {"images": 1}}, IMAGES, "expected 'instances' to be a list"),
    ({"instances": []}, IMAGES, "no values in the 'instances' list"),
    ({"instances": [[1, 2, 3, 4]]}, MULTI, "'instances' is a plain list, but the model has 2"),
    ({"instances": [{"a": [1, 2, 3, 4]}]}, MULTI, "expected exactly the input names ['a', 'b']"),
    ({"instances": [{"a": [0] * 4, "b": [0] * 3}, [1]]}, MULTI, "at item 1"),
    ({"inputs": [[1, 2, 3, 4]]}, MULTI, "'inputs' is a plain value, but the model has 2"),
    ({"inputs": {"a": [[0] * 4], "c": [[1]]}}, MULTI, "missing ['b'], unexpected ['c']"),
    ({"instances": [[[1, 2], [3]]]}, IMAGES, "rows must all have the same shape"),
    ({"instances": [[["x", "y"], ["z", "w"]]]}, IMAGES, "expected float32 values, got string"),
    ({"instances": [[[True, False], [True, True]]]}, IMAGES, "got true/false"),
    (
        {"instances": [[[0, 0], [0, 0]], [[1e39, 0], [0, 0]]]},
        IMAGES,
        "got 1e+39 (float64) in row 1",
    ),
    ({"inputs": {"a": [[0] * 4], "b": [[1.5, 2, 3]]}}, MULTI, "expected int32 integers"),
    ({"inputs": {"a": [[0] * 4] * 2, "b": [[1, 2, 3], [2**40, 2, 3]]}}, MULTI, "in row 1"),
    ({"instances": [1, 2]}, TEXT, 'expected a string or {"b64"'),
    ({"instances": [{"b64": "!!"}]}, TEXT, "is not valid base64"),
    ({"instances": [["a", "b"], ["c"]]}, TEXT, "rows must all have the same shape"),
    ({"inputs": "one string"}, TEXT, "expected a list with one string per row"),
]


@pytest.mark.parametrize("body, signature, message", BAD_REQUESTS)
def test_bad_requests_are_400_naming_what_was_expected(body, signature, message):
    with pytest.raises(RequestError) as caught:
        parse(body, signature)
    assert caught.value.status == 400
    assert message in caught.value.message, caught.value.message


def test_body_errors():
    for raw, message in [
        (b"", "the document is empty"),
        (b"{nope", "JSON Parse error"),
        (b"\xff\xfe", "JSON Parse error"),
    ]:
        with pytest.raises(RequestError, match=message):
            codec.loads(raw)
    with pytest.raises(RequestError, match="expected a JSON object"):
        codec.signature_name([1, 2], "serving_default")
    with pytest.raises(RequestError, match="'signature_name' must be a string"):
        codec.signature_name({"signature_name": 3}, "serving_default")
    assert codec.signature_name({"signature_name": ""}, "serving_default") == "serving_default"
    assert codec.signature_name({"signature_name": "x"}, "serving_default") == "x"


# --- responses --------------------------------------------------------------------------------
def test_floats_are_written_shortest_and_read_back_exactly():
    values = np.array(
        [[0.1, 1.0, 1e-5, 3.4028235e38, -2.5, 123456.79, 7e-45, 0.0]], dtype=np.float32
    )
    text = codec.encode_predict({"p": values}, columnar=False).decode()
    assert text.startswith('{"predictions":[[0.1,1.0,1e-05,3.4028235e+38,-2.5,')
    back = np.asarray(json.loads(text)["predictions"], dtype=np.float32)
    np.testing.assert_array_equal(back, values)
    doubles = np.array([0.1, 1 / 3], dtype=np.float64)
    back = np.asarray(json.loads(codec.json_value(doubles)), dtype=np.float64)
    np.testing.assert_array_equal(back, doubles)


def test_non_finite_values_are_bare_tokens():
    values = np.array([[np.nan, np.inf, -np.inf, 1.5]], dtype=np.float32)
    text = codec.encode_predict({"p": values}, columnar=True).decode()
    assert text == '{"outputs":[[NaN,Infinity,-Infinity,1.5]]}'
    back = json.loads(text)["outputs"][0]
    assert math.isnan(back[0]) and back[1:] == [math.inf, -math.inf, 1.5]


def test_row_and_columnar_layouts_with_several_outputs():
    out = {
        "logits": np.arange(10, dtype=np.float32).reshape(2, 5),
        "sum": np.array([[1.5], [2.5]], dtype=np.float32),
        "ids": np.array([7, 2**40], dtype=np.int64),
        "ok": np.array([True, False]),
    }
    rows = json.loads(codec.encode_predict(out, columnar=False))["predictions"]
    assert rows == [
        {"logits": [0.0, 1.0, 2.0, 3.0, 4.0], "sum": [1.5], "ids": 7, "ok": True},
        {"logits": [5.0, 6.0, 7.0, 8.0, 9.0], "sum": [2.5], "ids": 2**40, "ok": False},
    ]
    columns = json.loads(codec.encode_predict(out, columnar=True))["outputs"]
    assert columns == {k: v.tolist() for k, v in out.items()}
    single = json.loads(codec.encode_predict({"sum": out["sum"]}, columnar=False))
    assert single == {"predictions": [[1.5], [2.5]]}
    with pytest.raises(ValueError, match="different batch sizes"):
        codec.encode_predict({"a": np.zeros(2), "b": np.zeros(3)}, columnar=False)


def test_string_outputs_text_bytes_suffix_and_non_utf8():
    strings = np.array(["é ✓".encode(), b"", b"\xff\xfe"], dtype=object)
    out = json.loads(codec.encode_predict({"label": strings, "raw_bytes": strings}, False))
    labels = [row["label"] for row in out["predictions"]]
    assert labels[:2] == ["é ✓", ""] and labels[2] == {
        "b64": base64.b64encode(b"\xff\xfe").decode()
    }
    raws = [base64.b64decode(row["raw_bytes"]["b64"]) for row in out["predictions"]]
    assert raws == list(strings)


def test_named_outputs_uses_the_signature():
    array = np.zeros((2, 3), np.float32)
    assert list(codec.named_outputs(array, IMAGES)) == ["probabilities"]
    assert set(codec.named_outputs({"logits": array, "sum": array}, MULTI)) == {"logits", "sum"}


# --- status and metadata ----------------------------------------------------------------------
def test_metadata_layout_is_tf_servings():
    body = json.loads(json.dumps(codec.metadata_body("m", "3", "serving_default", MULTI)))
    assert body["model_spec"] == {"name": "m", "signature_name": "", "version": "3"}
    definition = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert definition["method_name"] == "tensorflow/serving/predict"
    assert definition["inputs"]["b"] == {
        "dtype": "DT_INT32",
        "tensor_shape": {
            "dim": [{"size": "-1", "name": ""}, {"size": "3", "name": ""}],
            "unknown_rank": False,
        },
        "name": "serving_default_b:0",
    }
    assert definition["outputs"]["logits"]["dtype"] == "DT_FLOAT"
    assert codec.tensor_shape(None) == {"dim": [], "unknown_rank": True}
    text = codec.metadata_body("t", "1", "serving_default", TEXT)
    assert text["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["text"][
        "dtype"
    ] == ("DT_STRING")


def test_status_layout():
    assert codec.status_body("1", "AVAILABLE") == {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }


# --- the Open Inference Protocol -----------------------------------------------------------
def infer_body(**overrides):
    body = {
        "id": "r1",
        "inputs": [
            {"name": "a", "shape": [2, 4], "datatype": "FP32", "data": list(range(8))},
            {"name": "b", "shape": [2, 3], "datatype": "INT32", "data": [[1, 2, 3], [4, 5, 6]]},
        ],
    }
    body.update(overrides)
    return body


def test_v2_infer_request_flat_and_nested_data():
    inputs, names, request_id = v2.parse_infer(infer_body(), MULTI)
    assert request_id == "r1" and names is None
    np.testing.assert_array_equal(inputs["a"], np.arange(8, dtype=np.float32).reshape(2, 4))
    assert inputs["b"].dtype == np.int32 and inputs["b"].tolist() == [[1, 2, 3], [4, 5, 6]]
    text, _, _ = v2.parse_infer(
        {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["é", ""]}]}, TEXT
    )
    assert list(text["text"]) == ["é", ""]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"inputs": []}, "non-empty list"),
        (
            {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP64", "data": [0] * 4}]},
            'expected datatype FP32, got "FP64"',
        ),
        (
            {"inputs": [{"name": "a", "shape": [2, 4], "datatype": "FP32", "data": [0] * 7}]},
            "holds 8 values, 'data' has 7",
        ),
        (
            {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}]},
            "missing inputs ['b']",
        ),
        (
            {"inputs": [{"name": "z", "shape": [1], "datatype": "FP32", "data": [0]}]},
            "unexpected input 'z'",
        ),
        ({"outputs": [{"name": "nope"}]}, "unknown outputs ['nope']"),
        ({"id": 5}, "'id' must be a string"),
    ],
)
def test_v2_bad_requests(overrides, message):
    with pytest.raises(RequestError) as caught:
        v2.parse_infer(infer_body(**overrides), MULTI)
    assert caught.value.status == 400 and message in caught.value.message, caught.value.message


def test_v2_response_layout():
    outputs = {
        "logits": np.arange(10, dtype=np.float32).reshape(2, 5),
        "sum": np.array([[1.0], [np.nan]], dtype=np.float32),
    }
    body = v2.encode_infer("m", "1", "r1", outputs, MULTI, ["sum"])
    assert body.decode() == (
        '{"model_name":"m","model_version":"1","id":"r1","outputs":[{"name":"sum",'
        '"datatype":"FP32","shape":[2,1],"data":[1.0,NaN]}]}'
    )
    every = json.loads(v2.encode_infer("m", "1", None, outputs, MULTI, None))
    assert [o["name"] for o in every["outputs"]] == ["logits", "sum"] and every["id"]
    assert every["outputs"][0]["data"] == list(range(10))
    meta = v2.model_metadata("m", "1", MULTI)
    assert meta["inputs"][1] == {"name": "b", "datatype": "INT32", "shape": [-1, 3]}
    assert meta["platform"] == "tensorflow_savedmodel" and meta["versions"] == ["1"]


# --- the model's name and version from its directory ------------------------------------------
def test_model_identity_follows_tf_serving_layouts(tmp_path):
    from pool.serve.server import model_identity

    base = tmp_path / "resnet"
    for version in ("1", "12", "3"):
        (base / version).mkdir(parents=True)
        (base / version / "saved_model.pb").write_bytes(b"")
    (base / "notes").mkdir()
    assert model_identity(str(base)) == (str(base / "12"), "resnet", "12")
    assert model_identity(str(base / "3")) == (str(base / "3"), "resnet", "3")
    plain = tmp_path / "my_model"
    plain.mkdir()
    (plain / "saved_model.pb").write_bytes(b"")
    assert model_identity(str(plain)) == (str(plain), "my_model", "1")
    link = tmp_path / "linked"
    os.symlink(plain, link)
    assert model_identity(str(link))[1:] == ("my_model", "1")
    handle = "https://tfhub.dev/google/universal-sentence-encoder/4"
    assert model_identity(handle) == (handle, "universal-sentence-encoder", "4")


# --- malformed bodies are 400s, never crashes ----------------------------------------------------
def _deep(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


@pytest.mark.parametrize(
    "raw, signature, message",
    [
        (b"[" * 100_000, IMAGES, "nested too deeply"),  # json's RecursionError
        (('{"instances": ' + _deep(900) + "}").encode(), IMAGES, "at most 64 levels"),
        (('{"instances": ' + _deep(900, '"a"') + "}").encode(), TEXT, "at most 64 levels"),
        (b'{"instances": [' + b"9" * 5000 + b"]}", IMAGES, "JSON Parse error"),  # 4300 digits
    ],
)
def test_deep_and_huge_json_is_400(raw, signature, message):
    with pytest.raises(RequestError) as caught:
        codec.parse_predict(codec.loads(raw), signature)
    assert caught.value.status == 400 and message in caught.value.message, caught.value.message


@pytest.mark.parametrize(
    "shape, data, message",
    [
        ([2**40, 2**40], [], "holds 1208925819614629174706176 values"),  # int64 wraps to 0
        ([2**62, 4], [1.0], "holds 18446744073709551616 values"),
        ([0, 2**62, 4], [], "cannot use 'shape'"),
        ([1] * 65, [1.0], "at most 64 sizes"),
        ([1], json.loads(_deep(900)), "nested more than 64 levels"),
    ],
)
def test_v2_huge_shapes_and_deep_data_are_400(shape, data, message):
    body = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": data}]}
    signature = SignatureInfo(
        inputs=(TensorInfo("x", "float32", None),),
        outputs=(TensorInfo("y", "float32", None),),
        single_output="y",
    )
    with pytest.raises(RequestError) as caught:
        v2.parse_infer(body, signature)
    assert caught.value.status == 400 and message in caught.value.message, caught.value.message


def test_show_survives_values_too_deep_to_encode():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert "nested too deeply" in codec.show(deep)


# --- the parse budget and gzip -------------------------------------------------------------------
def test_parse_budget_waits_in_order_grows_without_waiting_and_gives_back():
    import asyncio

    from pool.serve.limits import ParseBudget, Reservation

    async def scenario() -> None:
        budget = ParseBudget(100)
        first = Reservation(budget)
        assert await first.take(80, 1)
        second = Reservation(budget)
        waiting = asyncio.ensure_future(second.take(50, 5))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # 80 + 50 > 100: it waits
        assert not await Reservation(budget).take(10, 0.1)  # fits, but queued behind: times out
        first.release()
        assert await waiting and budget.used == 50
        assert second.grow_to(90) and budget.used == 90
        assert not second.grow_to(101) and budget.used == 90  # growing never waits
        second.release()
        assert budget.used == 0
        assert not await Reservation(budget).take(101, 1)  # can never fit
        holder = Reservation(budget)
        assert await holder.take(100, 1)
        cancelled = asyncio.ensure_future(Reservation(budget).take(10, 5))
        await asyncio.sleep(0.01)
        cancelled.cancel()  # a request cancelled while it waits leaves nothing behind
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        holder.release()
        assert budget.used == 0

    asyncio.run(scenario())


def test_gunzip_in_steps_checks_the_limit_and_the_budget():
    import gzip

    from pool.serve.app import GUNZIP_STEP, gunzip
    from pool.serve.limits import ParseBudget, Reservation

    data = os.urandom(1000) * (3 * GUNZIP_STEP // 1000)  # several steps
    packed = gzip.compress(data)
    assert gunzip(packed, len(data)) == data
    exact = b"x" * (2 * GUNZIP_STEP)  # a multiple of the step: the last step is full
    assert gunzip(gzip.compress(exact), len(exact)) == exact
    with pytest.raises(RequestError) as caught:
        gunzip(packed, len(data) - 1)
    assert caught.value.status == 413 and "once decompressed" in caught.value.message
    reservation = Reservation(ParseBudget(GUNZIP_STEP))
    with pytest.raises(RequestError) as caught:
        gunzip(packed, len(data), reservation)
    assert caught.value.status == 503 and "max_parse_bytes" in caught.value.message
    reservation.release()
    for bad, message in [(packed[:-20], "truncated"), (b"", "truncated"), (b"nope", "not gzip")]:
        with pytest.raises(RequestError, match=message):
            gunzip(bad, len(data))


# --- the orjson fast paths (issue 15) write and read exactly what the reference paths do ------
@pytest.mark.parametrize(
    "text",
    [
        '{"instances": [0.0027385002467781305, 0.1, -1e-07, 1e+300, 5e-324]}',
        '{"instances": [10000000000000000000000000000000, -9999999999999999999, '
        "18446744073709551615]}",
        '{"instances": [[NaN, Infinity], [-Infinity, 1]]}',
        '{"instances": ["caf\\u00e9", "\\ud83d\\ude00", "12345678901234567890"], '
        '"signature_name": ""}',
        '{"a": 1, "a": 2}',
        '{"inputs": {"x": [[1, 2], [3, 4]]}, "n": 1234567890123456789.5}',
    ],
)
def test_loads_reads_what_the_standard_library_reads(text):
    got = codec.loads(text.encode())
    want = json.loads(text)
    assert json.dumps(got) == json.dumps(want)
    assert [type(v) for v in _leaves(got)] == [type(v) for v in _leaves(want)]


def _leaves(value):
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64", "uint8", "bool"])
def test_fast_encoding_writes_what_the_reference_formatting_writes(dtype, monkeypatch):
    rng = np.random.default_rng(5)
    magnitudes = 10.0 ** rng.uniform(-8, 20, (50, 40))
    values = magnitudes * rng.choice([-1.0, 1.0], magnitudes.shape)
    values[0, :4] = [0.0, -0.0, 1e-4, 1e6]
    if dtype == "bool":
        array = values > 0
    elif dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, values.shape, dtype=dtype, endpoint=True)
    else:
        array = values.astype(dtype)
    pieces = (array, array[:, :3], array[1:2], np.abs(array[5:9]) % 100)  # in/out of range
    fast = [(codec.json_value(p), codec.encode_predict({"p": p}, columnar=False)) for p in pieces]
    monkeypatch.setattr(codec, "orjson", None)  # the NumPy formatting, value by value
    for piece, (value, body) in zip(pieces, fast, strict=True):
        want = codec.json_value(piece)
        assert value == want
        assert body == ('{"predictions":' + want + "}").encode()
