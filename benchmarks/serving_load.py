"""Load generator for ``serving.py``: one process, threads, keep-alive HTTP/1.1 connections.

    python benchmarks/serving_load.py --url URL --bodies FILE --seconds 10 closed --clients 16
    python benchmarks/serving_load.py --url URL --bodies FILE --seconds 10 open --rate 200

``FILE``: one request body per line, sent round robin (client *i* starts at body *i*).
Closed loop: each client sends its next request as soon as the previous one is answered.
Open loop: requests are due at a fixed rate whatever the server does; latency is measured from
the moment a request was *due*, not sent, so a server that falls behind is charged for the
queue it causes (coordinated omission corrected, as wrk2 does). Both are bounded in time
(``--seconds``, then at most ``--grace`` seconds for answers in flight) and in count
(``--max-requests``). Loopback only: the URL must name 127.0.0.1, ::1 or localhost.

Prints one JSON object to stdout: requests, errors (non-200 answers, failures, unanswered),
status counts, requests/s and latency percentiles in milliseconds. No third-party imports:
``http.client`` costs the client less CPU per request than ``requests``, which matters when the
client shares the machine with the server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import queue
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class Client:
    """One keep-alive connection; reconnects after a failure."""

    def __init__(self, host: str, port: int, path: str, timeout: float) -> None:
        self.host, self.port, self.path, self.timeout = host, port, path, timeout
        self.connection: http.client.HTTPConnection | None = None

    def post(self, body: bytes) -> int:
        if self.connection is None:
            self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self.connection.request("POST", self.path, body, {"Content-Type": "application/json"})
            response = self.connection.getresponse()
            response.read()
            if response.getheader("connection", "").lower() == "close":
                self.close()
            return response.status
        except (OSError, http.client.HTTPException):
            self.close()
            raise

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def closed_loop(args: argparse.Namespace, bodies: list[bytes]) -> tuple[list, Counter, float]:
    latencies: list[float] = []
    statuses: Counter = Counter()
    lock = threading.Lock()
    start = threading.Barrier(args.clients + 1)
    stop_at = [0.0]
    sent = [0]

    def run(index: int) -> None:
        client = Client(args.host, args.port, args.path, args.timeout)
        mine: list[float] = []
        counts: Counter = Counter()
        n = index
        start.wait()
        while time.perf_counter() < stop_at[0]:
            with lock:
                if sent[0] >= args.max_requests:
                    break
                sent[0] += 1
            began = time.perf_counter()
            try:
                status = client.post(bodies[n % len(bodies)])
            except (OSError, http.client.HTTPException) as exc:
                status = type(exc).__name__
            mine.append(time.perf_counter() - began)
            counts[str(status)] += 1
            n += args.clients
        client.close()
        with lock:
            latencies.extend(mine)
            statuses.update(counts)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    began = time.perf_counter()
    stop_at[0] = began + args.seconds
    start.wait()
    for t in threads:
        t.join(args.seconds + args.grace)
    elapsed = time.perf_counter() - began
    unanswered = sum(t.is_alive() for t in threads)
    if unanswered:
        statuses["unanswered"] += unanswered
    return latencies, statuses, elapsed


def open_loop(args: argparse.Namespace, bodies: list[bytes]) -> tuple[list, Counter, float]:
    latencies: list[float] = []
    statuses: Counter = Counter()
    lock = threading.Lock()
    due: queue.SimpleQueue = queue.SimpleQueue()
    total = min(args.max_requests, int(args.rate * args.seconds))

    def run() -> None:
        client = Client(args.host, args.port, args.path, args.timeout)
        while True:
            item = due.get()
            if item is None:
                break
            n, due_at = item
            try:
                status = client.post(bodies[n % len(bodies)])
            except (OSError, http.client.HTTPException) as exc:
                status = type(exc).__name__
            finished = time.perf_counter()
            with lock:
                latencies.append(finished - due_at)
                statuses[str(status)] += 1
        client.close()

    threads = [threading.Thread(target=run, daemon=True) for _ in range(args.connections)]
    for t in threads:
        t.start()
    began = time.perf_counter()
    for n in range(total):
        due_at = began + n / args.rate
        delay = due_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        due.put((n, due_at))
    for _ in threads:
        due.put(None)
    deadline = began + args.seconds + args.grace
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()))
    elapsed = time.perf_counter() - began
    with lock:
        answered = sum(statuses.values())
    if answered < total:
        statuses["unanswered"] += total - answered
    return latencies, statuses, elapsed


def summary(latencies: list[float], statuses: Counter, elapsed: float) -> dict:
    ok = statuses.get("200", 0)
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

    return {
        "requests": sum(statuses.values()),
        "ok": ok,
        "errors": sum(statuses.values()) - ok,
        "statuses": dict(statuses),
        "seconds": elapsed,
        "requests_per_second": ok / elapsed if elapsed > 0 else 0.0,
        "latency_ms": {
            "p50": pct(0.50),
            "p90": pct(0.90),
            "p99": pct(0.99),
            "mean": sum(ordered) / len(ordered) * 1e3 if ordered else 0.0,
            "max": ordered[-1] * 1e3 if ordered else 0.0,
        },
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="http://127.0.0.1:PORT/v1/models/NAME:predict")
    p.add_argument("--bodies", required=True, help="request bodies, one JSON per line")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to send")
    p.add_argument("--grace", type=float, default=30.0, help="then wait this long for answers")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request socket timeout")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="send at most this many")
    modes = p.add_subparsers(dest="mode", required=True)
    closed = modes.add_parser("closed")
    closed.add_argument("--clients", type=int, required=True)
    opened = modes.add_parser("open")
    opened.add_argument("--rate", type=float, required=True, help="requests per second")
    opened.add_argument("--connections", type=int, default=128, help="client threads")
    args = p.parse_args(argv)
    parts = urlsplit(args.url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK:
        p.error(f"expected an http:// URL on the loopback interface, got {args.url!r}")
    args.host, args.port = parts.hostname, parts.port or 80
    args.path = parts.path + (f"?{parts.query}" if parts.query else "")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with open(args.bodies, "rb") as f:
        bodies = [line.rstrip(b"\n") for line in f if line.strip()]
    run = closed_loop if args.mode == "closed" else open_loop
    result = summary(*run(args, bodies))
    result["mode"] = args.mode
    if args.mode == "closed":
        result["clients"] = args.clients
    else:
        result["rate"] = args.rate
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
