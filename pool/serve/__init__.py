"""``pool.serve``: a model served over HTTP with TensorFlow Serving's REST API, backed by a pool.

    python -m pool serve MODEL [--port 8501] ...        (pip install 'prediction-pool[serve]')

    client ─HTTP─▶ uvicorn ─▶ app.create_app(pool) ──pool.asubmit──▶ PredictionPool ─▶ workers
                               │ codec: TF Serving JSON <-> arrays      (dynamic batching of
                               │ v2: Open Inference Protocol             concurrent requests)
                               │ metrics: Prometheus
                   server.serve: bind, start the pool, run uvicorn, drain on SIGTERM

Modules: ``codec`` (TF Serving's REST JSON, status and metadata; NumPy only), ``v2`` (the Open
Inference Protocol), ``metrics`` (prometheus-client), ``limits`` (the parse budget: bytes of
request bodies parsed at once; the limits' defaults), ``app`` (the Starlette application, the
entry point for mounting into an existing Starlette/FastAPI app; admission, body reading,
parsing off the event loop), ``server`` (uvicorn, signals, draining, the checks made before
any worker starts), ``command`` (the ``serve`` subcommand and the pool options of a command
line). An edge of the package: the core never
imports it. Importing ``pool.serve`` imports no web framework; :func:`create_app` and
:func:`serve` import Starlette and uvicorn when first used. See docs/serving.md.
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
