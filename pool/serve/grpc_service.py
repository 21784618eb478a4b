"""TensorFlow Serving's gRPC API around a running pool: ``tensorflow.serving.PredictionService``
(``Predict``, ``GetModelMetadata``) and ``tensorflow.serving.ModelService`` (``GetModelStatus``).

    client ─gRPC─▶ grpc.aio server (on uvicorn's event loop)              parent process
                    │ admit: draining -> UNAVAILABLE; max_concurrent_requests -> RESOURCE_EXHAUSTED
                    │ find_model(spec): name, version / label, signature, else NOT_FOUND
                    │ grpc_codec: TensorProto -> arrays (INVALID_ARGUMENT when they do not fit)
                    │ apredict(pool, inputs) ── pool.submit ── the same queue as REST requests
                    │ await it | the client's deadline / cancel | --request-timeout
                    ▼                                                         │
           PredictResponse ◀── outputs (typed fields, AsProtoField) ◀── dynamic batching ◀── workers

The gRPC server shares the REST app's :class:`~pool.serve.app.ServingState` (identity,
``draining``, requests in progress) and :class:`~pool.serve.metrics.Metrics` (``api`` label
``grpc_predict``, ``grpc_metadata``, ``grpc_status``; ``code`` is the gRPC status name), and
the pool: requests of both protocols wait in one queue and are combined into the same model
calls. Unchanged ``tensorflow-serving-api`` client code works against it
(``prediction_service_pb2_grpc.PredictionServiceStub``); the messages come from
:mod:`.grpc_protos`, so the server never imports TensorFlow.

Status codes (docs/serving.md, "gRPC"): INVALID_ARGUMENT (a tensor that does not fit the
signature, a bad ``output_filter``), NOT_FOUND (unknown model, version or label),
FAILED_PRECONDITION (unknown signature, as TF Serving), RESOURCE_EXHAUSTED (the pool's queue is
full, or ``max_concurrent_requests`` predictions are in progress), DEADLINE_EXCEEDED (the
client's deadline, or the server's ``request_timeout``: the queued request is cancelled),
UNAVAILABLE (draining, or the pool is not running), INTERNAL (a worker error or crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from ..errors import PoolClosedError, PoolError, QueueFullError, WorkerCrashedError, WorkerError
from ..messages import DEFAULT_INPUT, SignatureInfo
from . import codec, grpc_codec
from . import grpc_protos as protos
from .app import INLINE_VALUES, INPUT_ERRORS, ServingState, pool_call
from .metrics import Metrics
from .models import ModelNotFound

log = logging.getLogger("pool.serve")
access_log = logging.getLogger("pool.serve.access")

#: TF Serving's gRPC port.
DEFAULT_GRPC_PORT = 8500
#: The only metadata field TF Serving answers.
SIGNATURE_DEF = "signature_def"

_Code = grpc.StatusCode
#: The method each ``api`` label counts (access log ``path``).
_PATHS = {
    "grpc_predict": "/tensorflow.serving.PredictionService/Predict",
    "grpc_metadata": "/tensorflow.serving.PredictionService/GetModelMetadata",
    "grpc_status": "/tensorflow.serving.ModelService/GetModelStatus",
}


class RpcError(Exception):
    """An RPC answered with ``code`` and ``message`` (not an exception of the server)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ServedModel:
    """What :func:`find_model` resolves a ``ModelSpec`` to."""

    pool: Any
    name: str
    version: str
    signature_name: str


@contextlib.contextmanager
def find_model(
    state: ServingState,
    name: str,
    version: int | None,
    version_label: str | None,
    signature_name: str,
) -> Iterator[ServedModel]:
    """The served model version a request names, held (an unloading version waits for it)
    while the ``with`` block runs; or :class:`RpcError`: NOT_FOUND for an unknown model or
    version, INVALID_ARGUMENT for an unknown label (TF Serving's codes, from the registry that
    REST uses too, :meth:`pool.serve.models.ModelRegistry.acquire`), FAILED_PRECONDITION for
    an unknown signature. ``version``/``version_label`` ``None``: the highest AVAILABLE
    version; ``signature_name`` empty: the served one (``serving_default``)."""
    models = state.models
    assert models is not None
    try:
        held = models.acquire(name, version, version_label)
    except ModelNotFound as exc:
        raise RpcError(getattr(_Code, exc.code), exc.message) from None
    try:
        served = models.signature_name
        if signature_name and signature_name != served:
            raise RpcError(
                _Code.FAILED_PRECONDITION,
                f'Serving signature key "{signature_name}" not found; this server serves '
                f'"{served}" (start another server with --signature {signature_name} to serve '
                "it)",
            )
        yield ServedModel(held.pool, held.model, held.name, served)
    finally:
        models.release(held)


def _spec_of(spec: Any) -> tuple[str, int | None, str | None, str]:
    choice = spec.WhichOneof("version_choice")
    version = spec.version.value if choice == "version" else None
    label = spec.version_label if choice == "version_label" else None
    return spec.name, version, label, spec.signature_name


async def apredict(pool: Any, inputs: dict[str, np.ndarray]) -> Any:
    """The pool's answer to ``inputs``, awaited; cancelling the awaiting task cancels the
    request (dropped from the pool's queue if no worker has taken it yet)."""
    waiter = await pool_call(pool, inputs)
    try:
        return await waiter
    finally:
        if not waiter.done():
            waiter.cancel()


class Service:
    """The RPC handlers, sharing ``state`` and ``metrics`` with the REST app of ``pool``."""

    def __init__(
        self, state: ServingState, metrics: Metrics, request_timeout: float | None
    ) -> None:
        self.state = state
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.active = 0  # RPCs being handled (what the drain waits for)
        self.idle = asyncio.Event()
        self.idle.set()

    # --- the RPCs ---------------------------------------------------------------------------
    async def predict(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._handle("grpc_predict", self._predict, request, context)

    async def get_model_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._handle("grpc_metadata", self._metadata, request, context)

    async def get_model_status(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._handle("grpc_status", self._status, request, context)

    async def _handle(
        self,
        api: str,
        handler: Callable[[Any], Coroutine[Any, Any, tuple[Any, int | None]]],
        request: Any,
        context: grpc.aio.ServicerContext,
    ) -> Any:
        started = time.perf_counter()
        state = self.state
        state.in_flight += 1
        self.metrics.in_flight.inc()
        self.active += 1
        self.idle.clear()
        code, rows, answer = _Code.OK, None, None
        try:
            answer, rows = await handler(request)
        except asyncio.CancelledError:
            # The client went away or its deadline passed (gRPC answers it), or the drain's
            # grace period ended (the server stops): the pool's request is cancelled already.
            code = _Code.DEADLINE_EXCEEDED if _past_deadline(context) else _Code.CANCELLED
            self._observe(api, code, started, rows, context)
            raise
        except Exception as exc:
            code, message = status_of(exc)
            self._log(api, code, message, exc)
            context.set_code(code)
            context.set_details(message)
        finally:
            state.in_flight -= 1
            self.metrics.in_flight.dec()
            self.active -= 1
            if not self.active:
                self.idle.set()
        self._observe(api, code, started, rows, context)
        return answer

    def _observe(
        self,
        api: str,
        code: grpc.StatusCode,
        started: float,
        rows: int | None,
        context: grpc.aio.ServicerContext,
    ) -> None:
        seconds = time.perf_counter() - started
        self.metrics.observe(api, code.name, seconds)
        if rows is not None:
            self.metrics.rows.labels(api).observe(rows)
        if access_log.isEnabledFor(logging.INFO):
            path = _PATHS[api]
            access_log.info(
                "gRPC %s %s %.1f ms%s",
                path,
                code.name,
                seconds * 1e3,
                "" if rows is None else f" rows={rows}",
                extra={
                    "method": "gRPC",
                    "path": path,
                    "status": code.name,
                    "seconds": round(seconds, 6),
                    "rows": rows,
                    "api": api,
                    "model": self.state.model_name,
                    "client": context.peer(),
                },
            )

    def _log(self, api: str, code: grpc.StatusCode, message: str, exc: Exception) -> None:
        if code is _Code.INTERNAL and not isinstance(exc, PoolError):
            log.error("internal error on %s", api, exc_info=exc)
        elif code is _Code.INTERNAL:
            log.error("%s -> %s: %s", api, code.name, message)
        elif code is _Code.DEADLINE_EXCEEDED:
            log.warning("%s -> %s: %s", api, code.name, message)
        else:
            log.info("%s -> %s: %s", api, code.name, message)

    def _model(self, spec: Any) -> contextlib.AbstractContextManager[ServedModel]:
        return find_model(self.state, *_spec_of(spec))

    def _signature(self, served: ServedModel) -> SignatureInfo:
        try:
            signature: SignatureInfo = served.pool.signature
        except PoolClosedError:
            raise RpcError(
                _Code.UNAVAILABLE,
                f"model {served.name!r} is not available; expected a running pool",
            ) from None
        return signature

    async def _predict(self, request: Any) -> tuple[Any, int]:
        state = self.state
        if state.draining:
            raise RpcError(
                _Code.UNAVAILABLE, "the server is shutting down; retry on another replica"
            )
        with self._model(request.model_spec) as served:  # held until answered
            return await self._predict_on(served, request)

    async def _predict_on(self, served: ServedModel, request: Any) -> tuple[Any, int]:
        state = self.state
        signature = self._signature(served)
        inputs = _inputs(request, signature)
        outputs_wanted = _output_filter(request, signature)
        if state.predicting >= state.max_concurrent_requests:
            raise RpcError(
                _Code.RESOURCE_EXHAUSTED,
                f"server overloaded: {state.predicting} requests in progress "
                f"(max_concurrent_requests={state.max_concurrent_requests}); retry later",
            )
        state.predicting += 1
        timeout = self.request_timeout
        timer, expired = None, []
        task = asyncio.current_task()
        if timeout is not None and task is not None:  # cheaper than asyncio.wait_for (a task)

            def expire() -> None:
                expired.append(True)
                task.cancel()

            timer = asyncio.get_running_loop().call_later(timeout, expire)
        try:
            result = await apredict(served.pool, inputs)
        except asyncio.CancelledError:
            if not expired:
                raise  # the client's deadline or cancellation, or the drain's end
            if task is not None and hasattr(task, "uncancel"):  # 3.11+: handled here
                task.uncancel()
            raise RpcError(
                _Code.DEADLINE_EXCEEDED,
                f"deadline exceeded: no answer within the request timeout of {timeout} s",
            ) from None
        finally:
            state.predicting -= 1
            if timer is not None:
                timer.cancel()
        outputs = codec.named_outputs(result, signature)
        if outputs_wanted:
            outputs = {k: outputs[k] for k in outputs_wanted}
        response = protos.PredictResponse()
        spec = response.model_spec
        spec.name = served.name
        spec.version.value = int(served.version)
        spec.signature_name = served.signature_name
        if sum(a.size for a in outputs.values()) > INLINE_VALUES:
            await asyncio.get_running_loop().run_in_executor(None, _encode, outputs, response)
        else:
            _encode(outputs, response)
        rows = next((len(a) for a in inputs.values() if a.ndim), 0)
        return response, rows

    async def _metadata(self, request: Any) -> tuple[Any, None]:
        fields = list(request.metadata_field)
        if not fields:
            raise RpcError(
                _Code.INVALID_ARGUMENT,
                "GetModelMetadataRequest must specify at least one metadata_field; expected "
                f"[{SIGNATURE_DEF!r}]",
            )
        for field in fields:
            if field != SIGNATURE_DEF:
                raise RpcError(
                    _Code.INVALID_ARGUMENT,
                    f"Metadata field {field} is not supported; expected {SIGNATURE_DEF!r}",
                )
        with self._model(request.model_spec) as served:
            signature = self._signature(served)
        response = protos.GetModelMetadataResponse()
        response.model_spec.name = served.name
        response.model_spec.version.value = int(served.version)
        definitions = protos.SignatureDefMap()
        _signature_def(served.signature_name, signature, definitions.signature_def)
        packed = response.metadata[SIGNATURE_DEF]
        packed.type_url = protos.SIGNATURE_DEF_MAP_URL
        packed.value = definitions.SerializeToString()
        return response, None

    async def _status(self, request: Any) -> tuple[Any, None]:
        name, version, label, _ = _spec_of(request.model_spec)
        models = self.state.models
        assert models is not None
        try:
            if label is not None:  # a label names a version (INVALID_ARGUMENT if unknown)
                version = int(models.lookup(name, None, label).name)
            entries = models.status(name, version)["model_version_status"]
        except ModelNotFound as exc:
            raise RpcError(getattr(_Code, exc.code), exc.message) from None
        response = protos.GetModelStatusResponse()
        for entry in entries:
            status = response.model_version_status.add()
            status.version = int(entry["version"])
            # the server draining: every version is on its way out, as TF Serving reports it
            state = "UNLOADING" if self.state.draining else entry["state"]
            status.state = protos.MODEL_STATES[state]
            if entry["status"]["error_message"]:
                status.status.error_code = _Code.UNKNOWN.value[0]
                status.status.error_message = entry["status"]["error_message"]
        return response, None


def _past_deadline(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _inputs(request: Any, signature: SignatureInfo) -> dict[str, np.ndarray]:
    """The request's tensors as the pool's inputs, checked against the signature's names and
    dtypes (the pool checks shapes and rows)."""
    given = request.inputs
    specs = {t.name: t for t in signature.inputs} if signature.inputs is not None else None
    if specs is not None and set(given) != set(specs):
        extra = sorted(set(given) - set(specs))
        missing = sorted(set(specs) - set(given))
        raise RpcError(
            _Code.INVALID_ARGUMENT,
            f"input size does not match signature: {len(given)}!={len(specs)} "
            f"len({{{','.join(sorted(given))}}}) != len({{{','.join(sorted(specs))}}}). "
            f"Sent extra: {{{','.join(extra)}}}. Missing but required: {{{','.join(missing)}}}.",
        )
    try:
        arrays = {
            name: grpc_codec.to_array(
                name, tensor, specs[name].dtype if specs is not None else None
            )
            for name, tensor in given.items()
        }
    except grpc_codec.TensorError as exc:
        raise RpcError(_Code.INVALID_ARGUMENT, str(exc)) from None
    if specs is None and len(arrays) == 1:  # a callable with no signature takes one array
        return {DEFAULT_INPUT: next(iter(arrays.values()))}
    return arrays


def _output_filter(request: Any, signature: SignatureInfo) -> list[str]:
    wanted = list(request.output_filter)
    if not wanted:
        return []
    known = [t.name for t in signature.outputs] if signature.outputs is not None else None
    seen: set[str] = set()
    for alias in wanted:
        if known is not None and alias not in known:
            raise RpcError(
                _Code.INVALID_ARGUMENT,
                f"output tensor alias not found in signature: {alias} Outputs expected to be "
                f"in the set {{{','.join(sorted(known))}}}.",
            )
        if alias in seen:
            raise RpcError(_Code.INVALID_ARGUMENT, f"duplicate output tensor alias: {alias}")
        seen.add(alias)
    return wanted


def _encode(outputs: dict[str, np.ndarray], response: Any) -> None:
    for name, array in outputs.items():
        grpc_codec.from_array(array, response.outputs[name])


def _signature_def(name: str, signature: SignatureInfo, out: Any) -> None:
    """The served signature as a ``SignatureDef`` (graph tensor names as the REST metadata
    writes them: ``<signature>_<input>:0`` for inputs, the output key for outputs)."""
    definition = out[name]
    definition.method_name = codec.PREDICT_METHOD
    for tensors, target, graph_name in (
        (signature.inputs or (), definition.inputs, lambda t: f"{name}_{t.name}:0"),
        (signature.outputs or (), definition.outputs, lambda t: t.name),
    ):
        for tensor in tensors:
            info = target[tensor.name]
            info.name = graph_name(tensor)
            info.dtype = grpc_codec.ENUM_OF.get(tensor.dtype, 0)
            if tensor.shape is None:
                info.tensor_shape.unknown_rank = True
            else:
                for size in tensor.shape:
                    info.tensor_shape.dim.add(size=-1 if size is None else size)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message for a failed RPC (docs/serving.md, "gRPC")."""
    if isinstance(exc, RpcError):
        return exc.code, exc.message
    if isinstance(exc, QueueFullError):
        return _Code.RESOURCE_EXHAUSTED, f"server overloaded: {exc}"
    if isinstance(exc, PoolClosedError):
        return _Code.UNAVAILABLE, f"the model is not available: {exc}"
    if isinstance(exc, WorkerError):
        message = str(exc.args[0]) if exc.args else str(exc)
        if exc.error_type in INPUT_ERRORS:
            return _Code.INVALID_ARGUMENT, message
        return _Code.INTERNAL, message
    if isinstance(exc, WorkerCrashedError):
        return _Code.INTERNAL, str(exc)
    if isinstance(exc, TimeoutError):
        return _Code.DEADLINE_EXCEEDED, f"deadline exceeded: {exc}"
    if isinstance(exc, PoolError):
        return _Code.INTERNAL, str(exc)
    if isinstance(exc, (ValueError, TypeError)):  # the pool's own input checks
        return _Code.INVALID_ARGUMENT, str(exc)
    return _Code.INTERNAL, f"internal error: {type(exc).__name__}"


def handlers(service: Service) -> list[grpc.GenericRpcHandler]:
    """The two services' method handlers (methods not listed answer UNIMPLEMENTED)."""

    def unary(fn: Any, request: Any, response: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )

    return [
        grpc.method_handlers_generic_handler(
            "tensorflow.serving.PredictionService",
            {
                "Predict": unary(service.predict, protos.PredictRequest, protos.PredictResponse),
                "GetModelMetadata": unary(
                    service.get_model_metadata,
                    protos.GetModelMetadataRequest,
                    protos.GetModelMetadataResponse,
                ),
            },
        ),
        grpc.method_handlers_generic_handler(
            "tensorflow.serving.ModelService",
            {
                "GetModelStatus": unary(
                    service.get_model_status,
                    protos.GetModelStatusRequest,
                    protos.GetModelStatusResponse,
                )
            },
        ),
    ]


class GrpcServer:
    """The gRPC server of a served model, run on the event loop that runs uvicorn.

    :meth:`start` binds and starts it (in the loop); :meth:`drain` refuses new RPCs with
    UNAVAILABLE, waits for those in progress for at most ``grace`` seconds, then stops (RPCs
    still running are cancelled, which cancels their pool requests)."""

    def __init__(
        self,
        state: ServingState,
        metrics: Metrics,
        host: str,
        port: int,
        *,
        request_timeout: float | None,
        max_message_bytes: int,
    ) -> None:
        self.state = state
        self.metrics = metrics
        self.host = host
        self.port = port
        self.request_timeout = request_timeout
        self.max_message_bytes = max_message_bytes
        self.abandoned = 0
        self._server: grpc.aio.Server | None = None
        self._service: Service | None = None
        self._drained: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> None:
        self._service = Service(self.state, self.metrics, self.request_timeout)
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),  # a port in use is an error, not a shared port
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", -1),
            ]
        )
        server.add_generic_rpc_handlers(handlers(self._service))
        try:
            port = server.add_insecure_port(self.address)
        except RuntimeError as exc:  # grpc raises when it cannot bind
            raise OSError(f"cannot bind gRPC on {self.address}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot bind gRPC on {self.address}")
        self.port = port
        await server.start()
        self._server = server

    def begin_drain(self, grace: float) -> None:
        """Start draining (from the event loop's thread); :meth:`stop` waits for it."""
        if self._drained is None and self._server is not None:
            self._drained = asyncio.ensure_future(self._drain(self._server, grace))

    async def _drain(self, server: grpc.aio.Server, grace: float) -> None:
        assert self._service is not None
        try:
            await asyncio.wait_for(self._service.idle.wait(), grace)
        except asyncio.TimeoutError:
            self.abandoned = self._service.active
            self.state.cancelled += self.abandoned
            log.warning(
                "gRPC: %d RPC(s) still running at the drain timeout: cancelled", self.abandoned
            )
        await server.stop(0)  # refuses new RPCs, cancels any still running

    async def stop(self, force: bool = False) -> None:
        """Wait for a drain begun by :meth:`begin_drain`; stop at once if none was begun, or
        with ``force`` (RPCs in progress are cancelled)."""
        server, self._server = self._server, None
        if server is None:
            return
        if self._drained is not None and not force:
            await self._drained
            return
        if self._drained is not None:
            self._drained.cancel()
        if self._service is not None and self._service.active:
            self.abandoned = self._service.active
            self.state.cancelled += self.abandoned
        await server.stop(0)
