"""The baseline server of ``serving.py``: the model loaded once into a global of the server
process and called from a thread pool, behind the *same* HTTP stack as ``python -m pool serve``
(``pool.serve.create_app`` on uvicorn, the same JSON codec, the same routes): the seed's answer
(a web handler calling a global model) with nothing else changed.

    python benchmarks/serving_baseline.py MODEL [--model-name NAME] [--port 0] [--threads 40]

Prints ``serving 'NAME' version 1 on URL`` to stderr once it listens, like the real command;
stops on SIGTERM/SIGINT after draining. ``--threads`` defaults to 40, the thread pool a
synchronous Starlette/FastAPI endpoint gets (anyio's default); TensorFlow keeps its default
thread pools (every core), as a global model in a web server does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

from pool import sharding  # noqa: E402
from pool.messages import WorkerStats  # noqa: E402
from pool.serve import create_app  # noqa: E402
from pool.serve.server import bind, model_identity, run_app, url_of  # noqa: E402


class GlobalModel:
    """What ``create_app`` needs of a pool, answered by one in-process model from threads."""

    def __init__(self, path: str, signature: str, threads: int) -> None:
        from pool import model as model_module  # TensorFlow, in this process

        started = time.perf_counter()
        self._model = model_module.load(path, signature, None)
        self.load_seconds = time.perf_counter() - started
        self.signature = self._model.signature
        self.signature_name = signature
        self.startup_seconds = self.load_seconds
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="model")
        self._lock = threading.Lock()
        self._calls = self._rows = self._queued = 0
        self._busy = 0.0

    def submit(self, inputs: Any) -> Future:
        arrays, rows = sharding.prepare(inputs, self.signature)
        with self._lock:
            self._queued += 1
        return self._executor.submit(self._call, arrays, rows)

    def asubmit(self, inputs: Any) -> asyncio.Future:
        """What the app awaits (``PredictionPool.asubmit``'s contract)."""
        return asyncio.wrap_future(self.submit(inputs))

    def _call(self, arrays: dict, rows: int) -> Any:
        with self._lock:
            self._queued -= 1
        started = time.perf_counter()
        outputs = self._model(arrays)
        busy = time.perf_counter() - started
        with self._lock:
            self._calls += 1
            self._rows += rows
            self._busy += busy
        return sharding.unwrap(outputs, self.signature)

    def stats(self) -> list[WorkerStats]:
        with self._lock:
            return [
                WorkerStats(
                    worker=0,
                    pid=os.getpid(),
                    load_seconds=self.load_seconds,
                    loads=1,
                    shards=self._calls,
                    batches=self._calls,
                    rows=self._rows,
                    busy_seconds=self._busy,
                )
            ]

    def queued_requests(self) -> int:
        with self._lock:
            return self._queued

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--model-name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--signature", default="serving_default")
    p.add_argument("--threads", type=int, default=40)
    p.add_argument("--drain-timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    path, name, version = model_identity(args.model)
    sock = bind(args.host, args.port)
    model = GlobalModel(path, args.signature, args.threads)
    app = create_app(model, args.model_name or name, model_version=version)
    url = url_of(sock)

    def ready() -> None:
        sys.stderr.write(f"serving {args.model_name or name!r} version {version} on {url}\n")
        sys.stderr.flush()

    try:
        run_app(app, sock, drain_timeout=args.drain_timeout, on_listening=ready)
    finally:
        sock.close()
        model.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
