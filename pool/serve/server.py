"""Run a served model: bind the port, start the pool, serve with uvicorn, drain on a signal.

    serve(MODEL) ─ check MODEL: a SavedModel with that signature  read from saved_model.pb,
                                                              no worker, no TensorFlow
                 ─ bind HOST:PORT (fails fast: port in use)   no connection is accepted yet
                 ─ PredictionPool(...).start()                every worker loads and warms up
                 ─ uvicorn serves create_app(pool)            AVAILABLE from the first request
      SIGTERM / SIGINT ─ draining: stop accepting, answer the requests in flight (at most
                         drain_timeout seconds, then cancel them), stop the workers, return 0
      a second SIGINT  ─ stop at once

The model path and signature are checked, and the port bound, before the model loads, so that
these mistakes fail in milliseconds, not after the load; clients are refused (not queued) until
the pool is ready, because the socket only starts listening then.

A base path holding numbered versions, or a model config file, is served by a
:class:`pool.serve.models.ModelRegistry` instead of one pool: every model's versions load
before the port listens, then a thread polls the base paths (and the config file) and loads,
switches and unloads versions while the server runs (docs/serving.md, "Versions and several
models").
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import uvicorn

from ..errors import ModelLoadError
from ..prediction_pool import PredictionPool
from ..savedmodel_pb import check_signature, not_a_savedmodel
from .app import create_app
from .grpc_service import DEFAULT_GRPC_PORT, GrpcServer
from .limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_REQUEST_TIMEOUT,
)

log = logging.getLogger("pool.serve")

#: Defaults shared by :func:`serve` and the command line.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8501
DEFAULT_DRAIN_TIMEOUT = 30.0


def model_identity(model: str) -> tuple[str, str, str]:
    """``(path to load, model name, version)`` for ``MODEL`` as TF Serving lays models out.

    - ``models/resnet/3`` (a numbered SavedModel directory): name ``resnet``, version 3;
    - ``models/resnet`` holding numbered SavedModel directories (TF Serving's
      ``--model_base_path``): the highest version is served;
    - any other directory: its own name, version 1;
    - a TF Hub handle: its last path component that is not a number, and that number."""
    if "://" in model:
        parts = [p for p in model.rstrip("/").split("://", 1)[1].split("/") if p]
        version = parts[-1] if parts and parts[-1].isdigit() else "1"
        names = [p for p in parts[1:] if not p.isdigit()] or parts[:1] or ["model"]
        return model, _clean(names[-1]), version
    path = Path(model)
    if path.is_dir() and not (path / "saved_model.pb").exists():
        versions = [
            p for p in path.iterdir() if p.name.isdigit() and (p / "saved_model.pb").exists()
        ]
        if versions:
            best = max(versions, key=lambda p: int(p.name))
            return str(best), _clean(path.resolve().name), str(int(best.name))
    resolved = path.resolve()
    if resolved.name.isdigit():
        return model, _clean(resolved.parent.name), str(int(resolved.name))
    return model, _clean(resolved.name), "1"


def check_model(path: str, signature: str = "serving_default") -> None:
    """Refuse a local ``path`` that is not a SavedModel directory, or has no ``signature``,
    with a ``ValueError`` naming what was expected and what was found, before any worker
    starts. The signatures are read from ``saved_model.pb`` without TensorFlow, by the reader
    ``python -m pool inspect`` and ``predict`` use; a TF Hub handle, or a file that reader
    cannot describe, is left to the workers to load."""
    if "://" in path:
        return
    reason = not_a_savedmodel(path)
    if reason is not None:
        if os.path.isdir(path):
            reason += ", nor numbered version directories holding one"
        raise ValueError(f"model {path!r} is not a SavedModel directory ({reason})")
    try:
        check_signature(path, signature, None)  # the core's own check, as a usage error here
    except ModelLoadError as exc:
        raise ValueError(f"{exc} (python -m pool inspect MODEL lists them)") from None


def _clean(name: str) -> str:
    cleaned = "".join("_" if c in "/: \t" else c for c in name)
    return cleaned or "model"


class BindError(OSError):
    """The address cannot be bound (in use, not local, not permitted)."""


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and not yet listening (``port`` 0: any free port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise BindError(f"cannot resolve host {host!r}: {exc}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, with our own signal handling: the first SIGTERM/SIGINT marks the app
    draining and asks uvicorn to shut down gracefully; unlike uvicorn's default, the signal is
    not re-raised afterwards, so the process can stop its workers and exit 0. A gRPC server
    (:class:`pool.serve.grpc_service.GrpcServer`) runs on the same event loop: started before
    uvicorn serves, drained from the signal on, stopped after uvicorn returns."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_signal: Callable[[int], None],
        grpc_server: GrpcServer | None = None,
        on_listening: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._on_signal = on_signal
        self._grpc = grpc_server
        self._on_listening = on_listening

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        if self._grpc is not None:
            await self._grpc.start()
        try:
            if self._on_listening is not None:
                self._on_listening()
            await super().serve(sockets)
        finally:
            if self._grpc is not None:
                await self._grpc.stop(force=self.force_exit)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(signum: int, frame: Any) -> None:
            if self.should_exit and signum == signal.SIGINT:
                self.force_exit = True
                return
            self._on_signal(signum)
            self.should_exit = True

        previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def url_of(sock: socket.socket) -> str:
    """``http://HOST:PORT`` of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_app(
    app: Any,
    sock: socket.socket,
    *,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    on_listening: Callable[[], None] | None = None,
    grpc_server: GrpcServer | None = None,
) -> bool:
    """Serve ``app`` (from :func:`pool.serve.create_app`) with uvicorn on the bound ``sock``
    (and ``grpc_server`` on the same event loop) until SIGTERM or SIGINT, then drain: stop
    accepting, let the requests in flight finish for at most ``drain_timeout`` seconds, cancel
    the rest. ``on_listening()`` runs once the sockets listen. Returns whether requests in
    flight were abandoned (the pool's owner should then stop it with ``kill=True``). Run it in
    the main thread (signals are only seen there)."""
    state = app.state.serving

    def on_signal(signum: int) -> None:
        state.draining = True
        if grpc_server is not None:  # the handler runs on the loop's thread, between callbacks
            asyncio.get_running_loop().call_soon_threadsafe(grpc_server.begin_drain, drain_timeout)
        log.info(
            "%s: draining %d request(s) in flight (at most %.0f s), then stopping",
            signal.Signals(signum).name,
            state.in_flight,
            drain_timeout,
        )

    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        # uvicorn declares an int, and waits with asyncio.wait_for: a float works as well
        timeout_graceful_shutdown=drain_timeout,  # type: ignore[arg-type]
    )
    server = _Server(config, on_signal, grpc_server, on_listening)
    loop_name, parser = http_stack()
    log.info(
        "HTTP: uvicorn %s, %s event loop, %s parser%s",
        uvicorn.__version__,
        loop_name,
        parser,
        ""
        if (loop_name, parser) != ("asyncio", "h11")
        else " (install uvloop and httptools, the serve extra, for less CPU per request)",
        extra={"event_loop": loop_name, "http_parser": parser},
    )
    sock.listen(config.backlog)  # from here connections wait in the backlog for uvicorn
    server.run(sockets=[sock])
    return state.cancelled > 0 or server.force_exit


def http_stack() -> tuple[str, str]:
    """The event loop and HTTP parser uvicorn picks with ``loop="auto"`` and ``http="auto"``
    (its defaults): uvloop and httptools when they import, else asyncio and h11."""
    found = []
    for module, fast, fallback in (
        ("uvloop", "uvloop", "asyncio"),
        ("httptools", "httptools", "h11"),
    ):
        try:
            importlib.import_module(module)
        except ImportError:
            found.append(fallback)
        else:
            found.append(fast)
    return found[0], found[1]


class Terminated(BaseException):
    """SIGTERM while the workers were loading the model."""


def serve(
    model: str | None,
    *,
    model_name: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    grpc_port: int | None = DEFAULT_GRPC_PORT,
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
    max_parse_bytes: int | None = None,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    on_ready: Callable[[str, str, str], None] | None = None,
    on_grpc_ready: Callable[[str], None] | None = None,
    model_config_file: str | None = None,
    file_system_poll_wait_seconds: float = 1.0,
    model_config_file_poll_wait_seconds: float = 0.0,
    model_version_policy: str | None = None,
    **pool_options: Any,
) -> int:
    """Serve ``model`` until SIGTERM or SIGINT; return 0 once drained and stopped.

    ``request_timeout``, ``max_body_bytes``, ``max_concurrent_requests``, ``max_parse_bytes``
    and ``body_timeout`` go to :func:`pool.serve.create_app`; ``pool_options`` to
    :class:`pool.PredictionPool` (``workers``, ``signature``, ``threads_per_worker``,
    ``timeout``, ``max_batch_rows``, ``max_batch_bytes``, ``batch_timeout_micros``,
    ``max_queued_requests``...). ``on_ready(url, name, version)`` is called once the workers
    are ready and the port listens. ``grpc_port``: TF Serving's gRPC API on that port of
    ``host`` (0: any free port; ``None``: no gRPC); ``on_grpc_ready(address)`` is called just
    before ``on_ready`` with its ``HOST:PORT``. Raises ``ValueError`` for a bad option, a local
    ``model`` that is not a SavedModel or lacks the signature (before any worker starts),
    ``OSError`` (:class:`BindError`) if an address cannot be bound,
    :class:`pool.ModelLoadError` if the model does not load.

    Versions and several models (``pool.serve.models``): ``model`` a base path holding numbered
    versions, or ``model_config_file`` (TF Serving's ``model_config_list``; ``model`` is then
    ``None``), is served by a registry that polls every ``file_system_poll_wait_seconds`` (0:
    once) under ``model_version_policy`` (``latest[:N]``, ``all``, ``specific:V1,V2``) and
    re-reads the config file every ``model_config_file_poll_wait_seconds`` (0: once). Both
    protocols find models through the same registry."""
    if drain_timeout is None or not drain_timeout > 0:
        raise ValueError(f"drain_timeout must be > 0 seconds, got {drain_timeout!r}")
    app_options: dict[str, Any] = dict(
        request_timeout=request_timeout,
        max_body_bytes=max_body_bytes,
        max_concurrent_requests=max_concurrent_requests,
        max_parse_bytes=max_parse_bytes,
        body_timeout=body_timeout,
    )
    # Every check that needs no worker, cheapest first: the options (the pool, the registry
    # and the app validate theirs when built; none starts anything), the model, the addresses.
    registry = build_registry(
        model,
        model_name,
        model_config_file,
        model_version_policy,
        file_system_poll_wait_seconds,
        model_config_file_poll_wait_seconds,
        pool_options,
    )
    pool: PredictionPool | None = None
    if registry is None:
        assert model is not None
        path, default_name, version = model_identity(model)
        name = model_name or default_name
        pool = PredictionPool(path, **pool_options)
        app = create_app(pool, name, model_version=version, **app_options)
        check_model(path, pool.signature_name)
        start, stop = pool.start, pool.shutdown
    else:
        app = create_app(registry, **app_options)
        start, stop = registry.start, registry.stop
    sock = bind(host, port)
    grpc_server = None
    if grpc_port is not None:
        grpc_server = _grpc_server(app, host, grpc_port, sock, request_timeout, max_body_bytes)
    in_main = threading.current_thread() is threading.main_thread()

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate) if in_main else None
    try:
        started = time.perf_counter()
        start()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
            previous = None
        url = url_of(sock)
        if pool is not None:
            _log_ready(pool, path, name, version, url, time.perf_counter() - started)
        else:
            assert registry is not None
            serving = registry.serving()
            log.info(
                "serving %s on %s: ready in %.1f s (pid %d)",
                ", ".join(f"{n!r} version(s) {', '.join(v)}" for n, v in serving.items()),
                url,
                time.perf_counter() - started,
                os.getpid(),
                extra={"url": url},
            )
            name = next(iter(serving))
            version = serving[name][-1]

        def on_listening() -> None:
            if grpc_server is not None:
                log.info("gRPC (TensorFlow Serving's PredictionService) on %s", grpc_server.address)
                if on_grpc_ready is not None:
                    on_grpc_ready(grpc_server.address)
            if on_ready is not None:
                on_ready(url, name, version)

        abandoned = run_app(
            app,
            sock,
            drain_timeout=drain_timeout,
            on_listening=on_listening,
            grpc_server=grpc_server,
        )
        stop(kill=abandoned)
        log.info("stopped%s", " (requests in flight were cancelled)" if abandoned else "")
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        sock.close()
        stop(kill=True)  # no-op after a clean stop


def _log_ready(
    pool: PredictionPool, path: str, name: str, version: str, url: str, seconds: float
) -> None:
    log.info(
        "serving %s as %r version %s on %s: %d workers ready in %.1f s (pid %d)",
        path,
        name,
        version,
        url,
        pool.workers,
        seconds,
        os.getpid(),
        extra={"model": name, "version": version, "url": url, "workers": pool.workers},
    )
    runtime = pool.runtime_info()
    if runtime["runtime"] != "tensorflow" or runtime.get("requested") != "tensorflow":
        worst = max((d["max_rel"] for d in runtime.get("differences", {}).values()), default=0.0)
        log.info(
            "runtime %s (asked: %s); largest difference to TensorFlow %.2g of the output's "
            "scale (tolerance %s)%s",
            runtime["runtime"],
            runtime.get("requested"),
            worst,
            runtime.get("tolerance", "-"),
            f"; fallback: {runtime['fallback']}" if runtime.get("fallback") else "",
            extra={"runtime": runtime["runtime"], "max_rel_difference": worst},
        )


def build_registry(
    model: str | None,
    model_name: str | None,
    config_file: str | None,
    policy: str | None,
    poll_seconds: float,
    config_poll_seconds: float,
    pool_options: dict[str, Any],
) -> Any:
    """The model registry for a base path or a config file (``None``: one SavedModel), after
    the checks that need no worker (``ValueError``): the options, the policy, the config
    file, a base path's highest version's signature (a config file's versions are checked as
    they load, and a failure there is the version's error)."""
    from .model_config import parse_policy
    from .models import registry_for, versions_on_disk

    if model is None and config_file is None:
        raise ValueError("expected MODEL or --model_config_file, got neither")
    for name, value in (
        ("file_system_poll_wait_seconds", poll_seconds),
        ("model_config_file_poll_wait_seconds", config_poll_seconds),
    ):
        if value is None or value < 0:
            raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
    registry = registry_for(
        model,
        model_name=model_name,
        config_file=config_file,
        policy=None if policy is None else parse_policy(policy),
        poll_seconds=poll_seconds,
        config_poll_seconds=config_poll_seconds,
        pool_options=pool_options,
    )
    if registry is None:
        if policy is not None:
            raise ValueError(
                f"--model-version-policy needs a base path holding numbered versions, got "
                f"{model!r} (one SavedModel)"
            )
        return None
    for spec in registry.specs():
        found = versions_on_disk(spec.base_path)
        if config_file is None and found:  # one base path: its mistakes are usage errors
            check_model(found[max(found)], registry.signature_name)
    return registry


def _grpc_server(
    app: Any,
    host: str,
    port: int,
    rest: socket.socket,
    request_timeout: float | None,
    max_body_bytes: int,
) -> GrpcServer:
    """The gRPC server for ``host:port``, its address checked now (fails fast, before any
    worker starts, like the REST port): bound once here and released for gRPC to bind when
    the loop starts (port 0: the free port found here). The same port as REST is refused."""
    if port and port == rest.getsockname()[1]:
        raise BindError(f"cannot bind gRPC on {host}:{port}: it is the REST port (--port)")
    probe = bind(host, port)
    try:
        port = probe.getsockname()[1]
    finally:
        probe.close()
    return GrpcServer(
        app.state.serving,
        app.state.serving_metrics,
        host,
        port,
        request_timeout=request_timeout,
        max_message_bytes=max_body_bytes,
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per log record: time, level, logger, message, and the structured
    fields the server attaches (``method``, ``path``, ``status``, ``seconds``, ``rows``...)."""

    FIELDS = (
        *("method", "path", "status", "seconds", "rows", "api", "model", "client"),
        *("version", "url", "workers"),
    )

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in self.FIELDS:
            if field in record.__dict__:
                out[field] = record.__dict__[field]
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)
