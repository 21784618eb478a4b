"""The core-scaling benchmark runs end to end (``--quick``) and writes sane figures.

No timing assertions: this machine's speed is not under test, only that the script works,
that every configuration it measures answers like the others, and that its outputs exist.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "core_scaling.py"
LABELS = {"load_per_call", "single", "single_batch", "executor", "pool"}


@pytest.mark.timeout(240)
def test_quick_run_writes_table_json_and_plot(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--workers", "1,2", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=230,
    )
    assert run.returncode == 0, run.stderr[-4000:]

    # stdout: the markdown table and the targets, the same text as latest.md
    assert "| Configuration |" in run.stdout and "`PredictionPool`" in run.stdout
    targets = [line.split()[0] for line in run.stdout.splitlines() if "(target " in line]
    assert targets and set(targets) <= {"PASS", "MISS", "N/A"}, targets
    assert (tmp_path / "latest.md").read_text().strip() == run.stdout.strip()

    png = (tmp_path / "core_scaling.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    results = json.loads((tmp_path / "core_scaling.json").read_text())
    machine = results["machine"]
    assert machine["physical_cores"] >= 1 and machine["logical_cores"] >= 1
    assert machine["tensorflow"] and machine["cpu_model"]
    assert list(results["workloads"]) == ["image"]
    image = results["workloads"]["image"]
    entries = image["entries"]
    assert {e["label"] for e in entries} == LABELS
    for kind in ("executor", "pool"):
        assert sorted(e["workers"] for e in entries if e["label"] == kind) == [1, 2]

    for e in entries:
        name = f"{e['label']} x{e['workers']}"
        assert e["verification"]["outputs_match"], (name, e["verification"])
        rate = e["summary"]["rows_per_second"]
        assert 0 < rate["min"] <= rate["median"] <= rate["max"], (name, rate)
        assert len(e["pass_seconds"]) == results["settings"]["repeats"] or (
            e["label"] == "load_per_call"
        )
        if e["label"] != "single_batch":
            assert e["startup_seconds"] > 0, name
            latency = e["summary"]["latency_seconds"]
            assert 0 < latency["p50"] <= latency["p95"], (name, latency)
        memory = e["memory"]
        assert memory["processes"] == (e["workers"] if e["label"] in ("executor", "pool") else 1)
        assert 50 << 20 < memory["peak_rss_bytes_max"] < 16 << 30, (name, memory)
        assert 0 < memory["peak_uss_bytes_max"] <= memory["peak_rss_bytes_max"], (name, memory)
        if e["label"] in ("executor", "pool"):
            efficiency = e["summary"]["scaling_efficiency"]
            assert efficiency > 0 and (e["workers"] != 1 or efficiency == pytest.approx(1.0))

    pools = [e for e in entries if e["label"] == "pool"]
    assert all(w["loads"] == 1 for e in pools for w in e["worker_stats"])  # loaded once each
    assert sum(w["rows"] for w in pools[-1]["worker_stats"]) >= image["rows"]
    versus_executor = [t for t in image["targets"] if "ProcessPoolExecutor" in t["target"]]
    assert len(versus_executor) == 2 and all(t["passed"] in (True, False) for t in versus_executor)
