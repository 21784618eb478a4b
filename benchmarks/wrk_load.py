"""One closed-loop HTTP load with ``wrk``, and the CPU the server process spent answering it.

    from wrk_load import run_wrk, process_cpu_seconds
    result = run_wrk(url, bodies, connections=16, seconds=10, server_pid=pid)

``wrk`` (a C load generator, ``apt-get install wrk`` on Debian/Ubuntu) keeps ``connections``
keep-alive connections busy from ``threads`` threads and sends the given request bodies round
robin (pre-formatted once in its Lua ``init``, so its per-request cost is small). Reported:
requests/s, p50/p90/p99 latency (wrk's ``--latency`` percentiles), non-2xx answers and socket
errors, wrk's own CPU seconds per request (so that a reader can see it is not the bottleneck),
and, when ``server_pid`` is given, the server process's CPU seconds per request: its user +
system time over the run, divided by the requests answered. Only that process is counted:
its threads (event loop, the pool's dispatcher) but not its child processes (the workers),
whose time the kernel keeps apart until they exit.

:func:`load_generators` is where other load generators plug in (the gRPC one of
``grpc_load.py`` for example): each is a function taking the same arguments and returning the
same keys.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

#: wrk's threads: 2 is enough for 64 connections on loopback and leaves the cores to the server.
WRK_THREADS = 2
INSTALL_HINT = "wrk is not installed: apt-get install wrk (Debian/Ubuntu) or brew install wrk"

_LUA = r"""
local bodies = {}
local requests = {}
local index = 0
init = function(args)
  local f = assert(io.open(args[1], "rb"))
  for line in f:lines() do
    if #line > 0 then
      requests[#requests + 1] = wrk.format("POST", args[2],
        {["Content-Type"] = "application/json"}, line)
    end
  end
  f:close()
  index = math.random(#requests) - 1
end
request = function()
  index = index % #requests + 1
  return requests[index]
end
done = function(summary, latency, requests_)
  io.write(string.format(
    "WRK_JSON {\"requests\":%d,\"seconds\":%f,\"non2xx\":%d,\"socket_errors\":%d," ..
    "\"p50\":%f,\"p90\":%f,\"p99\":%f,\"mean\":%f,\"max\":%f}\n",
    summary.requests, summary.duration / 1e6, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3,
    latency.mean / 1e3, latency.max / 1e3))
end
"""


def wrk_path() -> str | None:
    return shutil.which("wrk")


def require_wrk() -> str:
    path = wrk_path()
    if path is None:
        raise SystemExit(INSTALL_HINT)
    return path


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads, none of its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)


def run_wrk(
    url: str,
    bodies: Sequence[bytes],
    *,
    connections: int,
    seconds: float,
    server_pid: int | None = None,
    timeout_seconds: float = 30.0,
) -> dict[str, Any]:
    """``connections`` closed-loop clients POSTing ``bodies`` (one-line JSON) to ``url``."""
    wrk = require_wrk()
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    base = f"{parts.scheme}://{parts.netloc}"
    threads = max(1, min(WRK_THREADS, connections))
    with tempfile.TemporaryDirectory(prefix="wrk-") as tmp:
        script, data = Path(tmp) / "post.lua", Path(tmp) / "bodies.jsonl"
        script.write_text(_LUA)
        for body in bodies:
            if b"\n" in body:
                raise ValueError("request bodies must be one line of JSON each")
        data.write_bytes(b"\n".join(bodies) + b"\n")
        command = [
            wrk,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            f"--timeout={timeout_seconds:g}s",
            "--latency",
            "-s",
            str(script),
            base,
            "--",
            str(data),
            path,
        ]
        cpu_before = process_cpu_seconds(server_pid) if server_pid else None
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out = process.stdout.read() if process.stdout else ""
        err = process.stderr.read() if process.stderr else ""
        cpu_after = process_cpu_seconds(server_pid) if server_pid else None
    match = re.search(r"^WRK_JSON (\{.*\})$", out, re.M)
    if process.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({process.returncode}): {' '.join(command)}\n{out}{err}")
    figures = json.loads(match[1])
    requests = max(1, figures["requests"])
    result: dict[str, Any] = {
        "connections": connections,
        "requests": figures["requests"],
        "requests_per_second": figures["requests"] / figures["seconds"],
        "latency_ms": {q: figures[q] for q in ("p50", "p90", "p99", "mean", "max")},
        "non_2xx": figures["non2xx"],
        "socket_errors": figures["socket_errors"],
        "errors": figures["non2xx"] + figures["socket_errors"],
        "load_generator": "wrk",
        "load_generator_cpu_us_per_request": (usage.ru_utime + usage.ru_stime) / requests * 1e6,
        "load_generator_cpu_cores": (usage.ru_utime + usage.ru_stime) / wall,
    }
    if cpu_before is not None and cpu_after is not None:
        result["server_cpu_us_per_request"] = (cpu_after - cpu_before) / requests * 1e6
        result["server_cpu_cores"] = (cpu_after - cpu_before) / wall
    return result


#: A load generator: (url, bodies, connections=, seconds=, server_pid=) -> the keys above.
LoadGenerator = Callable[..., dict[str, Any]]


def load_generators() -> dict[str, LoadGenerator]:
    """The load generators ``serving.py`` runs, by protocol. The lead adds ``"grpc"`` here
    (``grpc_load.py``) once merged: a function with :func:`run_wrk`'s signature and keys."""
    return {"rest": run_wrk}
