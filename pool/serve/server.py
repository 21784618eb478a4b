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
"""

from __future__ import annotations

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
    not re-raised afterwards, so the process can stop its workers and exit 0."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[int], None]) -> None:
        super().__init__(config)
        self._on_signal = on_signal

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
) -> bool:
    """Serve ``app`` (from :func:`pool.serve.create_app`) with uvicorn on the bound ``sock``
    until SIGTERM or SIGINT, then drain: stop accepting, let the requests in flight finish for
    at most ``drain_timeout`` seconds, cancel the rest. ``on_listening()`` runs once the socket
    listens. Returns whether requests in flight were abandoned (the pool's owner should then
    stop it with ``kill=True``). Run it in the main thread (signals are only seen there)."""
    state = app.state.serving

    def on_signal(signum: int) -> None:
        state.draining = True
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
    server = _Server(config, on_signal)
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
    if on_listening is not None:
        on_listening()
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
    model: str,
    *,
    model_name: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
    max_parse_bytes: int | None = None,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    on_ready: Callable[[str, str, str], None] | None = None,
    **pool_options: Any,
) -> int:
    """Serve ``model`` until SIGTERM or SIGINT; return 0 once drained and stopped.

    ``request_timeout``, ``max_body_bytes``, ``max_concurrent_requests``, ``max_parse_bytes``
    and ``body_timeout`` go to :func:`pool.serve.create_app`; ``pool_options`` to
    :class:`pool.PredictionPool` (``workers``, ``signature``, ``threads_per_worker``,
    ``timeout``, ``max_batch_rows``, ``max_batch_bytes``, ``batch_timeout_micros``,
    ``max_queued_requests``...). ``on_ready(url, name, version)`` is called once the workers
    are ready and the port listens. Raises ``ValueError`` for a bad option, a local ``model``
    that is not a SavedModel or lacks the signature (before any worker starts), ``OSError``
    (:class:`BindError`) if the address cannot be bound, :class:`pool.ModelLoadError` if the
    model does not load."""
    if drain_timeout is None or not drain_timeout > 0:
        raise ValueError(f"drain_timeout must be > 0 seconds, got {drain_timeout!r}")
    path, default_name, version = model_identity(model)
    name = model_name or default_name
    # Every check that needs no worker, cheapest first: the options (the pool and the app
    # validate theirs when built; neither starts anything), the model, the address.
    pool = PredictionPool(path, **pool_options)
    app = create_app(
        pool,
        name,
        model_version=version,
        request_timeout=request_timeout,
        max_body_bytes=max_body_bytes,
        max_concurrent_requests=max_concurrent_requests,
        max_parse_bytes=max_parse_bytes,
        body_timeout=body_timeout,
    )
    check_model(path, pool.signature_name)
    sock = bind(host, port)
    in_main = threading.current_thread() is threading.main_thread()

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate) if in_main else None
    try:
        started = time.perf_counter()
        pool.start()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
            previous = None
        url = url_of(sock)
        log.info(
            "serving %s as %r version %s on %s: %d workers ready in %.1f s (pid %d)",
            path,
            name,
            version,
            url,
            pool.workers,
            time.perf_counter() - started,
            os.getpid(),
            extra={"model": name, "version": version, "url": url, "workers": pool.workers},
        )
        runtime = pool.runtime_info()
        if runtime["runtime"] != "tensorflow" or runtime.get("requested") != "tensorflow":
            worst = max(
                (d["max_rel"] for d in runtime.get("differences", {}).values()), default=0.0
            )
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
        abandoned = run_app(
            app,
            sock,
            drain_timeout=drain_timeout,
            on_listening=None if on_ready is None else lambda: on_ready(url, name, version),
        )
        pool.shutdown(kill=abandoned)
        log.info("stopped%s", " (requests in flight were cancelled)" if abandoned else "")
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        sock.close()
        pool.shutdown(kill=True)  # no-op after a clean stop


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
