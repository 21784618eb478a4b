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

Without wrk, :func:`rest_load_generator` falls back to ``serving_load.py`` (Python threads),
with the same keys and a warning. Any load generator with :func:`run_wrk`'s arguments and keys
plugs into ``serving.py``'s ``measure_protocol`` (the gRPC one of ``grpc_load.py``, say).
"""

from __future__ import annotations

import json
import os
import re
import resource
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


def run_python_load(
    url: str,
    bodies: Sequence[bytes],
    *,
    connections: int,
    seconds: float,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """The fallback when wrk is absent: ``serving_load.py`` (Python threads, ``http.client``),
    the same keys. It costs far more CPU per request than wrk, on the cores the server needs:
    its figures understate what the server can do (its CPU is reported to show by how much)."""
    import sys

    with tempfile.TemporaryDirectory(prefix="pyload-") as tmp:
        data = Path(tmp) / "bodies.jsonl"
        data.write_bytes(b"\n".join(bodies) + b"\n")
        command = [
            sys.executable,
            str(Path(__file__).with_name("serving_load.py")),
            *("--url", url, "--bodies", str(data), "--seconds", str(seconds)),
            *("closed", "--clients", str(connections)),
        ]
        cpu_before = process_cpu_seconds(server_pid) if server_pid else None
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = process.communicate(timeout=seconds + 180)
        wall = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_after = process_cpu_seconds(server_pid) if server_pid else None
    if process.returncode != 0:
        raise RuntimeError(f"load generator failed: {' '.join(command)}\n{err.decode()[-3000:]}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    requests = max(1, result["requests"])
    result.update(connections=connections, load_generator="python (serving_load.py)")
    own = usage.ru_utime + usage.ru_stime - children.ru_utime - children.ru_stime
    result["load_generator_cpu_us_per_request"] = own / requests * 1e6
    result["load_generator_cpu_cores"] = own / wall
    if cpu_before is not None and cpu_after is not None:
        result["server_cpu_us_per_request"] = (cpu_after - cpu_before) / requests * 1e6
        result["server_cpu_cores"] = (cpu_after - cpu_before) / wall
    return result


#: A load generator: (url, bodies, connections=, seconds=, server_pid=) -> the keys above.
LoadGenerator = Callable[..., dict[str, Any]]


def rest_load_generator() -> tuple[str, LoadGenerator]:
    """wrk when installed, else the Python fallback (with a warning saying what it costs)."""
    if wrk_path() is not None:
        return "wrk", run_wrk
    return "python", run_python_load
