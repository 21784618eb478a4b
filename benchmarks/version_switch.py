"""A version switch under steady load, and how two models share the cores (docs/serving.md).

    python benchmarks/version_switch.py switch [--clients 16] [--before 5] [--after 5]
                                              [--workers 1] [--model affine|small_cnn]
    python benchmarks/version_switch.py cores  [--clients 8] [--seconds 8] [--workers-list 1,2]

``switch``: ``python -m pool serve BASE --file-system-poll-wait-seconds 1`` serves version 1 of
a model; ``--clients`` closed-loop clients (threads of this process, keep-alive
``http.client`` connections, one ``:predict`` of 4 rows each time) load it; after ``--before``
seconds version 2 appears under the base path (staged next to it, then renamed in, the way to
publish a version), and the load goes on until ``--after`` seconds after version 1 reached
END. Reported: failed requests (non-200 or connection errors), p50/p99 latency before the
switch (the window before version 2 appears) and during it (from its appearance to version 1's
END), the peak memory (PSS) of the server and all its workers (sampled every 0.1 s) against
before, and the time from the directory appearing to the first answer from version 2 (traffic
moved) and to version 1's END. Answers are told apart by their values (``affine``: versions 1
and 2 have different weights; ``small_cnn``: version 2 is the same SavedModel, the switch is
then read from the status endpoint). The clients' CPU time is reported too: they share the
machine with the server.

``cores``: two models served by one server (a model config file), each loaded by ``--clients``
clients at once, with each model's workers from ``--workers-list`` in turn: throughput and p99
per model, to choose how many workers each model gets on a small machine.

Prints a markdown table and writes ``version_switch.json`` to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
READY = re.compile(r"^serving '(?P<name>[^']+)' version (?P<version>\d+) on http://(?P<addr>\S+)$")


def build_versions(model: str, root: Path) -> tuple[Path, Path, Any]:
    """Two versions staged under ``root/store``; returns their paths and a request body."""
    store = root / "store"
    store.mkdir(parents=True)
    if model == "affine":
        code = (
            "import sys; from pool.reference_models import build_affine; "
            "build_affine(sys.argv[1], 1); build_affine(sys.argv[2], 2)"
        )
        subprocess.run(
            [sys.executable, "-c", code, str(store / "1"), str(store / "2")],
            check=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"},
            capture_output=True,
        )
        body = {"instances": (np.arange(16, dtype=np.float32).reshape(4, 4) / 7).tolist()}
    else:
        sys.path.insert(1, str(REPO))
        from pool import reference_models

        source = reference_models.ensure(model)
        for v in ("1", "2"):
            shutil.copytree(source, store / v)
        rng = np.random.default_rng(0)
        body = {"instances": rng.random((4, 32, 32, 3), dtype=np.float32).tolist()}
    return store / "1", store / "2", body


class Served:
    """``python -m pool serve ARGS --port 0`` in a subprocess; its stderr kept."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
        command = [sys.executable, "-m", "pool", "serve", *args, "--port", "0", "-v"]
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, errors="replace"
        )
        self.lines: list[str] = []
        self.addr = ""
        ready = threading.Event()

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.lines.append(line.rstrip("\n"))
                m = READY.match(line.strip())
                if m:
                    self.addr = m["addr"]
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        while not ready.wait(0.2):
            if self.process.poll() is not None:
                raise RuntimeError("server did not start:\n" + "\n".join(self.lines[-30:]))

    def memory(self) -> int:
        """Proportional set size (PSS) of the server and every descendant: pages shared
        between the processes (the forkserver's TensorFlow) counted once overall."""
        try:
            procs = [psutil.Process(self.process.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_full_info().pss
            except psutil.Error:
                pass
        return total

    def get(self, path: str) -> Any:
        conn = http.client.HTTPConnection(self.addr, timeout=60)
        conn.request("GET", path)
        answer = json.loads(conn.getresponse().read())
        conn.close()
        return answer

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)


class Load:
    """``clients`` closed-loop threads posting ``body`` to ``path``; every answer recorded as
    (start, end, ok, first value of the answer)."""

    def __init__(self, addr: str, path: str, body: Any, clients: int) -> None:
        self.records: list[tuple[float, float, bool, float]] = []
        self._stop = threading.Event()
        payload = json.dumps(body).encode()

        def client() -> None:
            conn = http.client.HTTPConnection(addr, timeout=60)
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    conn.request("POST", path, payload, {"Content-Type": "application/json"})
                    response = conn.getresponse()
                    data = response.read()
                    ok = response.status == 200
                    value = json.loads(data)["predictions"][0] if ok else None
                    first = float(np.ravel(value)[0]) if ok else float("nan")
                except (OSError, http.client.HTTPException, ValueError):
                    conn.close()
                    conn = http.client.HTTPConnection(addr, timeout=60)
                    ok, first = False, float("nan")
                self.records.append((t0, time.perf_counter(), ok, first))
            conn.close()

        self._threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan")}
    a = np.asarray(latencies) * 1e3
    return {
        "n": len(a),
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
    }


def switch(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    v1, v2, body = build_versions(args.model, work)
    base = work / "base" / "m"
    base.mkdir(parents=True)
    shutil.copytree(v1, base / "1")
    server = Served(
        str(base), "--workers", str(args.workers), "--file-system-poll-wait-seconds", "1"
    )
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        load = Load(server.addr, "/v1/models/m:predict", body, args.clients)
        memory: list[tuple[float, int]] = []
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                memory.append((time.perf_counter(), server.memory()))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        time.sleep(args.before)
        staged = work / "base" / ".m-2-staging"
        shutil.copytree(v2, staged)
        appeared = time.perf_counter()
        os.rename(staged, base / "2")  # the directory appears complete at once
        ended = None
        deadline = appeared + 300
        while time.perf_counter() < deadline:
            states = {
                e["version"]: e["state"] for e in server.get("/v1/models/m")["model_version_status"]
            }
            if states.get("1") == "END" and states.get("2") == "AVAILABLE":
                ended = time.perf_counter()
                break
            time.sleep(0.05)
        time.sleep(args.after)
        load.stop()
        sampling.set()
        sampler.join()
        pinned = server.get("/v1/models/m/versions/2")  # noqa: F841  (the server still answers)
    finally:
        server.stop()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    records = load.records
    v1_value = next(r[3] for r in records if r[2])
    moved = [r[1] for r in records if r[2] and r[0] >= appeared and r[3] != v1_value]
    before = [r[1] - r[0] for r in records if r[1] < appeared and r[2]]
    end = ended or records[-1][1]
    during = [r[1] - r[0] for r in records if r[1] >= appeared and r[0] <= end and r[2]]
    after = [r[1] - r[0] for r in records if r[0] > end and r[2]]
    rss_before = max((m for t, m in memory if t < appeared), default=0)
    rss_peak = max((m for _, m in memory), default=0)
    span = records[-1][1] - records[0][0]
    result = {
        "model": args.model,
        "clients": args.clients,
        "workers": args.workers,
        "requests": len(records),
        "failed": sum(1 for r in records if not r[2]),
        "before": percentiles(before),
        "during": percentiles(during),
        "after": percentiles(after),
        "rss_before_mib": rss_before / 2**20,
        "rss_peak_mib": rss_peak / 2**20,
        "traffic_moved_s": (min(moved) - appeared) if moved and args.model == "affine" else None,
        "v1_end_s": (ended - appeared) if ended else None,
        "client_cpu_share": (
            (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / span if span else 0
        ),
        "req_per_s": len(records) / span if span else 0,
    }
    return result


CONFIG = """model_config_list {{
  config {{ name: "a" base_path: "{a}" }}
  config {{ name: "b" base_path: "{b}" }}
}}
"""


def cores(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    v1, _, body = build_versions(args.model, work)
    for name in ("a", "b"):
        (work / name).mkdir()
        os.symlink(v1, work / name / "1")
    config = work / "models.config"
    config.write_text(CONFIG.format(a=work / "a", b=work / "b"))
    rows = []
    for workers in [int(w) for w in args.workers_list.split(",")]:
        server = Served(f"--model-config-file={config}", "--workers", str(workers))
        try:
            for loaded in ("ab", "a"):  # both models busy; then b idle
                loads = {
                    m: Load(server.addr, f"/v1/models/{m}:predict", body, args.clients)
                    for m in loaded
                }
                time.sleep(args.seconds)
                for load in loads.values():
                    load.stop()
                for m, load in loads.items():
                    recs = [r for r in load.records if r[2]]
                    span = max(r[1] for r in recs) - min(r[0] for r in recs)
                    rows.append(
                        {
                            "workers_per_model": workers,
                            "loaded": "+".join(loaded),
                            "model": m,
                            "req_per_s": len(recs) / span,
                            "failed": len(load.records) - len(recs),
                            **percentiles([r[1] - r[0] for r in recs]),
                        }
                    )
        finally:
            server.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["switch", "cores"])
    parser.add_argument("--model", default=None, help="affine (switch default) or small_cnn")
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--workers-list", default="1,2")
    parser.add_argument("--before", type=float, default=5.0)
    parser.add_argument("--after", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--output-dir", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    args.model = args.model or ("affine" if args.mode == "switch" else "small_cnn")
    args.clients = args.clients or (16 if args.mode == "switch" else 8)
    with tempfile.TemporaryDirectory(prefix="version-switch-") as tmp:
        result: Any = switch(args, Path(tmp)) if args.mode == "switch" else cores(args, Path(tmp))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"version_{args.mode}.json").write_text(json.dumps(result, indent=2))
    if args.mode == "switch":
        r = result
        print(
            "| clients | requests | failed | p50 / p99 before (ms) | p50 / p99 during (ms) | "
            "PSS before -> peak (MiB) | to traffic moved (s) | to v1 END (s) | client CPU |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        moved = "-" if r["traffic_moved_s"] is None else f"{r['traffic_moved_s']:.2f}"
        end = "-" if r["v1_end_s"] is None else f"{r['v1_end_s']:.2f}"
        print(
            f"| {r['clients']} | {r['requests']} | {r['failed']} | "
            f"{r['before']['p50_ms']:.1f} / {r['before']['p99_ms']:.1f} | "
            f"{r['during']['p50_ms']:.1f} / {r['during']['p99_ms']:.1f} | "
            f"{r['rss_before_mib']:.0f} -> {r['rss_peak_mib']:.0f} | {moved} | {end} | "
            f"{r['client_cpu_share']:.2f} cores |"
        )
    else:
        print("| workers per model | loaded | model | req/s | p50 (ms) | p99 (ms) | failed |")
        print("|---|---|---|---|---|---|---|")
        for r in result:
            print(
                f"| {r['workers_per_model']} | {r['loaded']} | {r['model']} | "
                f"{r['req_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['failed']} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
