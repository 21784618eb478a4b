"""``benchmarks/cluster.py --quick`` runs end to end and writes consistent figures.

No timing assertions: only that the three configurations answer like the local pool, that the
ratios follow from the raw figures, and that no process is left behind.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def marked(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("POOL_BENCHMARK_TEST_RUN") == marker:
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.mark.timeout(400)
def test_cluster_benchmark_quick_run(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "cluster.py"),
            "--quick",
            "--workers",
            "2",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "POOL_BENCHMARK_TEST_RUN": marker},
        timeout=390,
    )
    _, alive = psutil.wait_procs(marked(marker), timeout=15)
    assert not alive, f"the benchmark left processes behind: {[p.pid for p in alive]}"
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "cluster.md").read_text() == run.stdout
    report = json.loads((tmp_path / "cluster.json").read_text())
    assert list(report["workloads"]) == ["cnn"]
    workload = report["workloads"]["cnn"]
    configs = workload["configs"]
    assert set(configs) == {"local", "cluster", "dask_idiom"}
    assert configs["local"]["check"] == {"reference": True}
    for kind in ("cluster", "dask_idiom"):
        check = configs[kind]["check"]
        assert check["outputs_match"] and check["rows_compared"] == workload["rows"] == 64, check
        sent = configs[kind]["scheduler_bytes_per_shard"]  # measured on the scheduler's sockets
        assert sent is None or sent > 0, (kind, sent)
    assert configs["local"]["scheduler_bytes_per_shard"] is None
    for kind, config in configs.items():
        assert len(config["pass_seconds"]) == report["rounds"] * report["passes"], kind
        rate = workload["rows"] / statistics.median(config["pass_seconds"])
        assert config["rows_per_second_median"] == pytest.approx(rate)
    assert configs["cluster"]["intra_op_threads"] == configs["local"]["intra_op_threads"] == "1"
    rates = {k: c["rows_per_second_median"] for k, c in configs.items()}
    ratios = workload["ratios"]
    assert ratios["cluster / local"] == pytest.approx(rates["cluster"] / rates["local"])
    assert ratios["cluster / dask_idiom"] == pytest.approx(rates["cluster"] / rates["dask_idiom"])
    statuses = [line.split()[0] for line in run.stdout.splitlines() if "(target " in line]
    expected = 3 if configs["cluster"]["scheduler_bytes_per_shard"] is not None else 2
    assert len(statuses) == expected and set(statuses) <= {"PASS", "MISS"}
