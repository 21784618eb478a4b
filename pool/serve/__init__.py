"""``pool.serve``: a model served with TensorFlow Serving's REST and gRPC APIs, backed by a pool.

    python -m pool serve MODEL [--port 8501] [--grpc-port 8500 | --no-grpc] ...
                                                        (pip install 'prediction-pool[serve]')

    client ─HTTP─▶ uvicorn ─▶ app.create_app ─┐                (dynamic batching of
                               │ codec: TF Serving JSON <-> arrays  concurrent requests
                               │ v2: Open Inference Protocol        of both protocols)
                               │ metrics: Prometheus                          │
    client ─gRPC─▶ grpc.aio ─▶ grpc_service (same loop, state, metrics)       │
                               │ grpc_codec: TensorProto <-> arrays            │
                               │ grpc_protos: TF Serving's messages, no TF     │
                               ▼                                               ▼
                models.ModelRegistry.acquire(name, version | label) ─▶ that version's
                   (one pool per served version; base paths polled)    PredictionPool.asubmit
                                                                         ─▶ its workers
                   server.serve: bind, start the pools, run uvicorn and gRPC, drain on SIGTERM

Modules: ``codec`` (TF Serving's REST JSON, status and metadata; NumPy only), ``v2`` (the Open
Inference Protocol), ``metrics`` (prometheus-client), ``limits`` (the parse budget: bytes of
request bodies parsed at once; the limits' defaults), ``app`` (the Starlette application, the
entry point for mounting into an existing Starlette/FastAPI app; admission, body reading,
parsing off the event loop), ``server`` (uvicorn, signals, draining, the checks made before
any worker starts), ``command`` (the ``serve`` subcommand and the pool options of a command
line), ``models`` (the served models and versions: one pool per version, base-path polling
under a version policy, hot reload, the lookup by name, version and label that both protocols
use), ``model_config`` (TF Serving's model config file, parsed without TensorFlow),
``grpc_service`` (TF Serving's ``PredictionService`` and ``ModelService`` on ``grpc.aio``),
``grpc_codec`` (``TensorProto`` <-> arrays), ``grpc_protos`` (TF Serving's messages built from
descriptors in a private pool: the server never imports TensorFlow). An edge of the package:
the core never imports it. Importing ``pool.serve`` imports no web framework;
:func:`create_app` and :func:`serve` import Starlette and uvicorn (and grpcio) when first
used. See docs/serving.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import ServingState, create_app
    from .server import serve

__all__ = ["ServingState", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "ServingState"):
        from . import app

        return getattr(app, name)
    if name == "serve":
        from .server import serve

        return serve
    raise AttributeError(f"module 'pool.serve' has no attribute {name!r}")
