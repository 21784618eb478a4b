"""Serving benchmark: ``python -m pool serve`` against the same HTTP stack serving a global model.

    python benchmarks/serving.py [--workloads text,cnn,image] [--clients 1,16,64]
                                 [--seconds 10] [--workers N] [--quick] [--output-dir DIR]
                                 [--update-docs]

Workloads: ``text`` (the reference text-embedding model), ``cnn`` (the small CNN, 32x32x3
images) and ``image`` (MobileNetV2, 224x224x3). For each, two servers run one after the
other on a free loopback port, each in its own process, never at the same time:

1. ``baseline``: ``benchmarks/serving_baseline.py``, the model loaded once into a global and
   called from a thread pool, behind the same ``create_app`` on uvicorn (same JSON codec);
2. ``pool``: ``python -m pool serve`` (default batching options).

Load: ``wrk`` (a C load generator: ``apt-get install wrk``; without it the Python load
generator ``serving_load.py`` runs instead, with a warning, and the figures understate the
server), closed loop, one-row ``:predict`` requests sent round robin from 64 bodies, at each
``--clients`` count (keep-alive connections). Reported per run: requests/s, p50/p99 latency,
errors, the server process's CPU per request (its own user + system time over the requests
answered; the pool's workers are other processes and are not counted; the baseline's model
runs inside its process and is), the load generator's CPU per request, and the rows per model
call (from the metrics endpoint). Both servers answer the same bodies first and the answers are
compared row by row. Writes ``serving.json``, ``serving.md`` (also printed) and ``serving.png``.

gRPC (``--protocols rest,grpc``, the default): the pool server also answers TF Serving's gRPC
``Predict`` on a free port; ``grpc_load.py`` (grpcio's asyncio client in one process, its CPU
reported: a Python client costs more per request than wrk) sends the same rows as
``PredictRequest`` messages at the same connection counts. The baseline serves REST only.

Targets (issue 15, 2 cores): the pool's REST req/s >= 2x the baseline's at 16 and 64 connections
on ``text`` and ``cnn``, >= 1.0x on ``image``; the pool server's CPU per one-row REST request
<= 200 us (text model, 16 and 64 connections); the pool's gRPC req/s >= its REST req/s at the
same connections. Other protocols plug in through :func:`measure_protocol`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # `pool` from this checkout even when it is not installed
    sys.path.insert(1, str(REPO))

import common  # noqa: E402  (benchmarks/ is on sys.path as the script's directory)
import grpc_load  # noqa: E402
from wrk_load import INSTALL_HINT, LoadGenerator, rest_load_generator  # noqa: E402

log = logging.getLogger("serving")

BASELINE = HERE / "serving_baseline.py"
DEFAULT_OUTPUT_DIR = HERE / "results"
DOCS_BEGIN = "<!-- serving-results:begin (pasted by serving.py --update-docs) -->"
DOCS_END = "<!-- serving-results:end -->"
READY = re.compile(r"^serving '(?P<name>[^']+)' version (?P<version>\d+) on (?P<url>http://\S+)$")
#: Distinct one-row request bodies per workload, sent round robin.
BODIES = 64
#: Requests whose answers are compared between the two servers.
CHECKED = 16
#: Workload -> reference model (``--quick`` runs text and cnn only).
WORKLOADS = {"text": "text_embedding", "cnn": "small_cnn", "image": "mobilenet_v2"}
#: Issue 15's targets: pool req/s over the baseline's at 16+ connections, and the pool server's
#: CPU per one-row REST request on the text model.
SPEEDUP = {"text": 2.0, "cnn": 2.0, "image": 1.0}
TARGET_CONNECTIONS = (16, 64)
CPU_TARGET_US = 200.0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,4,16, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--workloads", default="text,cnn,image", help="any of text, cnn, image (default: all)"
    )
    p.add_argument("--clients", type=_int_list, default=[1, 16, 64], help="connections (wrk -c)")
    p.add_argument("--seconds", type=float, default=10.0, help="per closed/open-loop run")
    p.add_argument("--workers", type=int, help="pool workers (default: the pool's default)")
    p.add_argument(
        "--protocols", default="rest,grpc", help="rest and/or grpc (the pool server; default: both)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: text and cnn only, 1 s per run (figures not meaningful)",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help=f"default: {DEFAULT_OUTPUT_DIR.relative_to(REPO)} "
        f"({DEFAULT_OUTPUT_DIR.relative_to(REPO)}/quick with --quick)",
    )
    p.add_argument(
        "--update-docs",
        action="store_true",
        help="paste the tables into docs/serving.md (between its serving-results markers)",
    )
    args = p.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = DEFAULT_OUTPUT_DIR / "quick" if args.quick else DEFAULT_OUTPUT_DIR
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.protocols = [w.strip() for w in args.protocols.split(",") if w.strip()]
    if not args.protocols or set(args.protocols) - {"rest", "grpc"}:
        p.error(f"--protocols: expected rest and/or grpc, got {args.protocols}")
    if not args.workloads or set(args.workloads) - set(WORKLOADS):
        p.error(f"--workloads: expected some of {', '.join(WORKLOADS)}, got {args.workloads}")
    if args.quick:
        args.workloads = [w for w in args.workloads if w != "image"] or ["text"]
        args.seconds = min(args.seconds, 1.0)
    return args


# --- servers ----------------------------------------------------------------------------------
class ServerProcess:
    """A server command started in its own process; ``url`` once it printed its ready line."""

    def __init__(self, command: list[str], timeout: float = 600) -> None:
        self.command = command
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self.lines: list[str] = []
        self.url = self.name = self.kind = ""
        ready = threading.Event()

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.lines.append(line.rstrip("\n"))
                match = READY.match(line.strip())
                if match and not ready.is_set():
                    self.url, self.name = match["url"], match["name"]
                    ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        started = time.perf_counter()
        while not ready.wait(0.2):
            if self.process.poll() is not None or time.perf_counter() - started > timeout:
                self.stop()
                raise SystemExit(
                    f"server failed to start: {' '.join(command)}\n" + "\n".join(self.lines[-30:])
                )
        self.startup_seconds = time.perf_counter() - started

    @property
    def grpc_address(self) -> str:
        """``HOST:PORT`` of the pool server's gRPC API (its ``gRPC on`` line)."""
        for line in self.lines:
            if line.startswith("gRPC on "):
                return line.split(" on ", 1)[1].strip()
        raise SystemExit("the server printed no 'gRPC on HOST:PORT' line")

    @property
    def predict_url(self) -> str:
        return f"{self.url}/v1/models/{self.name}:predict"

    def post(self, body: bytes) -> dict:
        request = urllib.request.Request(
            self.predict_url, body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def model_counters(self) -> tuple[float, float]:
        """(rows, model calls) answered so far, from the metrics endpoint."""
        with urllib.request.urlopen(f"{self.url}/monitoring/prometheus/metrics", timeout=60) as r:
            text = r.read().decode()
        totals = {"pool_model_rows_total": 0.0, "pool_model_calls_total": 0.0}
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in totals:
                totals[name] += float(line.rsplit(" ", 1)[1])
        return totals["pool_model_rows_total"], totals["pool_model_calls_total"]

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
            return None


def server_command(kind: str, model: str, workers: int | None, grpc: bool = False) -> list[str]:
    if kind == "baseline":
        return [sys.executable, str(BASELINE), model, "--port", "0"]
    command = [sys.executable, "-m", "pool", "serve", model, "--port", "0"]
    command += ["--grpc-port", "0"] if grpc else ["--no-grpc"]
    return command + (["--workers", str(workers)] if workers else [])


# --- load -------------------------------------------------------------------------------------
def make_inputs(workload: str, model_name: str) -> dict[str, np.ndarray]:
    """The rows sent, one per request, the same for both protocols."""
    specs = common.REFERENCE_INPUTS.get(model_name)
    if specs is None:
        raise SystemExit(f"unknown signature for {model_name!r}: use a reference model")
    count = 8 if workload == "image" else BODIES  # a MobileNetV2 row is ~3 MB of JSON
    return common.make_inputs(specs, count, seed=11)


def make_bodies(workload: str, model_name: str, workdir: Path) -> tuple[Path, list[bytes]]:
    inputs = make_inputs(workload, model_name)
    count = len(next(iter(inputs.values())))
    bodies = []
    for i in range(count):
        instance = {k: (v[i].tolist() if v.dtype != object else v[i]) for k, v in inputs.items()}
        row = next(iter(instance.values())) if len(instance) == 1 else instance
        bodies.append(json.dumps({"instances": [row]}).encode())
    path = workdir / f"{workload}-bodies.jsonl"
    path.write_bytes(b"\n".join(bodies) + b"\n")
    return path, bodies


def grpc_bodies(workload: str, model_name: str, served_name: str) -> list[bytes]:
    """The same rows as :func:`make_bodies`'s, as serialized ``PredictRequest`` messages."""
    inputs = make_inputs(workload, model_name)
    count = len(next(iter(inputs.values())))
    rows = [{k: v[i : i + 1] for k, v in inputs.items()} for i in range(count)]
    return grpc_load.predict_bodies(served_name, rows)


def model_counters_delta(server: ServerProcess, run: Callable[[], dict]) -> dict:
    """``run()``'s result with the rows per model call the server formed meanwhile."""
    rows_before, calls_before = server.model_counters()
    result = run()
    rows_after, calls_after = server.model_counters()
    calls = calls_after - calls_before
    result["model_calls"] = calls
    result["rows_per_model_call"] = (rows_after - rows_before) / calls if calls else None
    return result


def measure_protocol(
    server: ServerProcess,
    protocol: str,
    generator: LoadGenerator,
    target: str,
    bodies: list[Any],
    clients: list[int],
    seconds: float,
) -> list[dict]:
    """One closed-loop run per connection count of ``generator(target, bodies, connections=,
    seconds=, server_pid=)`` against ``server``: the REST rows (wrk on the ``:predict`` URL);
    after merging, the gRPC rows come from the same call with ``grpc_load.py``'s generator, its
    target and its requests (the keys of ``wrk_load.run_wrk``'s result)."""
    runs = []
    for count in clients:
        log.info("%s: %s, %d connections", server.kind, protocol, count)
        result = model_counters_delta(
            server,
            lambda count=count: generator(
                target, bodies, connections=count, seconds=seconds, server_pid=server.process.pid
            ),
        )
        result.update(protocol=protocol, clients=count)
        runs.append(result)
    return runs


def compare(answers: dict[str, list[dict]]) -> dict[str, Any]:
    """The pool's answers against the baseline's, row for row (float32 round-off)."""
    base = np.asarray([a["predictions"] for a in answers["baseline"]], np.float32)
    got = np.asarray([a["predictions"] for a in answers["pool"]], np.float32)
    same = base.shape == got.shape and bool(
        np.allclose(got, base, rtol=common.RTOL, atol=common.ATOL)
    )
    diff = float(np.max(np.abs(got - base))) if base.shape == got.shape else None
    return {"outputs_match": same, "max_abs_diff": diff, "checked_requests": len(base)}


def measure_workload(args: argparse.Namespace, workload: str, workdir: Path) -> dict[str, Any]:
    model_name = WORKLOADS[workload]
    model = common.reference_model(model_name)
    _, bodies = make_bodies(workload, model_name, workdir)
    servers: dict[str, dict] = {}
    answers: dict[str, list[dict]] = {}
    generator_name, generator = rest_load_generator()
    grpc = "grpc" in args.protocols
    for kind in ("baseline", "pool"):
        log.info("%s: starting the %s server on %s", workload, kind, model)
        server = ServerProcess(server_command(kind, model, args.workers, grpc and kind == "pool"))
        server.kind = f"{workload}/{kind}"
        try:
            answers[kind] = [server.post(b) for b in bodies[:CHECKED]]  # also warms up
            runs = []
            if "rest" in args.protocols or kind == "baseline":
                runs += measure_protocol(
                    server,
                    "rest",
                    generator,
                    server.predict_url,
                    bodies,
                    args.clients,
                    args.seconds,
                )
            if grpc and kind == "pool":
                runs += measure_protocol(
                    server,
                    "grpc",
                    grpc_load.run_grpc,
                    server.grpc_address,
                    grpc_bodies(workload, model_name, server.name),
                    args.clients,
                    args.seconds,
                )
            calls = sum(r["model_calls"] for r in runs)
            rows = sum((r["rows_per_model_call"] or 0) * r["model_calls"] for r in runs)
            servers[kind] = {
                "command": " ".join(server.command[1:]),
                "startup_seconds": server.startup_seconds,
                "load_generator": generator_name,
                "runs": runs,
                "rows_per_model_call": rows / calls if calls else None,
            }
        finally:
            code = server.stop()
        if code != 0:
            raise SystemExit(f"the {kind} server exited {code}:\n" + "\n".join(server.lines[-30:]))
    return {
        "model": model,
        **compare(answers),
        "servers": servers,
        "targets": targets(workload, servers),
    }


def targets(workload: str, servers: dict) -> list[dict]:
    """Issue 15's targets (PASS/MISS; N/A when no such run was made)."""
    wanted = SPEEDUP[workload]
    out = []
    base_runs = {(r["protocol"], r["clients"]): r for r in servers["baseline"]["runs"]}
    for run in servers["pool"]["runs"]:
        base = base_runs.get((run["protocol"], run["clients"]))
        if base is None or run["clients"] not in TARGET_CONNECTIONS:
            continue
        ratio = run["requests_per_second"] / max(base["requests_per_second"], 1e-9)
        out.append(
            {
                "target": f"{run['protocol']} {run['clients']} connections: pool req/s >= "
                f"{wanted:g}x baseline",
                "ratio": ratio,
                "passed": ratio >= wanted,
            }
        )
        cpu = run.get("server_cpu_us_per_request")
        if workload == "text" and run["protocol"] == "rest" and cpu is not None:
            out.append(
                {
                    "target": f"rest {run['clients']} connections: pool server CPU per one-row "
                    f"request <= {CPU_TARGET_US:g} us",
                    "value": cpu,
                    "passed": cpu <= CPU_TARGET_US,
                }
            )
    pool_runs = {(r["protocol"], r["clients"]): r for r in servers["pool"]["runs"]}
    for (protocol, clients), run in pool_runs.items():
        rest = pool_runs.get(("rest", clients))
        if protocol != "grpc" or rest is None:
            continue
        ratio = run["requests_per_second"] / max(rest["requests_per_second"], 1e-9)
        out.append(
            {
                "target": f"grpc {clients} connections: pool gRPC req/s >= its REST req/s",
                "ratio": ratio,
                "passed": ratio >= 1.0,
            }
        )
    if not out:
        out.append({"target": "16 or 64 connections (no such run)", "ratio": None, "passed": None})
    return out


# --- report -------------------------------------------------------------------------------------
def _ms(run: dict) -> str:
    return f"{run['latency_ms']['p50']:.1f} / {run['latency_ms']['p99']:.1f}"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        "# Serving benchmark",
        "",
        f"Run {results['finished']} (revision {results['revision']}) on {machine['cpu_model']}, "
        f"{machine['logical_cores']} logical cores; command: `{results['command']}`. "
        f"{results['settings']['seconds']:g} s per run, closed loop, one-row requests; load "
        f"generator: {results['settings']['load_generator']}.",
        "",
        "![p50 and p99 latency against throughput](serving.png)",
        "",
        "Server CPU: the server process's own CPU time per request (the pool's workers are other "
        "processes, not counted; the baseline computes the model in its process). Load CPU: the "
        "load generator's CPU per request.",
        "",
    ]
    for workload, data in results["workloads"].items():
        servers = data["servers"]
        base_runs = {(r["protocol"], r["clients"]): r for r in servers["baseline"]["runs"]}
        lines += [
            f"### {workload}: `{Path(data['model']).name}`",
            "",
            "| protocol | connections | baseline req/s | pool req/s | pool / baseline "
            "| baseline p50 / p99 ms | pool p50 / p99 ms | baseline server CPU us/req "
            "| pool server CPU us/req | load CPU us/req (pool run) | pool rows per model call "
            "| errors (baseline, pool) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for run in servers["pool"]["runs"]:
            base = base_runs.get((run["protocol"], run["clients"]))
            ratio = (
                "-"
                if base is None
                else f"{run['requests_per_second'] / max(base['requests_per_second'], 1e-9):.2f}x"
            )
            per_call = run["rows_per_model_call"]
            lines.append(
                f"| {run['protocol']} | {run['clients']} | "
                f"{'-' if base is None else round(base['requests_per_second'])} | "
                f"{run['requests_per_second']:.0f} | {ratio} | "
                f"{'-' if base is None else _ms(base)} | {_ms(run)} | "
                f"{_us(None if base is None else base.get('server_cpu_us_per_request'))} | "
                f"{_us(run.get('server_cpu_us_per_request'))} | "
                f"{_us(run.get('load_generator_cpu_us_per_request'))} | "
                f"{'-' if per_call is None else f'{per_call:.1f}'} | "
                f"{'-' if base is None else base['errors']}, {run['errors']} |"
            )
        match = "match" if data["outputs_match"] else "DIFFER"
        lines += ["", f"Answers of the two servers {match} (max abs diff {data['max_abs_diff']})."]
        for t in data["targets"]:
            verdict = {True: "PASS", False: "MISS", None: "N/A"}[t["passed"]]
            if t.get("ratio") is not None:
                figure = f": {t['ratio']:.2f}x"
            elif t.get("value") is not None:
                figure = f": {t['value']:.0f} us"
            else:
                figure = ""
            lines.append(f"- {verdict} {t['target']}{figure}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = results["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.8), squeeze=False)
    for ax, (workload, data) in zip(axes[0], workloads.items(), strict=True):
        for kind, color in (("baseline", "tab:gray"), ("pool", "tab:blue")):
            runs = [r for r in data["servers"][kind]["runs"] if r["protocol"] == "rest"]
            x = [r["requests_per_second"] for r in runs]
            for q, style in (("p50", "-o"), ("p99", "--^")):
                ax.plot(
                    x, [r["latency_ms"][q] for r in runs], style, color=color, label=f"{kind} {q}"
                )
            for r, xi in zip(runs, x, strict=True):
                ax.annotate(
                    str(r["clients"]),
                    (xi, r["latency_ms"]["p50"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(3, 3),
                )
        ax.set_title(f"{workload}: {Path(data['model']).name}")
        ax.set_xlabel("requests / s (REST, closed loop; labels: connections)")
        ax.set_ylabel("latency (ms)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging()
    generator_name, _ = rest_load_generator()
    if generator_name != "wrk":
        log.warning(
            "%s; falling back to the Python load generator (serving_load.py), whose "
            "CPU per request is several times wrk's, on the server's cores: the "
            "figures understate the servers",
            INSTALL_HINT,
        )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": common.command_line(argv),
        "started": common.now(),
        "revision": common.git_revision(),
        "machine": common.describe_machine(),
        "settings": {
            "clients": args.clients,
            "seconds": args.seconds,
            "workers": args.workers,
            "quick": args.quick,
            "load_generator": generator_name,
            "bodies": BODIES,
        },
        "workloads": {},
    }
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        for workload in args.workloads:
            results["workloads"][workload] = measure_workload(args, workload, Path(tmp))
    results["finished"] = common.now()
    text = markdown(results)
    (args.output_dir / "serving.json").write_text(
        json.dumps(results, indent=1, default=common.json_default)
    )
    (args.output_dir / "serving.md").write_text(text)
    plot(results, args.output_dir / "serving.png")
    sys.stdout.write(text)
    if args.update_docs:
        common.update_docs(
            REPO / "docs" / "serving.md", text, args.output_dir, DOCS_BEGIN, DOCS_END
        )
    mismatched = [w for w, d in results["workloads"].items() if not d["outputs_match"]]
    if mismatched:
        log.error("the servers' answers differ on %s", mismatched)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
