"""``create_app(pool, model_name)``: a Starlette (ASGI) application around a running pool.

    client ──HTTP──▶ uvicorn ──▶ app (event loop)                      parent process
                                  │ admit: ≤ max_concurrent_requests predictions, else 503
                                  │ reserve the body's bytes in the parse budget (limits.py)
                                  │ read body (≤ max_body_bytes, within body_timeout, else 408)
                                  │ gunzip, JSON, codec / v2 ─ in a thread when large
                                  │ future = pool.asubmit(inputs) ── validates, queues
                                  │ await future (a timer cancels it at the deadline; a
                                  │ client gone after 50 ms cancels it too)
                                  ▼                                      │
                              JSON answer ◀── outputs ◀── pool's dynamic batching ◀── workers

The app never batches: it submits each request to the pool, whose dispatcher combines the
requests waiting at the same moment into model calls (``max_batch_rows``,
``batch_timeout_micros``). A request whose deadline passes, or whose client disconnects, has
its future cancelled, which drops it from the pool's queue if no worker has taken it yet.
Overload is refused at once: the pool raises ``QueueFullError`` past ``max_queued_requests``
and the client gets 503 with ``Retry-After``, as does a prediction arriving while
``max_concurrent_requests`` are in progress. What one client can make the server hold is
bounded: its body (``max_body_bytes``, read within ``body_timeout``), the memory parsing it
takes (``max_parse_bytes`` of bodies are parsed at once; others wait before being read), and
its time on the event loop (large bodies are decompressed, parsed and encoded in threads). A
request cancelled by the shutdown's drain timeout gets a 503 (not uvicorn's plain-text 500).

Routes (TensorFlow Serving REST, the Open Inference Protocol, Prometheus)::

    POST /v1/models/NAME[/versions/N|/labels/L]:predict
    GET  /v1/models/NAME[/versions/N|/labels/L][/metadata]
    GET  /v2  /v2/health/live  /v2/health/ready    GET /v2/models/NAME[/versions/N][/ready]
    POST /v2/models/NAME[/versions/N]/infer        GET /monitoring/prometheus/metrics

Mount it into an existing Starlette or FastAPI app with ``Mount("/", app=create_app(...))``;
start the pool before the first request and shut it down after the last (the app does not
own it). ``app.state.serving`` (:class:`ServingState`) is the served model's identity and its
``draining`` flag: set it to report ``UNLOADING`` and refuse new predictions with 503.

Several models and versions: pass a :class:`pool.serve.models.ModelRegistry` instead of a pool
(what ``python -m pool serve BASE_PATH`` and ``--model_config_file`` do). Every request is
routed by :meth:`~pool.serve.models.ModelRegistry.acquire` (name, version, label -> the version
that answers it, held until the answer, so an unloading version finishes what it took), or
answered with TF Serving's not-found error.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import __version__
from ..errors import (
    PoolClosedError,
    PoolError,
    QueueFullError,
    WorkerCrashedError,
    WorkerError,
)
from . import codec, v2
from .codec import RequestError
from .limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_REQUEST_TIMEOUT,
    ParseBudget,
    Reservation,
)
from .metrics import CONTENT_TYPE, Metrics
from .models import ModelNotFound, ModelRegistry, Version

log = logging.getLogger("pool.serve")
access_log = logging.getLogger("pool.serve.access")

#: Bodies larger than this are parsed (and their inputs submitted, answers encoded) in a worker
#: thread, so that one large request does not stall every other request on the event loop;
#: smaller ones stay on the loop, where a thread hop would cost more than the work
#: (docs/serving.md, "Limits"). gzip bodies are always decompressed in a thread.
INLINE_BYTES = 64 << 10
#: ...and outputs with more values than this are encoded in a thread.
INLINE_VALUES = 64 << 10
#: Seconds a client is asked to wait before retrying a 503.
RETRY_AFTER_SECONDS = 1
#: TensorFlow error types that mean the input was wrong (TF Serving answers 400 for them).
INPUT_ERRORS = ("InvalidArgumentError", "OutOfRangeError", "FailedPreconditionError")
#: HTTP status logged and counted for a client that went away before its answer.
CLIENT_GONE = 499

_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
_V1 = re.compile(
    r"models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?::(?P<verb>[A-Za-z]+)|/(?P<metadata>metadata))?"
)
_V2 = re.compile(r"(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?:/(?P<action>ready|infer))?")
_Parsed = TypeVar("_Parsed")


@dataclass
class ServingState:
    """What the app serves and whether it is draining (``app.state.serving``)."""

    model_name: str
    version: str
    signature_name: str
    request_timeout: float | None
    max_body_bytes: int
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    max_parse_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    draining: bool = False
    in_flight: int = 0
    predicting: int = 0  # predictions admitted and not yet answered (max_concurrent_requests)
    cancelled: int = 0  # requests abandoned when a drain timed out (their tasks cancelled)
    models: ModelRegistry | None = None  # the served models and versions (routing)


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def create_app(
    pool: Any,
    model_name: str | None = None,
    *,
    model_version: int | str = 1,
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
    max_parse_bytes: int | None = None,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
) -> Starlette:
    """A Starlette app serving ``pool``'s model as ``model_name`` (TF Serving REST API, the Open
    Inference Protocol and Prometheus metrics; see the module docstring and docs/serving.md).

    ``pool`` is a :class:`pool.PredictionPool` (started now or later; the app does not start or
    stop it). ``request_timeout``: seconds from a request's arrival to its answer, else 504
    (``None``: no deadline). ``max_body_bytes``: larger bodies get 413 (after decompression).
    ``max_concurrent_requests``: predictions in progress at once; more get 503 at once.
    ``max_parse_bytes``: bytes of request bodies read and parsed at once (default:
    ``max_body_bytes``); other requests wait before their body is read, until their deadline,
    then get 503. ``body_timeout``: seconds to receive a body once its reading starts, else
    408 and the connection is closed.

    ``pool`` may instead be a :class:`~pool.serve.models.ModelRegistry` (several models and
    versions; ``model_name`` and ``model_version`` then default to its first model's)."""
    registry = pool if isinstance(pool, ModelRegistry) else None
    single = registry is None
    if registry is not None:
        model_name = model_name or registry.names[0]
        serving = registry.serving().get(model_name) or ["0"]
        model_version = serving[-1] if model_version == 1 else model_version
    if not isinstance(model_name, str) or not model_name or re.search(r"[/:\s]", model_name):
        raise ValueError(
            f"model_name must be a non-empty name without '/', ':' or spaces, got {model_name!r}"
        )
    version = str(model_version)
    if not version.isdigit():
        raise ValueError(f"model_version must be a non-negative integer, got {model_version!r}")
    if request_timeout is not None and not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0 seconds or None, got {request_timeout!r}")
    if (
        isinstance(max_body_bytes, bool)
        or not isinstance(max_body_bytes, int)
        or max_body_bytes < 1
    ):
        raise ValueError(f"max_body_bytes must be a positive int, got {max_body_bytes!r}")
    _positive_int("max_concurrent_requests", max_concurrent_requests)
    if max_parse_bytes is None:
        max_parse_bytes = max_body_bytes
    _positive_int("max_parse_bytes", max_parse_bytes)
    if max_parse_bytes < max_body_bytes:
        raise ValueError(
            f"max_parse_bytes must be >= max_body_bytes ({max_body_bytes}): a body of the "
            f"largest size allowed must fit the parse budget, got {max_parse_bytes}"
        )
    if isinstance(body_timeout, bool) or not isinstance(body_timeout, (int, float)):
        raise ValueError(f"body_timeout must be > 0 seconds, got {body_timeout!r}")
    if not body_timeout > 0:
        raise ValueError(f"body_timeout must be > 0 seconds, got {body_timeout!r}")
    if registry is None:
        registry = ModelRegistry.single(pool, model_name, version)
    signature_name = pool.signature_name if single else registry.signature_name
    pool = pool if single else _DefaultPool(registry)  # what the metrics read
    state = ServingState(
        model_name=model_name,
        version=version,
        signature_name=signature_name,
        request_timeout=request_timeout,
        max_body_bytes=max_body_bytes,
        max_concurrent_requests=max_concurrent_requests,
        max_parse_bytes=max_parse_bytes,
        body_timeout=float(body_timeout),
        models=registry,
    )
    handlers = _Handlers(pool, state, Metrics(pool))
    routes = [
        Route("/v1/{rest:path}", handlers.v1, methods=_METHODS),
        Route("/v2", handlers.v2_server, methods=["GET"]),
        Route("/v2/health/live", handlers.v2_live, methods=["GET"]),
        Route("/v2/health/ready", handlers.v2_ready, methods=["GET"]),
        Route("/v2/models/{rest:path}", handlers.v2_model, methods=["GET", "POST"]),
        Route("/monitoring/prometheus/metrics", handlers.metrics, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_exception},  # 404 / 405 as JSON errors
    )
    app.state.serving = state
    app.state.metrics = handlers.metrics_registry
    app.state.serving_metrics = handlers._metrics  # shared with the gRPC server (grpc_service)
    return app


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


async def _http_exception(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "")
    return _json_error(status, f"{detail}: {request.method} {request.url.path}")


def _json_error(status: int, message: str, close: bool = False) -> Response:
    """TF Serving's error body; 503 with ``Retry-After``; ``close``: close the connection after
    the answer (the rest of the request body is not read)."""
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else {}
    if close:
        headers["Connection"] = "close"
    return Response(codec.error_body(message), status, headers, "application/json")


def _json(body: Any, status: int = 200) -> Response:
    content = body if isinstance(body, bytes) else codec.dumps(body)
    return Response(content, status, media_type="application/json")


class _Handlers:
    def __init__(self, pool: Any, state: ServingState, metrics: Metrics) -> None:
        self.pool = pool
        self.state = state
        assert state.models is not None
        self.models: ModelRegistry = state.models
        self._budget = ParseBudget(state.max_parse_bytes)
        self._metrics = metrics
        self.metrics_registry = metrics.registry

    # --- TensorFlow Serving REST ----------------------------------------------------------
    async def v1(self, request: Request) -> Response:
        started = time.perf_counter()
        rest = request.path_params["rest"]
        match = _V1.fullmatch(rest)
        api, rows = "v1_other", None
        held: Version | None = None
        self._enter()
        try:
            if match is None:
                raise RequestError(f"Malformed request: {request.method} /v1/{rest}")
            verb, metadata = match["verb"], match["metadata"]
            if request.method == "POST" and verb is not None:
                api = f"v1_{verb}"
                if verb in ("classify", "regress"):
                    self._check_model(match["name"], match["version"], match["label"])
                    raise RequestError(
                        f":{verb} is not implemented by this server; use :predict", 501
                    )
                if verb != "predict":
                    raise RequestError(f"Malformed request: {request.method} /v1/{rest}")
                held = self._acquire(match["name"], match["version"], match["label"])
                response, rows = await self._predict(request, started, held)
            elif request.method == "GET" and verb is None:
                api = "v1_metadata" if metadata else "v1_status"
                if metadata:
                    found = self._check_model(match["name"], match["version"], match["label"])
                    response = self._metadata(found)
                else:
                    response = self._status(match["name"], match["version"], match["label"])
            else:
                raise RequestError(f"Malformed request: {request.method} /v1/{rest}")
        except asyncio.CancelledError:  # the drain timed out: answer 503, not uvicorn's 500
            response = self._cancelled(request)
        except Exception as exc:
            response = self._failure(exc, request)
        finally:
            if held is not None:
                self.models.release(held)
            self._leave()
        self._done(request, api, response.status_code, started, rows)
        return response

    # --- routing: name, version, label -> the version that answers ------------------------
    def _check_model(self, name: str, version: str | None, label: str | None) -> Version:
        """The version serving ``name`` (pinned to ``version`` or ``label``), or the not-found
        error TF Serving answers (404; 400 for an unknown label)."""
        try:
            return self.models.lookup(name, version, label)
        except ModelNotFound as exc:
            raise self._not_found(exc, name) from None

    def _acquire(self, name: str, version: str | None, label: str | None) -> Version:
        """:meth:`_check_model`, holding the version until ``models.release``."""
        try:
            return self.models.acquire(name, version, label)
        except ModelNotFound as exc:
            raise self._not_found(exc, name) from None

    def _not_found(self, exc: ModelNotFound, name: str) -> RequestError:
        serving = self.models.serving()
        if name not in serving:
            hint = f"this server serves {', '.join(repr(n) for n in serving)}"
        elif not serving[name]:
            hint = f"model {name!r} has no version available"
        else:
            versions = serving[name]
            hint = f"model {name!r}: this server serves version{'s' * (len(versions) > 1)} "
            hint += ", ".join(versions)
        return RequestError(f"{exc.message}; {hint}", exc.http_status)

    def _model_state(self, served: Version | None = None) -> str:
        if self.state.draining:
            return "UNLOADING"
        if served is None:
            try:
                served = self.models.lookup(self.state.model_name)
            except ModelNotFound:
                return "END"
        return served.current_state()

    def _status(self, name: str, version: str | None, label: str | None) -> Response:
        if label is not None:
            version = self._check_model(name, None, label).name
        try:
            body = self.models.status(name, version)
        except ModelNotFound as exc:
            raise self._not_found(exc, name) from None
        if self.state.draining:
            for entry in body["model_version_status"]:
                if entry["state"] == "AVAILABLE":
                    entry["state"] = "UNLOADING"
        return _json(body)

    def _signature(self, served: Version) -> Any:
        try:
            return served.pool.signature
        except (PoolClosedError, AttributeError):
            raise RequestError(
                f"model {served.model!r} version {served.name} is not available (state "
                f"{self._model_state(served)}); expected a running pool",
                503,
            ) from None

    def _metadata(self, served: Version) -> Response:
        return _json(
            codec.metadata_body(
                served.model, served.name, served.pool.signature_name, self._signature(served)
            )
        )

    async def _predict(
        self, request: Request, started: float, version: Version
    ) -> tuple[Response, int]:
        with self._admitted():
            signature = self._signature(version)
            served = version.pool.signature_name
            parsed = await self._parse(request, started, _parse_v1, served, signature)
            result = await self._call(request, parsed.inputs, started, version.pool)
            outputs = codec.named_outputs(result, signature)
            if sum(a.size for a in outputs.values()) > INLINE_VALUES:
                content = await run_in_threadpool(codec.encode_predict, outputs, parsed.columnar)
            else:
                content = codec.encode_predict(outputs, parsed.columnar)
            return _json(content), parsed.rows

    # --- admission, the body and its parsing ------------------------------------------------
    def _admitted(self) -> _Admission:
        """Admit a prediction, or refuse it at once with 503: the server is draining, or
        ``max_concurrent_requests`` predictions are in progress already."""
        state = self.state
        if state.draining:
            raise RequestError("the server is shutting down; retry on another replica", 503)
        if state.predicting >= state.max_concurrent_requests:
            raise RequestError(
                f"server overloaded: {state.predicting} requests in progress "
                f"(max_concurrent_requests={state.max_concurrent_requests}); retry later",
                503,
            )
        return _Admission(state)

    async def _parse(
        self, request: Request, started: float, parse: Callable[..., _Parsed], *args: Any
    ) -> _Parsed:
        """Read the body and ``parse(body, *args)`` it within the parse budget: gunzip always,
        and parsing when the body is large, run in a thread."""
        state = self.state
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip"):
            raise RequestError(
                f"unsupported Content-Encoding {encoding!r}: expected gzip or none", 415
            )
        reservation = Reservation(self._budget)
        try:
            body = await self._body(request, started, reservation)
            if encoding == "gzip":
                return await run_in_threadpool(
                    _gunzip_and_parse, body, state.max_body_bytes, reservation, parse, *args
                )
            if len(body) > INLINE_BYTES:
                return await run_in_threadpool(parse, body, *args)
            return parse(body, *args)
        finally:
            reservation.release()

    async def _body(
        self, request: Request, started: float, reservation: Reservation
    ) -> bytes | bytearray:
        """The request body, read once its declared size fits the parse budget (waiting until
        the request's deadline for it, else 503), within ``body_timeout`` (else 408)."""
        state = self.state
        limit = state.max_body_bytes
        header = request.headers.get("content-length")
        declared = int(header) if header is not None and header.isdigit() else None
        if declared is not None and declared > limit:
            raise RequestError(
                f"request body too large: expected at most {limit} bytes (max_body_bytes), "
                f"got {declared}",
                413,
            )
        if declared:
            timeout = state.request_timeout
            wait = state.body_timeout if timeout is None else timeout - _since(started)
            if not await reservation.take(declared, max(0.0, wait)):
                raise self._busy()
        loop = asyncio.get_running_loop()
        # One timer for the whole body, which cancels this task if it still waits then (no
        # task per receive, as asyncio.wait_for would make): a body that came with its
        # headers, the common case, is received without waiting at all.
        expiry = _Expiry(asyncio.current_task())
        timer = loop.call_at(loop.time() + state.body_timeout, expiry.fire)
        body: bytes | bytearray = b""
        try:
            while True:
                expiry.waiting = True
                message = await request.receive()
                expiry.waiting = False
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunk = message.get("body", b"")
                if not body:
                    body = chunk  # one message (the common case): not copied
                elif chunk:
                    if not isinstance(body, bytearray):
                        body = bytearray(body)
                    body += chunk
                if len(body) > limit:  # a chunked body with no declared size
                    raise RequestError(
                        f"request body too large: expected at most {limit} bytes "
                        f"(max_body_bytes), got more than {limit}",
                        413,
                    )
                if not reservation.grow_to(len(body)):
                    raise self._busy()
                if not message.get("more_body", False):
                    return body  # json and orjson read a bytearray as well
        except asyncio.CancelledError:
            if not expiry.fired:
                raise  # the task itself was cancelled (the drain timed out)
            expiry.uncancel()
            raise RequestError(
                f"request body not received within {state.body_timeout:g} s (body_timeout): "
                f"got {len(body)} of {header if declared is not None else 'an unknown'} bytes",
                408,
            ) from None
        finally:
            timer.cancel()

    def _busy(self) -> RequestError:
        budget = self._budget
        return RequestError(
            f"server busy: {budget.used} bytes of request bodies are being parsed "
            f"(max_parse_bytes={budget.limit}); retry later",
            503,
        )

    async def _call(self, request: Request, inputs: dict, started: float, pool: Any) -> Any:
        """Submit ``inputs`` to ``pool`` (the version answering) and await the answer, until
        the request's deadline (else 504) or its client's disconnect (then 499); either
        cancels the call, which drops it from the pool's queue if no worker took it yet."""
        try:
            waiter = await pool_call(pool, inputs)
        except (ValueError, TypeError) as exc:  # the input does not fit the signature
            raise RequestError(str(exc)) from None
        loop = asyncio.get_running_loop()
        timeout = self.state.request_timeout
        deadline = None if timeout is None else loop.time() + timeout - _since(started)
        watch = _Watch(request, waiter, timeout, deadline)
        # One timer: most answers come before it fires and cost no task and no other timer.
        # Then the disconnect watch starts and the deadline's timer is set (if still ahead).
        first = DISCONNECT_CHECK_SECONDS
        if deadline is not None:
            first = min(first, max(0.0, deadline - loop.time()))
        watch.timer = loop.call_later(first, watch.start)
        try:
            return await waiter
        except asyncio.CancelledError:
            if watch.reason is not None:  # our deadline or the client's disconnect
                raise watch.reason from None
            raise  # the task itself was cancelled (the drain timed out)
        finally:
            watch.timer.cancel()
            if watch.task is not None:
                watch.task.cancel()
            if not waiter.done():
                waiter.cancel()  # cancels the pool's future: drops its queued shards

    # --- errors, logs, counters ------------------------------------------------------------
    def _failure(self, exc: Exception, request: Request) -> Response:
        """The error answer for ``exc``, logged by whose fault it is: a server fault at ERROR
        (with its traceback if unexpected), a deadline at WARNING, a client's mistake (4xx,
        501) and a refusal under load (503) at INFO (they are counted in the metrics)."""
        status, message = _status_of(exc)
        path = request.scope["path"]
        if status == 500 and not isinstance(exc, PoolError):
            log.error("internal error on %s %s", request.method, path, exc_info=exc)
        elif status >= 500 and status not in (501, 503, 504):
            log.error("%s %s -> %d: %s", request.method, path, status, message)
        elif status == 504:
            log.warning("%s %s -> %d: %s", request.method, path, status, message)
        elif status != CLIENT_GONE:
            log.info("%s %s -> %d: %s", request.method, path, status, message)
        return _json_error(status, message, close=status == 408)

    def _cancelled(self, request: Request) -> Response:
        """The answer to a request whose task was cancelled: the shutdown's drain timeout
        passed (uvicorn would answer a plain-text 500)."""
        self.state.cancelled += 1
        log.warning(
            "%s %s -> 503: cancelled, the drain timeout passed", request.method, request.url.path
        )
        return _json_error(
            503,
            "the server is shutting down and could not finish this request within its drain "
            "timeout; retry on another replica",
            close=True,
        )

    def _done(
        self, request: Request, api: str, status: int, started: float, rows: int | None
    ) -> None:
        seconds = time.perf_counter() - started
        self._metrics.observe(api, status, seconds)
        if rows is not None:
            self._metrics.rows.labels(api).observe(rows)
        if access_log.isEnabledFor(logging.INFO):
            path = request.scope["path"]
            access_log.info(
                "%s %s %d %.1f ms%s",
                request.method,
                path,
                status,
                seconds * 1e3,
                "" if rows is None else f" rows={rows}",
                extra={
                    "method": request.method,
                    "path": path,
                    "status": status,
                    "seconds": round(seconds, 6),
                    "rows": rows,
                    "api": api,
                    "model": self.state.model_name,
                    "client": request.client.host if request.client else None,
                },
            )

    def _enter(self) -> None:
        self.state.in_flight += 1
        self._metrics.in_flight.inc()

    def _leave(self) -> None:
        self.state.in_flight -= 1
        self._metrics.in_flight.dec()

    # --- the Open Inference Protocol --------------------------------------------------------
    async def v2_server(self, request: Request) -> Response:
        return _json({"name": "pool", "version": __version__, "extensions": []})

    async def v2_live(self, request: Request) -> Response:
        return _json({"live": True})

    async def v2_ready(self, request: Request) -> Response:
        ready = self._model_state() == "AVAILABLE"
        return _json({"ready": ready}, 200 if ready else 400)

    async def v2_model(self, request: Request) -> Response:
        started = time.perf_counter()
        rest = request.path_params["rest"]
        match = _V2.fullmatch(rest)
        api, rows = "v2_other", None
        held: Version | None = None
        self._enter()
        try:
            if match is None:
                raise RequestError(f"Malformed request: {request.method} /v2/models/{rest}", 404)
            action = match["action"]
            api = f"v2_{action or 'metadata'}"
            if request.method == "POST" and action == "infer":
                held = self._acquire(match["name"], match["version"], None)
                response, rows = await self._infer(request, started, held)
            elif request.method == "GET" and action == "ready":
                found = self._check_model(match["name"], match["version"], None)
                ready = self._model_state(found) == "AVAILABLE"
                body = {"name": found.model, "ready": ready}
                response = _json(body, 200 if ready else 400)
            elif request.method == "GET" and action is None:
                found = self._check_model(match["name"], match["version"], None)
                response = _json(v2.model_metadata(found.model, found.name, self._signature(found)))
            else:
                self._check_model(match["name"], match["version"], None)
                raise RequestError(f"{request.method} is not allowed on /v2/models/{rest}", 405)
        except asyncio.CancelledError:  # the drain timed out: answer 503, not uvicorn's 500
            response = self._cancelled(request)
        except Exception as exc:
            response = self._failure(exc, request)
        finally:
            if held is not None:
                self.models.release(held)
            self._leave()
        self._done(request, api, response.status_code, started, rows)
        return response

    async def _infer(
        self, request: Request, started: float, version: Version
    ) -> tuple[Response, int]:
        with self._admitted():
            signature = self._signature(version)
            inputs, names, request_id = await self._parse(request, started, _parse_v2, signature)
            result = await self._call(request, inputs, started, version.pool)
            outputs = codec.named_outputs(result, signature)
            encode = v2.encode_infer
            arguments = (version.model, version.name, request_id, outputs, signature, names)
            if sum(a.size for a in outputs.values()) > INLINE_VALUES:
                content = await run_in_threadpool(encode, *arguments)
            else:
                content = encode(*arguments)
            rows = next((len(a) for a in inputs.values() if a.ndim), 0)
            return _json(content), rows

    # --- Prometheus -----------------------------------------------------------------------
    async def metrics(self, request: Request) -> Response:
        content = await run_in_threadpool(self._metrics.render)
        return Response(content, 200, media_type=CONTENT_TYPE)


class _DefaultPool:
    """The pool the metrics read for a registry: its first model's serving version."""

    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    def stats(self) -> list:
        pool = self._registry.default_pool()
        return [] if pool is None else pool.stats()

    def queued_requests(self) -> int:
        pool = self._registry.default_pool()
        return 0 if pool is None else pool.queued_requests()

    def __getattr__(self, name: str) -> Any:
        pool = self._registry.default_pool()
        if pool is None:
            raise PoolClosedError("no version of the model is available")
        return getattr(pool, name)


async def pool_call(pool: Any, inputs: dict[str, Any]) -> asyncio.Future:
    """``pool``'s call for ``inputs`` as an asyncio future (cancelling it cancels the call):
    small inputs are validated and queued on the event loop (``PredictionPool.asubmit``), larger
    ones than ``INLINE_BYTES`` in a thread, since validating copies them. Raises what ``submit``
    raises (``ValueError``/``TypeError`` for inputs that do not fit, ``QueueFullError``). The
    one hand-off from both protocols to the pool."""
    if sum(a.nbytes for a in inputs.values()) > INLINE_BYTES:
        return asyncio.wrap_future(await run_in_threadpool(pool.submit, inputs))
    return pool.asubmit(inputs)


def _parse_v1(body: bytes | bytearray, served: str, signature: Any) -> codec.PredictRequest:
    payload = codec.loads(body)
    name = codec.signature_name(payload, served)
    if name != served:
        raise RequestError(
            f"signature {name!r} not found: this server serves signature {served!r} (start "
            f"another server with --signature {name} to serve it)",
            404,
        )
    return codec.parse_predict(payload, signature)


def _parse_v2(body: bytes | bytearray, signature: Any) -> tuple[dict, list[str] | None, str | None]:
    return v2.parse_infer(codec.loads(body), signature)


def _gunzip_and_parse(
    body: bytes | bytearray,
    limit: int,
    reservation: Reservation,
    parse: Callable[..., _Parsed],
    *args: Any,
) -> _Parsed:
    """Decompress a gzip body (in a worker thread) and parse it."""
    return parse(gunzip(body, limit, reservation), *args)


#: Bytes decompressed at a time (each step is checked against the limit and the parse budget).
GUNZIP_STEP = 1 << 20


def gunzip(
    body: bytes | bytearray, limit: int, reservation: Reservation | None = None
) -> bytearray:
    """A gzip-compressed body, decompressed to at most ``limit`` bytes (no zip bombs), each
    step taken from the parse budget through ``reservation`` (503 when it does not fit)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = bytearray()
    data = body
    try:
        while not inflater.eof:
            piece = inflater.decompress(data, GUNZIP_STEP)
            data = inflater.unconsumed_tail
            out += piece
            if len(out) > limit:
                raise RequestError(
                    f"request body too large: expected at most {limit} bytes (max_body_bytes) "
                    "once decompressed",
                    413,
                )
            if reservation is not None and not reservation.grow_to(len(out)):
                budget = reservation.budget
                raise RequestError(
                    f"server busy: {budget.used} bytes of request bodies are being parsed "
                    f"(max_parse_bytes={budget.limit}); retry later",
                    503,
                )
            if not data and len(piece) < GUNZIP_STEP:
                break  # all the input is consumed and nothing more is buffered
    except zlib.error as exc:
        raise RequestError(
            f"Content-Encoding is gzip, but the body is not gzip data ({exc})"
        ) from None
    if not inflater.eof:
        raise RequestError("Content-Encoding is gzip, but the gzip data is truncated")
    return out


def _since(started: float) -> float:
    return time.perf_counter() - started


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


#: Seconds a prediction waits before its client's disconnect is watched for (by a task reading
#: the ASGI ``receive`` channel). Most answers come sooner and cost no task; a client that goes
#: away is noticed at most this much later than it would be otherwise.
DISCONNECT_CHECK_SECONDS = 0.05


class _Expiry:
    """Cancels ``task`` when fired while it waits for a message (``waiting``); ``fired`` tells
    the task that the cancellation was this timer's, which :meth:`uncancel` then takes back
    (Python 3.11+ counts cancellations)."""

    __slots__ = ("task", "waiting", "fired")

    def __init__(self, task: asyncio.Task | None) -> None:
        self.task = task
        self.waiting = False
        self.fired = False

    def fire(self) -> None:
        if self.waiting and self.task is not None:
            self.fired = True
            self.task.cancel()

    def uncancel(self) -> None:
        uncancel = getattr(self.task, "uncancel", None)
        if uncancel is not None:
            uncancel()


class _Admission:
    """One admitted prediction, counted in ``state.predicting`` while the ``with`` lasts."""

    __slots__ = ("state",)

    def __init__(self, state: ServingState) -> None:
        self.state = state

    def __enter__(self) -> None:
        self.state.predicting += 1

    def __exit__(self, *exc: object) -> None:
        self.state.predicting -= 1


class _Watch:
    """Cancels a prediction's waiter when its deadline passes or its client disconnects, and
    says why (``reason``). Nothing is watched before :meth:`start` (its first timer): then the
    disconnect watch task starts and the deadline's timer replaces the first."""

    __slots__ = ("request", "waiter", "timeout", "deadline", "reason", "task", "timer")

    def __init__(
        self,
        request: Request,
        waiter: asyncio.Future,
        timeout: float | None,
        deadline: float | None,
    ) -> None:
        self.request = request
        self.waiter = waiter
        self.timeout = timeout
        self.deadline = deadline  # loop time
        self.reason: BaseException | None = None
        self.task: asyncio.Task | None = None
        self.timer: asyncio.Handle

    def stop(self, reason: BaseException) -> None:
        if not self.waiter.done():
            self.reason = reason
            self.waiter.cancel()

    def expire(self) -> None:
        self.stop(
            RequestError(
                f"deadline exceeded: no answer within the request timeout of {self.timeout} s",
                504,
            )
        )

    def start(self) -> None:
        if self.waiter.done():
            return
        loop = self.waiter.get_loop()
        if self.deadline is not None:
            if loop.time() >= self.deadline:
                self.expire()
                return
            self.timer = loop.call_at(self.deadline, self.expire)
        self.task = asyncio.ensure_future(_disconnected(self.request))
        self.task.add_done_callback(self._gone)

    def _gone(self, task: asyncio.Task) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: a failed receive counts as the client gone
            self.stop(_ClientGone())


def _status_of(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and message for a failed request (see docs/serving.md, "Errors")."""
    if isinstance(exc, RequestError):
        return exc.status, exc.message
    if isinstance(exc, _ClientGone):
        return CLIENT_GONE, "the client disconnected before its answer"
    if isinstance(exc, QueueFullError):
        return 503, f"server overloaded: {exc}"
    if isinstance(exc, PoolClosedError):
        return 503, f"the model is not available: {exc}"
    if isinstance(exc, WorkerError):
        message = str(exc.args[0]) if exc.args else str(exc)
        if exc.error_type in INPUT_ERRORS:
            return 400, message
        return 500, message
    if isinstance(exc, WorkerCrashedError):
        return 500, str(exc)
    if isinstance(exc, TimeoutError):
        return 504, f"deadline exceeded: {exc}"
    if isinstance(exc, PoolError):
        return 500, str(exc)
    return 500, f"internal error: {type(exc).__name__}"
