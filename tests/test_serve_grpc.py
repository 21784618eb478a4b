"""``python -m pool serve``'s gRPC API: a real server in a subprocess (gRPC on a free port), the
real ``tensorflow-serving-api`` stub and ``tf.make_tensor_proto`` / ``tf.make_ndarray`` in this
process, answers compared row by row with the model called in this process.

One server per configuration, started once per module; the SIGTERM test starts its own."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import psutil
import pytest
import tensorflow as tf
from conftest import assert_rows_equal, in_process
from serve_helpers import REPO, Server, metric, sigkill_a_worker_under_load, wait_idle
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from pool.errors import QueueFullError, WorkerCrashedError, WorkerError
from pool.serve import grpc_codec, grpc_protos, grpc_service

pytestmark = pytest.mark.timeout(600)

Code = grpc.StatusCode


class Client:
    """TF Serving's client code: a channel and the two stubs."""

    def __init__(self, server: Server) -> None:
        self.channel = grpc.insecure_channel(server.grpc_address)
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.name = server.name

    def request(self, signature: str = "", **inputs: np.ndarray) -> predict_pb2.PredictRequest:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.name
        if signature:
            request.model_spec.signature_name = signature
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        return request

    def predict(self, request: predict_pb2.PredictRequest, timeout: float = 120):
        return self.predictions.Predict(request, timeout=timeout)


def outputs_of(response) -> dict[str, np.ndarray]:
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def pair(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of multi_io: ``a`` float32 [rows, 4], ``b`` int32 [rows, 3]."""
    rng = np.random.default_rng(seed)
    a = rng.random((rows, 4), dtype=np.float32)
    return {"a": a, "b": rng.integers(-9, 9, (rows, 3)).astype(np.int32)}


def stacked(items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([x[k] for x in items]) for k in items[0]}


@pytest.fixture(scope="module")
def multi(models):
    server = Server(
        models["multi_io"], "--workers", "2", "--model-name", "multi", "-vv", "--log-json"
    )
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def limited(models):
    """As test_serve's: a lone request waits up to 3 s for company before its batch is sent,
    so requests stay queued long enough to pass their deadline or fill the queue; a full batch
    (4 rows) goes at once."""
    server = Server(
        models["text_embedding"],
        *("--workers", "1", "--model-name", "limited", "--max-batch-rows", "4"),
        *("--batch-timeout-micros", "3000000", "--max-queued-requests", "2"),
        *("--request-timeout", "1"),
    )
    yield server
    assert server.stop() == 0


# --- the messages: no TensorFlow, TF Serving's wire format ----------------------------------
def test_every_field_has_tf_servings_name_number_and_type():
    """Each message of grpc_protos against the installed tensorflow-serving-api's descriptor
    (both loaded in this process: the private descriptor pool does not clash)."""
    from tensorflow.core.protobuf import meta_graph_pb2
    from tensorflow_serving.apis import model_pb2

    theirs = {
        m.DESCRIPTOR.full_name: m.DESCRIPTOR
        for m in (
            tensor_pb2.TensorProto,
            tensor_shape_pb2.TensorShapeProto,
            meta_graph_pb2.TensorInfo,
            meta_graph_pb2.SignatureDef,
            model_pb2.ModelSpec,
            predict_pb2.PredictRequest,
            predict_pb2.PredictResponse,
            get_model_metadata_pb2.SignatureDefMap,
            get_model_metadata_pb2.GetModelMetadataRequest,
            get_model_metadata_pb2.GetModelMetadataResponse,
            get_model_status_pb2.GetModelStatusRequest,
            get_model_status_pb2.GetModelStatusResponse,
            get_model_status_pb2.ModelVersionStatus,
        )
    }
    status = get_model_status_pb2.ModelVersionStatus.DESCRIPTOR.fields_by_name["status"]
    theirs[status.message_type.full_name] = status.message_type
    assert set(grpc_protos.MESSAGES) == set(theirs)

    def compare(mine, their) -> None:
        assert mine.full_name == their.full_name
        for field in mine.fields:
            other = their.fields_by_name[field.name]
            where = f"{mine.full_name}.{field.name}"
            assert field.number == other.number, where
            assert field.type == other.type, where
            assert field.is_repeated == other.is_repeated, where
            if field.message_type is not None:
                compare(field.message_type, other.message_type)
            if field.enum_type is not None:
                values = {v.name: v.number for v in field.enum_type.values}
                assert (
                    values.items() <= {v.name: v.number for v in other.enum_type.values}.items()
                ), where
            oneof = field.containing_oneof
            assert (oneof and oneof.name) == (
                other.containing_oneof and other.containing_oneof.name
            ), where

    for name, cls in grpc_protos.MESSAGES.items():
        compare(cls.DESCRIPTOR, theirs[name])
        assert cls.DESCRIPTOR.file.pool is not theirs[name].file.pool


DTYPES = [
    np.float32,
    np.float64,
    np.float16,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
    np.complex64,
    np.complex128,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_tensors_both_ways_for_every_dtype(dtype):
    rng = np.random.default_rng(3)
    values = (rng.random((3, 4)) * 100 - (0 if np.dtype(dtype).kind in "ub" else 50)).astype(dtype)
    if np.dtype(dtype).kind == "c":
        values = values + 1j * values[::-1]
    name = tf.as_dtype(dtype).name
    # tensor_content, tf.make_tensor_proto's choice for arrays
    ours = grpc_protos.TensorProto.FromString(tf.make_tensor_proto(values).SerializeToString())
    got = grpc_codec.to_array("x", ours, np.dtype(dtype).name)
    assert got.dtype == np.dtype(dtype) and np.array_equal(got, values)
    # the typed field: what our outputs use; TF reads them back
    written = grpc_protos.TensorProto()
    grpc_codec.from_array(values, written)
    assert not written.tensor_content
    back = tf.make_ndarray(tensor_pb2.TensorProto.FromString(written.SerializeToString()))
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, values), name
    # ...and ours reads its own typed field too
    again = grpc_codec.to_array("x", written, None)
    assert again.dtype == np.dtype(dtype) and np.array_equal(again, values)


def test_typed_fields_pad_with_the_last_value_as_tensorflow_does():
    for proto in (
        tf.make_tensor_proto(1.5, shape=[2, 3]),  # one value for a whole shape
        tensor_pb2.TensorProto(
            dtype=types_pb2.DT_INT64,
            tensor_shape=tf.TensorShape([4]).as_proto(),
            int64_val=[7, 8],
        ),
        tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, tensor_shape=tf.TensorShape([2]).as_proto()
        ),
        tf.make_tensor_proto([b"a", "ü".encode()], dtype=tf.string),
    ):
        ours = grpc_protos.TensorProto.FromString(proto.SerializeToString())
        got = grpc_codec.to_array("x", ours, None)
        want = tf.make_ndarray(proto)
        assert got.shape == want.shape and got.tolist() == want.tolist()


def test_tensor_mistakes_name_what_was_expected():
    def ours(proto):
        return grpc_protos.TensorProto.FromString(proto.SerializeToString())

    cases = [
        (tf.make_tensor_proto(np.zeros(3, np.float64)), "float32", "expected dtype DT_FLOAT"),
        (
            tensor_pb2.TensorProto(
                dtype=types_pb2.DT_FLOAT,
                tensor_shape=tf.TensorShape([4]).as_proto(),
                tensor_content=b"\0" * 12,
            ),
            "float32",
            "tensor_content holds 12 bytes",
        ),
        (
            tensor_pb2.TensorProto(
                dtype=types_pb2.DT_FLOAT,
                tensor_shape=tf.TensorShape([2]).as_proto(),
                float_val=[1, 2, 3],
            ),
            "float32",
            "float_val holds 3 values",
        ),
        (tensor_pb2.TensorProto(dtype=types_pb2.DT_RESOURCE), None, "not supported"),
    ]
    for proto, want, message in cases:
        with pytest.raises(grpc_codec.TensorError, match=message):
            grpc_codec.to_array("x", ours(proto), want)


def test_pool_errors_map_to_tf_servings_status_codes():
    assert grpc_service.status_of(QueueFullError("full"))[0] == Code.RESOURCE_EXHAUSTED
    crashed = grpc_service.status_of(WorkerCrashedError("worker 0 died"))
    assert crashed == (Code.INTERNAL, "worker 0 died")
    bad = WorkerError("x < 0", "", "InvalidArgumentError")
    assert grpc_service.status_of(bad)[0] == Code.INVALID_ARGUMENT
    broken = WorkerError("boom", "", "RuntimeError")
    assert grpc_service.status_of(broken)[0] == Code.INTERNAL
    assert grpc_service.status_of(ValueError("shape"))[0] == Code.INVALID_ARGUMENT


# --- Predict, metadata, status against a real server ------------------------------------------
def test_tf_serving_client_code_unchanged(multi, models):
    x = pair(3)
    # TF Serving's gRPC client code (as in its examples), unchanged:
    channel = grpc.insecure_channel(multi.grpc_address)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "multi"
    request.model_spec.signature_name = "serving_default"
    request.inputs["a"].CopyFrom(tf.make_tensor_proto(x["a"], shape=x["a"].shape))
    request.inputs["b"].CopyFrom(tf.make_tensor_proto(x["b"], shape=x["b"].shape))
    result = stub.Predict(request, 30.0)  # 30 secs timeout
    got = {k: tf.make_ndarray(v) for k, v in result.outputs.items()}
    assert_rows_equal(got, in_process(models["multi_io"], x))
    assert result.model_spec.name == "multi"
    assert result.model_spec.version.value == 1
    assert result.model_spec.signature_name == "serving_default"
    assert not result.outputs["logits"].tensor_content  # typed fields, as TF Serving
    channel.close()


def test_multi_input_typed_fields_several_outputs_and_output_filter(multi, models):
    client = Client(multi)
    rng = np.random.default_rng(5)
    a = rng.random((5, 4), dtype=np.float32)
    b = rng.integers(-9, 9, (5, 3)).astype(np.int32)
    want = in_process(models["multi_io"], {"a": a, "b": b})
    request = client.request(b=b)  # b as tensor_content
    typed = request.inputs["a"]  # a as a typed field, written by hand
    typed.dtype = types_pb2.DT_FLOAT
    typed.tensor_shape.CopyFrom(tf.TensorShape(a.shape).as_proto())
    typed.float_val.extend(a.reshape(-1).tolist())
    got = outputs_of(client.predict(request))
    assert_rows_equal(got, want)  # logits and sum
    request.output_filter.append("sum")
    filtered = client.predict(request)
    assert set(filtered.outputs) == {"sum"}
    assert_rows_equal(tf.make_ndarray(filtered.outputs["sum"]), want["sum"])
    version = client.request(a=a, b=b)
    version.model_spec.version.value = 1  # the served version, named
    assert_rows_equal(outputs_of(client.predict(version)), want)


def test_strings_as_bytes_both_ways(limited, models):
    client = Client(limited)
    texts = np.array(["a cat", "ünïcode words", "", b"bytes \xe2\x9c\x93"], dtype=object)
    request = client.request(
        text=np.array([t if isinstance(t, bytes) else t.encode() for t in texts], dtype=object)
    )
    got = outputs_of(client.predict(request))["embedding"]  # 4 rows: a full batch, at once
    want = in_process(models["text_embedding"], texts)["embedding"]
    assert_rows_equal(got, want)


def test_metadata_and_status_as_tf_serving_answers(multi):
    client = Client(multi)
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "multi"
    request.metadata_field.append("signature_def")
    response = client.predictions.GetModelMetadata(request, timeout=30)
    assert response.model_spec.name == "multi" and response.model_spec.version.value == 1
    definitions = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(definitions)  # TF's own Any.Unpack
    signature = definitions.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    inputs = {
        k: (v.dtype, [d.size for d in v.tensor_shape.dim]) for k, v in signature.inputs.items()
    }
    assert inputs == {"a": (types_pb2.DT_FLOAT, [-1, 4]), "b": (types_pb2.DT_INT32, [-1, 3])}
    assert signature.inputs["a"].name == "serving_default_a:0"
    assert set(signature.outputs) == {"logits", "sum"}
    assert signature.outputs["logits"].dtype == types_pb2.DT_FLOAT

    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "multi"
    status = client.models.GetModelStatus(status_request, timeout=30)
    (version,) = status.model_version_status
    assert version.version == 1
    assert version.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert version.status.error_code == 0 and version.status.error_message == ""
    deadline = time.monotonic() + 10
    while True:  # -vv --log-json: one structured access record per RPC
        records = [json.loads(line) for line in multi.lines if line.startswith("{")]
        logged = [r for r in records if r.get("path", "").endswith("ModelService/GetModelStatus")]
        if logged or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert logged and logged[-1]["method"] == "gRPC" and logged[-1]["status"] == "OK"
    assert logged[-1]["logger"] == "pool.serve.access" and logged[-1]["model"] == "multi"


def test_every_mistake_has_tf_servings_status_code_and_the_server_goes_on(multi, models):
    client = Client(multi)
    a = np.ones((2, 4), np.float32)
    b = np.ones((2, 3), np.int32)

    def with_spec(**spec) -> predict_pb2.PredictRequest:
        request = client.request(a=a, b=b)
        for key, value in spec.items():
            if key == "version":
                request.model_spec.version.value = value
            else:
                setattr(request.model_spec, key, value)
        return request

    filtered = client.request(a=a, b=b)
    filtered.output_filter.extend(["sum", "nope"])
    twice = client.request(a=a, b=b)
    twice.output_filter.extend(["sum", "sum"])
    short = client.request(a=a, b=b)
    short.inputs["a"].tensor_content = short.inputs["a"].tensor_content[:-4]
    cases = [
        (with_spec(name="other"), Code.NOT_FOUND, "Servable not found for request: Latest(other)"),
        (with_spec(version=7), Code.NOT_FOUND, "Specific(multi, 7)"),
        (with_spec(version_label="stable"), Code.INVALID_ARGUMENT, "version label: stable"),
        (with_spec(signature_name="nope"), Code.FAILED_PRECONDITION, 'signature key "nope"'),
        (client.request(a=a), Code.INVALID_ARGUMENT, "Missing but required: {b}"),
        (client.request(a=a, b=b, c=b), Code.INVALID_ARGUMENT, "Sent extra: {c}"),
        (client.request(a=a.astype(np.float64), b=b), Code.INVALID_ARGUMENT, "DT_FLOAT"),
        (client.request(a=np.ones((2, 5), np.float32), b=b), Code.INVALID_ARGUMENT, "a"),
        (client.request(a=a, b=np.ones((3, 3), np.int32)), Code.INVALID_ARGUMENT, "rows"),
        (filtered, Code.INVALID_ARGUMENT, "output tensor alias not found in signature: nope"),
        (twice, Code.INVALID_ARGUMENT, "duplicate output tensor alias: sum"),
        (short, Code.INVALID_ARGUMENT, "tensor_content holds 28 bytes"),
    ]
    for request, code, message in cases:
        error = rpc_error(client.predict, request)
        assert error.code() == code, (request.model_spec, error.details())
        assert message in error.details(), error.details()
    no_field = get_model_metadata_pb2.GetModelMetadataRequest()
    no_field.model_spec.name = "multi"
    error = rpc_error(client.predictions.GetModelMetadata, no_field, timeout=30)
    assert error.code() == Code.INVALID_ARGUMENT and "metadata_field" in error.details()
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = "multi"
    error = rpc_error(client.predictions.Classify, classify, timeout=30)
    assert error.code() == Code.UNIMPLEMENTED
    unknown = get_model_status_pb2.GetModelStatusRequest()
    unknown.model_spec.name = "other"
    error = rpc_error(client.models.GetModelStatus, unknown, timeout=30)
    assert error.code() == Code.NOT_FOUND and "other" in error.details()
    # the server goes on
    want = in_process(models["multi_io"], {"a": a, "b": b})
    assert_rows_equal(outputs_of(client.predict(client.request(a=a, b=b))), want)
    samples = multi.metrics()
    assert metric(samples, "pool_serve_requests_total", api="grpc_predict", code="NOT_FOUND") >= 2
    assert metric(samples, "pool_serve_requests_total", api="grpc_predict", code="OK") >= 1


# --- deadline, full queue ---------------------------------------------------------------------
def test_a_client_deadline_cancels_the_queued_request(limited):
    client = Client(limited)
    before = wait_idle(limited)
    started = time.monotonic()
    error = rpc_error(client.predict, client.request(text=np.array([b"never"], object)), 0.4)
    assert error.code() == Code.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.9  # the client's deadline, not the server's 1 s
    time.sleep(3.5)  # past the batch timeout: had it stayed queued, it would have run by now
    after = wait_idle(limited)
    assert metric(after, "pool_model_rows_total") == metric(before, "pool_model_rows_total")
    # the server's --request-timeout applies to gRPC as well
    error = rpc_error(client.predict, client.request(text=np.array([b"late"], object)), 30)
    assert error.code() == Code.DEADLINE_EXCEEDED and "1.0 s" in error.details()


def test_a_full_queue_is_resource_exhausted_at_once(limited):
    client = Client(limited)
    wait_idle(limited)
    waiting = [
        client.predictions.Predict.future(
            client.request(text=np.array([f"w{i}".encode()], object)), 30
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 5
    while metric(limited.metrics(), "pool_queued_requests") < 2:
        assert time.monotonic() < deadline, "the two requests never queued"
        time.sleep(0.02)
    started = time.monotonic()
    error = rpc_error(client.predict, client.request(text=np.array([b"one too many"], object)))
    assert time.monotonic() - started < 0.9
    assert error.code() == Code.RESOURCE_EXHAUSTED
    assert "overloaded" in error.details() and "max_queued_requests" in error.details()
    assert sorted(f.exception().code().name for f in waiting) == ["DEADLINE_EXCEEDED"] * 2
    wait_idle(limited)


# --- concurrency, a killed worker, no TensorFlow in the server --------------------------------
def test_concurrent_rpcs_and_rest_requests_are_combined_into_batches(multi, models):
    before = multi.metrics()
    clients = [Client(multi) for _ in range(4)]
    inputs = [pair(1 + i % 3, seed=i) for i in range(64)]

    def one(i: int) -> dict[str, np.ndarray]:
        if i % 8 == 7:  # REST requests join the same queue
            body = {"inputs": {k: v.tolist() for k, v in inputs[i].items()}}
            response = multi.predict(body)
            assert response.status_code == 200, response.text
            outputs = response.json()["outputs"]
            return {k: np.asarray(v, np.float32) for k, v in outputs.items()}
        client = clients[i % 4]
        return outputs_of(client.predict(client.request(**inputs[i])))

    with ThreadPoolExecutor(32) as executor:
        answers = list(executor.map(one, range(64)))
    assert_rows_equal(stacked(answers), in_process(models["multi_io"], stacked(inputs)))
    after = multi.metrics()
    calls = metric(after, "pool_model_calls_total") - metric(before, "pool_model_calls_total")
    rows = metric(after, "pool_model_rows_total") - metric(before, "pool_model_rows_total")
    assert rows == sum(len(x["a"]) for x in inputs)
    assert rows / calls > 1, (rows, calls)  # concurrent requests shared model calls
    ok = {"api": "grpc_predict", "code": "OK"}
    assert (
        metric(after, "pool_serve_requests_total", **ok)
        - metric(before, "pool_serve_requests_total", **ok)
        == 56
    )


def test_a_worker_sigkilled_under_load_fails_no_rpc(multi, models):
    def make_client(seed: int):
        rpc = Client(multi)

        def send(n: int) -> tuple[dict, dict]:
            x = pair(1 + n % 4, seed=seed * 1000 + n)
            try:
                return x, outputs_of(rpc.predict(rpc.request(**x)))
            except grpc.RpcError as exc:
                raise AssertionError(f"{exc.code()} {exc.details()}") from None

        return send

    answered = sigkill_a_worker_under_load(multi, make_client)
    want = in_process(models["multi_io"], stacked([x for x, _ in answered]))
    assert_rows_equal(stacked([p for _, p in answered]), want)


def _maps_tensorflow(pid: int) -> bool:
    return any("tensorflow" in m.path for m in psutil.Process(pid).memory_maps(grouped=True))


def test_the_server_process_never_loads_tensorflow(multi):
    client = Client(multi)
    client.predict(client.request(**pair(1)))  # gRPC has been used
    assert not _maps_tensorflow(multi.process.pid)
    assert any(_maps_tensorflow(p) for p in multi.worker_pids())  # it sees TF where it is


# --- SIGTERM -----------------------------------------------------------------------------------
def test_sigterm_finishes_rpcs_in_flight_refuses_new_ones_cancels_at_the_drain_timeout(models):
    """Two servers (started together): a lone request waits in the queue 2 s on the first, 10 s
    on the second; SIGTERM; the first's RPC finishes within its 20 s drain, the second's is
    cancelled at its 1 s drain timeout; both exit 0 and leave no process."""

    def start(args: tuple[str, ...]) -> Server:
        return Server(models["text_embedding"], "--workers", "1", "--model-name", "t", *args)

    with ThreadPoolExecutor(2) as executor:
        finishing, stalled = executor.map(
            start,
            [
                ("--drain-timeout", "20", "--batch-timeout-micros", "2000000", "-v"),
                ("--drain-timeout", "1", "--batch-timeout-micros", "10000000", "-v"),
            ],
        )
    try:
        texts = np.array([b"in flight at SIGTERM", "ünïcode".encode()], dtype=object)
        families, calls = [], []
        for server in (finishing, stalled):
            client = Client(server)
            families.append(server.descendants())
            calls.append(client.predictions.Predict.future(client.request(text=texts), 60))
        for server in (finishing, stalled):
            deadline = time.monotonic() + 10
            while metric(server.metrics(), "pool_queued_requests") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        client = Client(finishing)
        deadline = time.monotonic() + 10
        while True:  # new RPCs are refused while the one in flight finishes
            try:
                client.predict(client.request(text=texts), 5)
            except grpc.RpcError as exc:
                assert exc.code() == Code.UNAVAILABLE, (exc.code(), exc.details())
                break
            assert time.monotonic() < deadline, "still answering after SIGTERM"
        got = tf.make_ndarray(calls[0].result().outputs["embedding"])
        assert_rows_equal(got, in_process(models["text_embedding"], texts)["embedding"])
        cancelled = calls[1].exception()
        assert cancelled is not None and cancelled.code() == Code.UNAVAILABLE, cancelled
        assert time.monotonic() - signalled < 9  # at the drain timeout, not the batch's
        for server, family in zip((finishing, stalled), families, strict=True):
            assert server.process.wait(60) == 0
            _, alive = psutil.wait_procs(family, timeout=15)
            assert not alive, [p.pid for p in alive]
            assert "draining" in server.stderr
        assert "1 RPC(s) still running at the drain timeout: cancelled" in stalled.stderr
        assert "requests in flight were cancelled" in stalled.stderr
    finally:
        for server in (finishing, stalled):
            assert server.stop() == 0, server.stderr[-3000:]


def test_a_grpc_port_in_use_fails_fast_with_exit_2(models):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "pool", "serve", models["small_cnn"], "--port", "0"]
            + ["--grpc-port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
    assert done.returncode == 2, done.stderr
    assert f"cannot bind 127.0.0.1:{port}" in done.stderr
    assert time.monotonic() - started < 60  # before any worker loads the model


def test_grpc_load_generator_quick_run(multi, models):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import grpc_load

    inputs = [pair(1, seed=i) for i in range(4)]
    result = grpc_load.run_load(
        multi.grpc_address,
        grpc_load.predict_bodies("multi", inputs),
        concurrency=4,
        seconds=1.0,
        processes=2,
    )
    assert result["errors"] == {} and result["ok"] > 4, result
    assert result["requests_per_second"] > 0 and result["client_cpu_us_per_request"] > 0
    assert set(result["answers"]) == set(range(4))
    for i, answer in result["answers"].items():
        got = {k: grpc_codec.to_array(k, v, "float32").copy() for k, v in answer.outputs.items()}
        assert_rows_equal(got, in_process(models["multi_io"], inputs[i]))


def test_grpc_server_beside_a_mounted_app_maps_worker_faults_to_internal():
    """GrpcServer started on an event loop of this process next to create_app (as an embedder
    would in a lifespan), around a pool of a signature-less model that fails on marker rows:
    a worker crash and a model error are INTERNAL, a message past max_message_bytes is
    RESOURCE_EXHAUSTED, and the server answers afterwards."""
    import asyncio

    import factories

    from pool import PredictionPool
    from pool.serve import create_app

    pool = PredictionPool(factories.faulty, workers=1, max_retries=0)
    serving = create_app(pool, "faulty", model_version=4)
    grpc_server = grpc_service.GrpcServer(
        serving.state.serving,
        serving.state.serving_metrics,
        "127.0.0.1",
        0,
        request_timeout=60.0,
        max_message_bytes=100_000,
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    with pool:
        thread.start()
        asyncio.run_coroutine_threadsafe(grpc_server.start(), loop).result(30)
        try:
            channel = grpc.insecure_channel(grpc_server.address)
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

            def predict(rows: np.ndarray):
                request = predict_pb2.PredictRequest()
                request.model_spec.name = "faulty"
                request.model_spec.version.value = 4
                request.inputs["x"].CopyFrom(tf.make_tensor_proto(rows))
                return stub.Predict(request, 60)

            rows = np.array([[1.0, 2.0], [3.0, 4.0]])
            answer = predict(rows)
            assert np.array_equal(tf.make_ndarray(answer.outputs["y"]), rows)
            assert set(answer.outputs) == {"y", "pid"}
            assert answer.model_spec.version.value == 4
            crashed = rpc_error(predict, np.array([[factories.KILL, 0.0]]))
            assert crashed.code() == Code.INTERNAL, crashed.details()
            raised = rpc_error(predict, np.array([[factories.RAISE, 0.0]]))
            assert raised.code() == Code.INTERNAL, raised.details()
            state = serving.state.serving  # the REST app's admission limit applies to gRPC
            state.max_concurrent_requests = state.predicting  # as if that many were running
            busy = rpc_error(predict, rows)
            assert busy.code() == Code.RESOURCE_EXHAUSTED
            assert "max_concurrent_requests=0" in busy.details(), busy.details()
            state.max_concurrent_requests = 256
            large = rpc_error(predict, np.zeros((20_000, 2)))  # 320 KB > 100 KB
            assert large.code() == Code.RESOURCE_EXHAUSTED, large.details()
            assert np.array_equal(tf.make_ndarray(predict(rows).outputs["y"]), rows)
            channel.close()
        finally:
            loop.call_soon_threadsafe(grpc_server.begin_drain, 5.0)
            asyncio.run_coroutine_threadsafe(grpc_server.stop(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
