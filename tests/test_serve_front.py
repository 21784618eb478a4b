"""The REST front end on both HTTP stacks uvicorn may run (issue 15): uvloop + httptools (the
serve extra) and the stock asyncio loop + h11 (the fallback when they are absent). Each serves
``create_app`` around one shared pool (a cheap factory, real worker process) from a thread of
this process: the same answers, a body that trickles in is cut off with 408, a client that
goes away is dropped from the pool's queue; and a plain Starlette handler awaiting
``pool.apredict`` (docs/serving.md, "Mounting").

The pool waits up to 3 s for 64 rows before a model call, so that a one-row request stays
queued long enough to be abandoned; a 64-row request is answered at once.
"""

from __future__ import annotations

import http.client
import socket
import sys
import threading
import time

import factories
import numpy as np
import pytest
import requests
from conftest import assert_rows_equal

from pool import PredictionPool

pytestmark = pytest.mark.timeout(120)

FULL = 64


@pytest.fixture(scope="module")
def pool():
    with PredictionPool(
        factories.plain_double,
        workers=1,
        max_batch_rows=FULL,
        batch_timeout_micros=3_000_000,
    ) as started:
        yield started


class Served:
    """``app`` served by uvicorn in a thread on a free loopback port."""

    def __init__(self, app, **config) -> None:
        import uvicorn

        from pool.serve.server import bind, url_of

        self.sock = bind("127.0.0.1", 0)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(
            uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, **config)
        )
        self.sock.listen()
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


STACKS = {"uvloop+httptools": ("uvloop", "httptools"), "asyncio+h11": ("asyncio", "h11")}


@pytest.fixture(scope="module", params=list(STACKS))
def served(request, pool):
    from pool.serve import create_app

    loop, http_parser = STACKS[request.param]
    app = create_app(pool, "double", request_timeout=30, body_timeout=0.5)
    server = Served(app, loop=loop, http=http_parser)
    server.app = app
    yield server
    server.stop()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_both_stacks_answer_as_the_model_in_process(served):
    x = np.random.default_rng(1).random((FULL, 3)).astype(np.float32)
    want = factories.plain_double()(x)
    response = requests.post(
        f"{served.url}/v1/models/double:predict", json={"instances": x.tolist()}, timeout=60
    )
    assert response.status_code == 200, response.text
    assert_rows_equal(np.asarray(response.json()["predictions"], np.float32), want)
    columnar = requests.post(
        f"{served.url}/v1/models/double:predict", json={"inputs": x.tolist()}, timeout=60
    )
    assert_rows_equal(np.asarray(columnar.json()["outputs"], np.float32), want)


def test_a_trickling_body_gets_408_and_the_connection_closed(served):
    host, port = served.sock.getsockname()[:2]
    with socket.create_connection((host, port), timeout=30) as conn:
        conn.sendall(
            b"POST /v1/models/double:predict HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            b'{"instances": '
        )
        started = time.monotonic()
        answer = b""
        while chunk := conn.recv(65536):  # the server closes the connection after its 408
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body_timeout" in answer
    assert time.monotonic() - started < 10


def test_a_client_that_goes_away_is_dropped_from_the_queue(served, pool):
    before = requests.get(f"{served.url}/monitoring/prometheus/metrics", timeout=30).text
    rows_before = sum(s.rows for s in pool.stats())
    host, port = served.sock.getsockname()[:2]
    connection = http.client.HTTPConnection(host, port, timeout=0.3)
    with pytest.raises(TimeoutError):  # queued for a batch that never fills: the client leaves
        connection.request(
            "POST",
            "/v1/models/double:predict",
            body=b'{"instances": [[1.0, 2.0, 3.0]]}',
            headers={"Content-Type": "application/json"},
        )
        connection.getresponse()
    connection.close()
    deadline = time.monotonic() + 2.5  # before the 3 s batch timeout would have run it
    while pool.queued_requests() != 0:
        assert time.monotonic() < deadline, "the abandoned request stayed queued"
        time.sleep(0.02)
    time.sleep(3.5)  # past the batch timeout: had it stayed queued, it would have run
    assert sum(s.rows for s in pool.stats()) == rows_before
    after = requests.get(f"{served.url}/monitoring/prometheus/metrics", timeout=30).text
    gone = metric(after, "pool_serve_requests_total", code="499")
    assert gone - metric(before, "pool_serve_requests_total", code="499") == 1


def test_http_stack_names_what_uvicorn_picks(monkeypatch):
    from pool.serve.server import http_stack

    assert http_stack() == ("uvloop", "httptools")  # the serve extra installs both
    for name in ("uvloop", "httptools"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it raises ImportError
    assert http_stack() == ("asyncio", "h11")


def test_a_starlette_handler_awaits_apredict(pool):
    """The docs' example: a Starlette (or FastAPI) handler with ``await pool.apredict``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def double(request: Request) -> JSONResponse:
        rows = np.asarray((await request.json())["rows"], np.float32)
        return JSONResponse({"doubled": (await pool.apredict(rows)).tolist()})

    server = Served(Starlette(routes=[Route("/double", double, methods=["POST"])]))
    try:
        x = np.random.default_rng(2).random((FULL, 2)).astype(np.float32)
        response = requests.post(f"{server.url}/double", json={"rows": x.tolist()}, timeout=60)
        assert response.status_code == 200, response.text
        assert_rows_equal(np.asarray(response.json()["doubled"], np.float32), x * 2)
    finally:
        server.stop()
