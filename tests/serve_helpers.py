"""A real ``python -m pool serve`` in a subprocess, for the server tests and the benchmark smoke
test: started on free loopback ports (``--port 0 --grpc-port 0``; the REST port is read from
the line the command prints once the workers are ready, the gRPC port from the line before
it), its stderr kept, its workers found with psutil."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
READY = re.compile(r"^serving '(?P<name>[^']+)' version (?P<version>\d+) on (?P<url>http://\S+)$")


class Server:
    """``python -m pool serve MODEL --port 0 ARGS...``; :meth:`stop` sends a signal and waits."""

    def __init__(self, model: str, *args: str, start_timeout: float = 300.0) -> None:
        self.command = [
            *(sys.executable, "-m", "pool", "serve", model, "--port", "0", "--grpc-port", "0"),
            *args,
        ]
        self.process = subprocess.Popen(
            self.command,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.url = self.name = self.version = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + start_timeout
        while not self._ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise RuntimeError(
                    f"server did not start ({self.process.returncode}): {self.command}\n"
                    + self.stderr[-4000:]
                )

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            line = line.rstrip("\n")
            self.lines.append(line)
            match = READY.match(line)
            if match and not self._ready.is_set():
                self.url, self.name, self.version = match["url"], match["name"], match["version"]
                self._ready.set()

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    @property
    def grpc_address(self) -> str:
        """``HOST:PORT`` from the line ``gRPC on HOST:PORT`` printed before the ready line."""
        for line in self.lines:
            if line.startswith("gRPC on "):
                return line.split(" on ", 1)[1]
        raise AssertionError(f"no gRPC line in {self.stderr[-2000:]}")

    def model_url(self, suffix: str = "") -> str:
        return f"{self.url}/v1/models/{self.name}{suffix}"

    def predict(self, body: dict, timeout: float = 120) -> requests.Response:
        return requests.post(self.model_url(":predict"), json=body, timeout=timeout)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def worker_pids(self) -> list[int]:
        """The model's worker processes: every descendant except multiprocessing's fork server
        and resource tracker, the server's helper children (workers are the fork server's
        children, and carry its command line)."""
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return []
        helpers = set()
        for child in children:
            try:
                cmd = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if "forkserver" in cmd or "resource_tracker" in cmd:
                helpers.add(child.pid)
        return [p.pid for p in self.descendants() if p.pid not in helpers]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of the Prometheus endpoint: ``{(name, sorted labels): value}``."""
        text = requests.get(f"{self.url}/monitoring/prometheus/metrics", timeout=60).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
        """Send ``sig``; return the exit status. Every descendant must be gone afterwards."""
        family = self.descendants()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            for p in [*family, self.process]:
                try:
                    p.kill()
                except (psutil.Error, ProcessLookupError):
                    pass
            self.process.wait(30)
            raise
        finally:
            self._reader.join(10)
        _, alive = psutil.wait_procs(family, timeout=15)
        assert not alive, f"processes outlived the server: {[p.pid for p in alive]}"
        return code


def metric(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels`` (0 if none)."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


def sigkill_a_worker_under_load(
    server: Server, make_client: Callable[[int], Callable[[int], Any]], clients: int = 8
) -> list[Any]:
    """``clients`` threads send requests in a loop (``make_client(seed)`` returns ``send(n)``,
    which returns an answer record or raises ``AssertionError`` naming the failure); one of the
    server's two workers is SIGKILLed after 20 answers, and the load goes on until the
    replacement is counted and 40 more answers came. Asserts that no request failed, the restart
    was counted and the victim is gone; returns the answer records."""
    before = metric(server.metrics(), "pool_worker_restarts_total")
    victims = server.worker_pids()
    assert len(victims) == 2, victims
    stop = threading.Event()
    failures: list[str] = []
    answered: list[Any] = []

    def client(seed: int) -> None:
        send = make_client(seed)
        n = 0
        while not stop.is_set():
            try:
                answered.append(send(n))
            except AssertionError as exc:
                failures.append(str(exc))
            n += 1

    threads = [threading.Thread(target=client, args=(s,)) for s in range(clients)]
    for t in threads:
        t.start()
    try:
        while len(answered) < 20 and not failures:
            time.sleep(0.05)
        os.kill(victims[0], signal.SIGKILL)
        killed_at = len(answered)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not failures:  # until the replacement answers
            if metric(server.metrics(), "pool_worker_restarts_total") > before and (
                len(answered) > killed_at + 40
            ):
                break
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not failures, failures[:3]
    assert metric(server.metrics(), "pool_worker_restarts_total") >= before + 1
    assert victims[0] not in server.worker_pids() and len(server.worker_pids()) == 2
    return answered


def wait_idle(server: Server, seconds: float = 10.0) -> dict:
    """The server's metrics once nothing is queued or in flight (fail after ``seconds``)."""
    deadline = time.monotonic() + seconds
    while True:
        samples = server.metrics()
        idle = metric(samples, "pool_queued_requests") == 0
        if idle and metric(samples, "pool_serve_requests_in_flight") == 0:
            return samples
        assert time.monotonic() < deadline, "the server did not become idle"
        time.sleep(0.1)
