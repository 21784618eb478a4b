"""Serving benchmark: ``python -m pool serve`` against the same HTTP stack serving a global model.

    python benchmarks/serving.py [--workloads text,image] [--image-model mobilenet_v2]
                                 [--clients 1,4,16,64] [--seconds 10] [--workers N]
                                 [--open-loop-load 0.7] [--quick] [--output-dir DIR]
                                 [--update-docs]

For each workload (``text``: the reference text-embedding model; ``image``: an image model,
MobileNetV2 by default), two servers run one after the other on a free loopback port, each in
its own process, never at the same time:

1. ``baseline``: ``benchmarks/serving_baseline.py``, the model loaded once into a global and
   called from a thread pool, behind the same Starlette + uvicorn app and JSON codec;
2. ``pool``: ``python -m pool serve`` (default batching options: dispatch at once, combine what
   waits, up to 256 rows per model call).

Each server gets, from a separate load-generator process (``serving_load.py``: threads,
keep-alive ``http.client`` connections, loopback only, bounded in time and count):

- closed loop: 1, 4, 16, 64 clients sending one-row ``:predict`` requests back to back;
- open loop: a fixed arrival rate, the same for both servers (``--open-loop-load`` times the
  baseline's best closed-loop rate), latency measured from each request's due time.

Both servers answer the same request bodies first, and the answers are compared row by row
(``outputs_match``). Reported per run: requests/s, p50/p90/p99 latency, errors, and for the
pool the rows per model call (the batch sizes its dynamic batching formed, from the metrics
endpoint). Writes ``serving.json`` (every figure, the machine), ``serving.png`` (p50 and p99
latency against throughput) and ``serving.md`` (the tables and targets, also printed to stdout).
Targets (issue 11): at 16+ clients the pool's req/s >= 2x the baseline's on the text model with
p99 no worse, >= 1.0x on the image model.
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
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # `pool` from this checkout even when it is not installed
    sys.path.insert(1, str(REPO))

import common  # noqa: E402  (benchmarks/ is on sys.path as the script's directory)

log = logging.getLogger("serving")

LOAD = HERE / "serving_load.py"
BASELINE = HERE / "serving_baseline.py"
DEFAULT_OUTPUT_DIR = HERE / "results"
DOCS_BEGIN = "<!-- serving-results:begin (pasted by serving.py --update-docs) -->"
DOCS_END = "<!-- serving-results:end -->"
READY = re.compile(r"^serving '(?P<name>[^']+)' version (?P<version>\d+) on (?P<url>http://\S+)$")
#: Distinct one-row request bodies per workload, sent round robin.
BODIES = 64
#: Requests whose answers are compared between the two servers.
CHECKED = 16


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
    p.add_argument("--workloads", default="text,image", help="text, image or both (default)")
    p.add_argument("--text-model", default="text_embedding", help="reference model name")
    p.add_argument(
        "--image-model", default="mobilenet_v2", help="reference model name (small_cnn...)"
    )
    p.add_argument("--clients", type=_int_list, default=[1, 4, 16, 64])
    p.add_argument("--seconds", type=float, default=10.0, help="per closed/open-loop run")
    p.add_argument("--workers", type=int, help="pool workers (default: the pool's default)")
    p.add_argument(
        "--open-loop-load",
        type=float,
        default=0.7,
        help="open-loop rate as a fraction of the baseline's best closed-loop req/s",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: small_cnn as the image model, 1.5 s per run (figures not meaningful)",
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
    if not args.workloads or set(args.workloads) - {"text", "image"}:
        p.error(f"--workloads: expected text, image or both, got {args.workloads}")
    if args.quick:
        args.image_model = "small_cnn" if args.image_model == "mobilenet_v2" else args.image_model
        args.seconds = min(args.seconds, 1.5)
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
        self.url = self.name = ""
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


def server_command(kind: str, model: str, workers: int | None) -> list[str]:
    if kind == "baseline":
        return [sys.executable, str(BASELINE), model, "--port", "0"]
    command = [sys.executable, "-m", "pool", "serve", model, "--port", "0"]
    return command + (["--workers", str(workers)] if workers else [])


# --- load -------------------------------------------------------------------------------------
def make_bodies(workload: str, model_name: str, workdir: Path) -> tuple[Path, list[bytes]]:
    specs = common.REFERENCE_INPUTS.get(model_name)
    if specs is None:
        raise SystemExit(f"unknown signature for {model_name!r}: use a reference model")
    inputs = common.make_inputs(specs, BODIES, seed=11)
    bodies = []
    for i in range(BODIES):
        instance = {k: (v[i].tolist() if v.dtype != object else v[i]) for k, v in inputs.items()}
        row = next(iter(instance.values())) if len(instance) == 1 else instance
        bodies.append(json.dumps({"instances": [row]}).encode())
    path = workdir / f"{workload}-bodies.jsonl"
    path.write_bytes(b"\n".join(bodies) + b"\n")
    return path, bodies


def run_load(server: ServerProcess, bodies: Path, mode: list[str], seconds: float) -> dict:
    command = [
        sys.executable,
        str(LOAD),
        "--url",
        server.predict_url,
        "--bodies",
        str(bodies),
        "--seconds",
        str(seconds),
        *mode,
    ]
    rows_before, calls_before = server.model_counters()
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 180, cwd=REPO, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"load generator failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rows_after, calls_after = server.model_counters()
    calls = calls_after - calls_before
    result["model_calls"] = calls
    result["rows_per_model_call"] = (rows_after - rows_before) / calls if calls else None
    return result


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
    model_name = args.text_model if workload == "text" else args.image_model
    model = common.reference_model(model_name)
    bodies_path, bodies = make_bodies(workload, model_name, workdir)
    servers: dict[str, dict] = {}
    answers: dict[str, list[dict]] = {}
    rate = None
    for kind in ("baseline", "pool"):
        log.info("%s: starting the %s server on %s", workload, kind, model)
        server = ServerProcess(server_command(kind, model, args.workers))
        try:
            answers[kind] = [server.post(b) for b in bodies[:CHECKED]]  # also warms up
            closed = []
            for clients in args.clients:
                log.info("%s/%s: closed loop, %d clients", workload, kind, clients)
                closed.append(
                    run_load(
                        server, bodies_path, ["closed", "--clients", str(clients)], args.seconds
                    )
                )
            if rate is None:  # the baseline's best closed-loop rate sets the open-loop rate
                best = max(r["requests_per_second"] for r in closed)
                rate = max(1.0, round(args.open_loop_load * best, 1))
            log.info("%s/%s: open loop at %.1f req/s", workload, kind, rate)
            opened = run_load(server, bodies_path, ["open", "--rate", str(rate)], args.seconds)
            servers[kind] = {
                "command": " ".join(server.command[1:]),
                "startup_seconds": server.startup_seconds,
                "closed_loop": closed,
                "open_loop": opened,
            }
            calls = sum(r["model_calls"] for r in [*closed, opened])
            rows = sum(
                (r["rows_per_model_call"] or 0) * r["model_calls"] for r in [*closed, opened]
            )
            servers[kind]["rows_per_model_call"] = rows / calls if calls else None
        finally:
            code = server.stop()
        if code != 0:
            raise SystemExit(f"the {kind} server exited {code}:\n" + "\n".join(server.lines[-30:]))
    return {
        "model": model,
        "open_loop_rate": rate,
        **compare(answers),
        "servers": servers,
        "targets": targets(workload, servers, args.clients),
    }


def targets(workload: str, servers: dict, clients: list[int]) -> list[dict]:
    """Issue 11's targets at 16+ clients (PASS/MISS; N/A when no such run was made)."""
    wanted = 2.0 if workload == "text" else 1.0
    out = []
    pairs = zip(servers["baseline"]["closed_loop"], servers["pool"]["closed_loop"], strict=True)
    for base, pool in pairs:
        if base["clients"] < 16:
            continue
        ratio = pool["requests_per_second"] / max(base["requests_per_second"], 1e-9)
        p99_ok = workload != "text" or pool["latency_ms"]["p99"] <= base["latency_ms"]["p99"]
        out.append(
            {
                "target": f"{base['clients']} clients: pool req/s >= {wanted:g}x baseline"
                + (", p99 no worse" if workload == "text" else ""),
                "ratio": ratio,
                "passed": ratio >= wanted and p99_ok,
            }
        )
    if not out:
        out.append({"target": "16+ clients (no such run)", "ratio": None, "passed": None})
    return out


# --- report -------------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        "# Serving benchmark",
        "",
        f"Run {results['finished']} (revision {results['revision']}) on {machine['cpu_model']}, "
        f"{machine['logical_cores']} logical cores; command: `{results['command']}`. "
        f"{results['settings']['seconds']:g} s per run.",
        "",
        "![p50 and p99 latency against throughput](serving.png)",
        "",
    ]
    for workload, data in results["workloads"].items():
        servers = data["servers"]
        lines += [
            f"### {workload}: `{Path(data['model']).name}`, one-row requests",
            "",
            "| clients | baseline req/s | pool req/s | pool / baseline | baseline p50 / p99 ms "
            "| pool p50 / p99 ms | pool rows per model call | errors (baseline, pool) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        runs = [
            *zip(servers["baseline"]["closed_loop"], servers["pool"]["closed_loop"], strict=True),
            (servers["baseline"]["open_loop"], servers["pool"]["open_loop"]),
        ]
        for base, pool in runs:
            label = str(base["clients"]) if "clients" in base else f"open loop {base['rate']:g}/s"
            ratio = pool["requests_per_second"] / max(base["requests_per_second"], 1e-9)
            per_call = pool["rows_per_model_call"]
            lines.append(
                f"| {label} | {base['requests_per_second']:.0f} | "
                f"{pool['requests_per_second']:.0f} | {ratio:.2f}x | "
                f"{base['latency_ms']['p50']:.1f} / {base['latency_ms']['p99']:.1f} | "
                f"{pool['latency_ms']['p50']:.1f} / {pool['latency_ms']['p99']:.1f} | "
                f"{'-' if per_call is None else f'{per_call:.1f}'} | "
                f"{base['errors']}, {pool['errors']} |"
            )
        match = "match" if data["outputs_match"] else "DIFFER"
        lines += ["", f"Answers of the two servers {match} (max abs diff {data['max_abs_diff']})."]
        for t in data["targets"]:
            verdict = {True: "PASS", False: "MISS", None: "N/A"}[t["passed"]]
            ratio = "" if t["ratio"] is None else f": {t['ratio']:.2f}x"
            lines.append(f"- {verdict} {t['target']}{ratio}")
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
            runs = data["servers"][kind]["closed_loop"]
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
            opened = data["servers"][kind]["open_loop"]
            ax.plot(
                [opened["requests_per_second"]],
                [opened["latency_ms"]["p99"]],
                "s",
                color=color,
                mfc="none",
                label=f"{kind} open-loop p99",
            )
        ax.set_title(f"{workload}: {Path(data['model']).name}")
        ax.set_xlabel("requests / s (closed loop; labels: clients)")
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
            "open_loop_load": args.open_loop_load,
            "quick": args.quick,
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
