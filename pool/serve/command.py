"""``python -m pool serve MODEL``: the command line of :func:`pool.serve.server.serve`.

Importing this module imports no web framework (``pool.cli`` builds its parser from here even
when the ``serve`` extra is not installed). Exit status: 0 after a SIGTERM/SIGINT drain; 1 the
model failed to load or the server failed; 2 bad arguments, a local MODEL that is not a
SavedModel or lacks ``--signature``, a port that cannot be bound, or the extra missing (all
found before any worker starts).

The :class:`pool.PredictionPool` options (threads, timeouts, batch sizes, recycling) come from
:func:`pool.argtypes.add_pool_options`, shared with ``predict``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ..argtypes import add_pool_options, non_negative_int, pool_options, positive_int, seconds
from .limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_REQUEST_TIMEOUT,
)

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_TERMINATED = 143

#: The loggers whose records the command shows on stderr.
LOGGERS = ("pool", "uvicorn")


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to ``commands`` (an ``add_subparsers()`` result)."""
    p = commands.add_parser(
        "serve",
        help="serve a model over HTTP with TensorFlow Serving's REST API",
        description=(
            "Serve MODEL over HTTP: TensorFlow Serving's REST API (/v1/models/NAME:predict), "
            "the Open Inference Protocol (/v2) and Prometheus metrics "
            "(/monitoring/prometheus/metrics), and TensorFlow Serving's gRPC API on "
            "--grpc-port (PredictionService.Predict, GetModelMetadata, "
            "ModelService.GetModelStatus). The workers load the model before the port "
            "listens; SIGTERM or Ctrl-C drains the requests in flight and stops. No "
            "authentication: keep the default 127.0.0.1 or put a proxy in front "
            "(docs/serving.md). Needs pip install 'prediction-pool[serve]'."
        ),
        epilog="Exit status: 0 stopped by a signal after draining, 1 the model or server "
        "failed, 2 bad arguments, a MODEL that is not a SavedModel or lacks --signature, or "
        "the port cannot be bound (found before any worker starts), 143 SIGTERM while the "
        "workers load.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        nargs="?",
        help="SavedModel directory, a base path holding numbered versions (TF Serving's "
        "--model_base_path: polled, hot-reloaded), or a TF Hub handle",
    )
    _add_version_options(p)
    p.add_argument("--model-name", help="name in the URLs (default: the model directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument(
        "--port", type=non_negative_int, default=8501, help="port (default: 8501; 0: any free)"
    )
    p.add_argument(
        "--grpc-port",
        type=non_negative_int,
        default=8500,
        help="port of TensorFlow Serving's gRPC API (PredictionService, ModelService) on "
        "--host (default: 8500; 0: any free)",
    )
    p.add_argument("--no-grpc", action="store_true", help="serve REST only: no gRPC port is opened")
    p.add_argument("--workers", "-w", type=positive_int, help="worker processes (default: cores)")
    p.add_argument("--signature", default="serving_default", help="signature to serve")
    p.add_argument(
        "--max-batch-rows",
        type=positive_int,
        default=256,
        help="rows per model call when concurrent requests are combined (default: 256)",
    )
    p.add_argument(
        "--batch-timeout-micros",
        type=non_negative_int,
        default=0,
        help="wait this long for more requests before a batch smaller than the maximum "
        "(default: 0, dispatch at once when a worker is free)",
    )
    p.add_argument(
        "--max-queued-requests",
        type=positive_int,
        help="requests waiting for a worker before new ones get 503 (default: unbounded)",
    )
    limits = p.add_argument_group("limits (docs/serving.md, Limits)")
    limits.add_argument(
        "--request-timeout",
        type=seconds,
        default=DEFAULT_REQUEST_TIMEOUT,
        help="seconds from a request's arrival to its answer, else 504 (default: 30)",
    )
    limits.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="larger request bodies (once decompressed) get 413 (default: 64 MiB)",
    )
    limits.add_argument(
        "--max-concurrent-requests",
        type=positive_int,
        default=DEFAULT_MAX_CONCURRENT_REQUESTS,
        help="predictions in progress at once; more get 503 at once (default: "
        f"{DEFAULT_MAX_CONCURRENT_REQUESTS})",
    )
    limits.add_argument(
        "--max-parse-bytes",
        type=positive_int,
        help="bytes of request bodies read and parsed at once, which bounds the memory "
        "parsing takes (about 4-30x this); other requests wait before being read, until "
        "their deadline, then get 503 (default: --max-body-bytes)",
    )
    limits.add_argument(
        "--body-timeout",
        type=seconds,
        default=DEFAULT_BODY_TIMEOUT,
        help="seconds to receive a request body once its reading starts, else 408 and the "
        "connection is closed (default: 30)",
    )
    p.add_argument(
        "--drain-timeout",
        type=seconds,
        default=30.0,
        help="on SIGTERM/SIGINT, seconds to finish the requests in flight (default: 30)",
    )
    p.add_argument(
        "--verbose",
        "-v",
        action="count",
        default=0,
        help="log start-up and shutdown (-v), and every request (-vv)",
    )
    p.add_argument("--log-json", action="store_true", help="write logs as one JSON object per line")
    add_pool_options(p, skip=("--max-batch-rows", "--batch-timeout-micros"))
    return p


def _add_version_options(p: argparse.ArgumentParser) -> None:
    """Versions and several models (docs/serving.md, 'Versions and several models'); TF
    Serving's own flag spellings are accepted too."""
    g = p.add_argument_group("versions and several models (docs/serving.md)")
    g.add_argument(
        "--model-config-file",
        "--model_config_file",
        dest="model_config_file",
        metavar="FILE",
        help="serve the models of TF Serving's model_config_list text file instead of MODEL",
    )
    g.add_argument(
        "--model-config-file-poll-wait-seconds",
        "--model_config_file_poll_wait_seconds",
        dest="model_config_file_poll_wait_seconds",
        type=seconds_or_zero,
        default=0.0,
        metavar="S",
        help="re-read the model config file every S seconds (default: 0, read once)",
    )
    g.add_argument(
        "--file-system-poll-wait-seconds",
        "--file_system_poll_wait_seconds",
        dest="file_system_poll_wait_seconds",
        type=seconds_or_zero,
        default=1.0,
        metavar="S",
        help="look for new and removed versions under each base path every S seconds "
        "(default: 1; 0: once, at start)",
    )
    g.add_argument(
        "--model-version-policy",
        dest="model_version_policy",
        metavar="POLICY",
        help="versions of a base path to serve: latest (default), latest:N, all, specific:1,2 "
        "(TF Serving's model_version_policy; in a config file, its own field)",
    )


def seconds_or_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    """Run ``serve`` from parsed arguments; return the exit status."""
    try:
        from . import server
    except ImportError as exc:
        sys.stderr.write(
            f"error: serving needs the 'serve' extra ({exc.name or exc} is missing): "
            "pip install 'prediction-pool[serve]'\n"
        )
        return EXIT_USAGE
    handler = logging.StreamHandler(sys.stderr)
    if args.log_json:
        handler.setFormatter(server.JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = logging.WARNING if args.verbose == 0 else logging.INFO
    access = logging.INFO if args.verbose >= 2 else logging.WARNING
    loggers = [logging.getLogger(name) for name in LOGGERS]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(level)
    access_logger = logging.getLogger("pool.serve.access")
    saved.append((access_logger, access_logger.level))
    access_logger.setLevel(access)

    def ready(url: str, name: str, version: str) -> None:
        # The one line a script waits for (always shown, whatever the log level).
        sys.stderr.write(f"serving {name!r} version {version} on {url}\n")
        sys.stderr.flush()

    def grpc_ready(address: str) -> None:
        # printed before the ready line, so a script that waits for that line has both
        sys.stderr.write(f"gRPC on {address}\n")
        sys.stderr.flush()

    try:
        return server.serve(
            args.model,
            model_name=args.model_name,
            host=args.host,
            port=args.port,
            grpc_port=None if args.no_grpc else args.grpc_port,
            on_grpc_ready=grpc_ready,
            request_timeout=args.request_timeout,
            max_body_bytes=args.max_body_bytes,
            max_concurrent_requests=args.max_concurrent_requests,
            max_parse_bytes=args.max_parse_bytes,
            body_timeout=args.body_timeout,
            drain_timeout=args.drain_timeout,
            on_ready=ready,
            workers=args.workers,
            signature=args.signature,
            max_batch_rows=args.max_batch_rows,
            batch_timeout_micros=args.batch_timeout_micros,
            max_queued_requests=args.max_queued_requests,
            model_config_file=args.model_config_file,
            file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
            model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
            model_version_policy=args.model_version_policy,
            **pool_options(args),
        )
    except server.BindError as exc:
        return _fail(EXIT_USAGE, str(exc))
    except ValueError as exc:
        return _fail(EXIT_USAGE, str(exc))
    except server.Terminated:
        return _fail(EXIT_TERMINATED, "terminated while the workers were loading the model")
    except KeyboardInterrupt:
        return _fail(130, "interrupted while the workers were loading the model")
    except Exception as exc:  # ModelLoadError, a failed server
        logging.getLogger("pool").debug("serve failed", exc_info=True)
        return _fail(EXIT_RUNTIME, f"{type(exc).__name__}: {exc}")
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        for lg, lvl in saved:
            lg.setLevel(lvl)


def _fail(code: int, message: str) -> int:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    sys.stderr.write(f"error: {first}\n")
    return code
