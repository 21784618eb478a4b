"""The benchmarks run end to end (``--quick``) and write sane figures.

No timing assertions: this machine's speed is not under test, only that the scripts work,
that every configuration they measure answers like the reference, that the figures they
derive follow from the raw ones, and that they leave no process behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
LABELS = {"load_per_call", "single", "single_batch", "executor", "pool"}


def run_benchmark(
    script: str, *args: str, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``benchmarks/SCRIPT`` with a marker in its environment; after it exits, check that
    no process carrying the marker (its runners, their fork servers and workers) is left."""
    marker = uuid.uuid4().hex
    env = {**os.environ, **(env or {}), "POOL_BENCHMARK_TEST_RUN": marker}
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )
    _, alive = psutil.wait_procs(_marked(marker), timeout=15)
    assert not alive, f"{script} left processes behind: {[p.pid for p in alive]}"
    return run


def _marked(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("POOL_BENCHMARK_TEST_RUN") == marker:
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def target_statuses(stdout: str) -> list[str]:
    return [line.split()[0] for line in stdout.splitlines() if "(target " in line]


def benchmark_module(name: str):  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def runtime_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One conversion cache for this module's runs (the small CNN converts once), not the
    user's ``~/.cache/pool/runtimes``."""
    return {"POOL_RUNTIME_CACHE": str(tmp_path_factory.mktemp("runtime-cache"))}


def needs_runtimes(*names: str) -> pytest.MarkDecorator:
    from pool.runtimes import installed

    missing = [n for n in names if not installed(n, converting=True)]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {missing}")


# --- core scaling ----------------------------------------------------------------------------
@pytest.mark.timeout(400)
def test_core_scaling_quick_run_writes_table_json_and_plot(tmp_path: Path) -> None:
    run = run_benchmark(
        "core_scaling.py",
        "--quick",
        "--workers",
        "1,2",
        "--runtimes",
        "none",  # the runtime configurations have their own test below
        "--output-dir",
        str(tmp_path),
        timeout=390,
    )
    assert run.returncode == 0, run.stderr[-4000:]

    # stdout: the markdown tables and the targets, the same text as latest.md
    assert "| Configuration |" in run.stdout and "`PredictionPool`" in run.stdout
    assert "Parent CPU µs per shard" in run.stdout
    statuses = target_statuses(run.stdout)
    assert statuses and set(statuses) <= {"PASS", "MISS", "N/A", "INFO"}, statuses
    assert (tmp_path / "latest.md").read_text().strip() == run.stdout.strip()

    png = (tmp_path / "core_scaling.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    results = json.loads((tmp_path / "core_scaling.json").read_text())
    machine = results["machine"]
    assert machine["physical_cores"] >= 1 and machine["logical_cores"] >= 1
    assert machine["tensorflow"] and machine["cpu_model"]
    assert list(results["workloads"]) == ["cnn"]
    cnn = results["workloads"]["cnn"]
    assert cnn["model"] == "small_cnn" and cnn["shard_size"] == 16
    entries = cnn["entries"]
    assert {e["label"] for e in entries} == LABELS
    for kind in ("executor", "pool"):
        assert sorted(e["workers"] for e in entries if e["label"] == kind) == [1, 2]

    for e in entries:
        name = f"{e['label']} x{e['workers']}"
        assert e["verification"]["outputs_match"], (name, e["verification"])
        rate = e["summary"]["rows_per_second"]
        assert 0 < rate["min"] <= rate["median"] <= rate["max"], (name, rate)
        if e["label"] != "single_batch":
            assert e["startup_seconds"] > 0, name
            latency = e["summary"]["latency_seconds"]
            assert 0 < latency["p50"] <= latency["p95"], (name, latency)
        memory = e["memory"]
        assert memory["processes"] == (e["workers"] if e["label"] in ("executor", "pool") else 1)
        assert 50 << 20 < memory["peak_rss_bytes_max"] < 16 << 30, (name, memory)
        assert 0 < memory["peak_uss_bytes_max"] <= memory["peak_rss_bytes_max"], (name, memory)
        if e["label"] in ("executor", "pool"):
            assert [r["round"] for r in e["rounds"]] == [0]
            assert len(e["pass_seconds"]) == results["settings"]["repeats"]
            efficiency = e["summary"]["scaling_efficiency"]
            assert efficiency > 0 and (e["workers"] != 1 or efficiency == pytest.approx(1.0))
            # the parent's CPU over the timed passes, per shard sent
            assert e["timed_shards"] == cnn["rows"] // cnn["shard_size"]
            assert e["parent_cpu"]["seconds"] > 0
            assert e["summary"]["parent_cpu_seconds_per_shard"] == pytest.approx(
                e["parent_cpu"]["seconds"] / e["timed_shards"]
            )
            assert "copies_per_shard" in e  # None until the pool reports its transport

    pools = [e for e in entries if e["label"] == "pool"]
    assert all(w["loads"] == 1 for e in pools for w in e["worker_stats"])  # loaded once each
    assert sum(w["rows"] for w in pools[-1]["worker_stats"]) >= cnn["rows"]
    for e in pools:
        calls = e["model_calls"]
        assert calls["rows"] == cnn["rows"] * results["settings"]["repeats"], calls
        assert 1 <= calls["model_calls"] <= calls["rows"]
        assert e["summary"]["rows_per_model_call"] == pytest.approx(
            calls["rows"] / calls["model_calls"]
        )
    versus_executor = [t for t in cnn["targets"] if "ProcessPoolExecutor" in t["target"]]
    assert len(versus_executor) == 2
    for t in versus_executor:  # enforced on every workload, computed from the medians
        assert t["enforced"] and t["bound"] == 1.05 and t["passed"] == (t["measured"] >= 1.05)


@needs_runtimes("openvino", "onnxruntime")
@pytest.mark.timeout(240)
def test_core_scaling_runtime_configurations_quick_run(
    tmp_path: Path, runtime_cache: dict[str, str]
) -> None:
    """The pool on a converted runtime and with auto, beside each runtime's no-IPC ceiling and
    its best single process, checked against TensorFlow relative to the output's scale."""
    run = run_benchmark(
        "core_scaling.py",
        "--quick",
        "--runtime-only",
        "--workers",
        "2",
        "--runtimes",
        "auto,openvino,openvino-bf16",
        "--output-dir",
        str(tmp_path),
        timeout=230,
        env=runtime_cache,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "converting once (not timed" in run.stderr  # before anything is timed
    assert "Runtimes (issue 14)" in run.stdout
    assert (tmp_path / "latest.md").read_text().strip() == run.stdout.strip()
    results = json.loads((tmp_path / "core_scaling.json").read_text())
    cnn = results["workloads"]["cnn"]
    resolved = cnn["runtimes"]["resolved"]
    assert set(resolved) == {"auto", "openvino", "openvino-bf16"}
    assert cnn["runtimes"]["cache"] == runtime_cache["POOL_RUNTIME_CACHE"]
    chose = resolved["auto"]["runtime"]
    entries = cnn["entries"]
    labels = {(e["label"], e.get("runtime_key"), e["workers"]) for e in entries}
    assert ("executor", None, 1) not in labels and ("load_per_call", None, 1) not in labels
    pools = {e["runtime_key"]: e for e in entries if e["label"] == "runtime_pool"}
    assert set(pools) == {"auto", "openvino", "openvino-bf16"}
    assert all(e["workers"] == 2 for e in pools.values())
    ceilings = {e["runtime_key"]: e for e in entries if e["label"] == "runtime_ceiling"}
    assert set(ceilings) == {"tensorflow", "openvino", chose}
    singles = {e["runtime_key"]: e for e in entries if e["label"] == "runtime_single"}
    assert set(singles) == {"openvino", chose} - {"tensorflow"}
    tolerances = {"f32": 1e-4, "bf16": 5e-2}  # pool.runtimes.TOLERANCES
    for e in [*pools.values(), *ceilings.values(), *singles.values()]:
        name = f"{e['label']} {e['runtime_key']}"
        check = e["verification"]
        assert check["outputs_match"], (name, check)
        assert check["rows_compared"] == cnn["rows"], (name, check)
        assert 0 <= check["max_rel_diff"] <= tolerances[e.get("precision", "f32")], name
        assert check["tolerance"] == tolerances[e.get("precision", "f32")], name
        assert e["summary"]["rows_per_second"]["median"] > 0, name
        assert 50 << 20 < e["memory"]["peak_rss_bytes_max"] < 16 << 30, (name, e["memory"])
        assert 0 < e["memory"]["peak_uss_bytes_max"] <= e["memory"]["peak_rss_bytes_max"], name
    for key, e in pools.items():  # what the pool ran, as it says itself
        runs = resolved[key]["runtime"]
        assert e["runtime_info"]["runtime"] == runs
        assert {w["runtime"] for w in e["ready_info"]} == {runs}
    assert pools["openvino-bf16"]["runtime_info"]["precision"] == "bf16"
    for key, e in ceilings.items():  # N independent processes, rows split between them
        assert e["memory"]["processes"] == 2 and sum(e["rows_per_process"]) == cnn["rows"]
        slowest = [
            max(p[i] for p in e["process_pass_seconds"]) for i in range(len(e["pass_seconds"]))
        ]
        assert e["pass_seconds"] == slowest, key
    assert singles["openvino"]["threads"]["performance_hint"] == "THROUGHPUT"
    assert singles["openvino"]["threads"]["infer_requests"] >= 1

    def rate(e: dict) -> float:
        return e["summary"]["rows_per_second"]["median"]

    tf_pool = next(e for e in entries if e["label"] == "pool" and e["workers"] == 2)
    ov = pools["openvino"]["summary"]
    assert ov["vs_tensorflow_pool"] == pytest.approx(rate(pools["openvino"]) / rate(tf_pool))
    assert ov["vs_ceiling"] == pytest.approx(rate(pools["openvino"]) / rate(ceilings["openvino"]))
    assert ov["vs_own_single"] == pytest.approx(rate(pools["openvino"]) / rate(singles["openvino"]))
    assert "vs_ceiling" not in pools["openvino-bf16"]["summary"]  # no bf16 ceiling: no ratio

    targets = {t["target"]: t for t in cnn["targets"]}
    auto = targets["runtime='auto' pool vs the TensorFlow pool at N=2"]
    assert auto["bound"] == 1.3 and auto["enforced"]
    assert auto["passed"] == (auto["measured"] >= 1.3)
    assert auto["measured"] == pytest.approx(pools["auto"]["summary"]["vs_tensorflow_pool"])
    ceiling = targets["PredictionPool runtime='openvino' vs the no-IPC ceiling of openvino at N=2"]
    assert ceiling["bound"] == 0.95 and ceiling["measured"] == pytest.approx(ov["vs_ceiling"])
    own = "PredictionPool runtime='openvino' vs the best single-process configuration of openvino"
    assert targets[f"{own} at N=2"]["bound"] == 1.0
    bf16 = [t for t in cnn["targets"] if "openvino-bf16" in t["target"]]
    assert (
        len(bf16) == 1 and not bf16[0]["enforced"] and "of the output's scale" in bf16[0]["detail"]
    )
    statuses = target_statuses(run.stdout)
    assert {"PASS", "MISS"} & set(statuses) and "INFO" in statuses


def test_core_scaling_plan_interleaves_runtime_configurations() -> None:
    core_scaling = benchmark_module("core_scaling")
    args = core_scaling.parse_args(
        ["--workers", "1,2", "--runtime-workers", "2", "--rounds", "2", "--runtimes", "auto"]
    )
    runtimes = {
        "resolved": {
            "auto": {"runtime": "onnxruntime", "precision": "f32", "artifact": "/a/ort"},
        }
    }
    names = [name for name, _ in core_scaling.plan(args, runtimes)]
    assert names[:3] == ["single", "load_per_call", "runtime_single-onnxruntime"]
    round0 = [
        "executor-1-round0",
        "pool-1-round0",
        "executor-2-round0",
        "pool-2-round0",
        "runtime_pool-auto-2-round0",
        "runtime_ceiling-tensorflow-2-round0",
        "runtime_ceiling-onnxruntime-2-round0",
    ]
    round1 = [
        "pool-1-round1",
        "executor-1-round1",
        *reversed([n.replace("round0", "round1") for n in round0[2:]]),
    ]
    assert names[3:] == round0 + round1
    specs = dict(core_scaling.plan(args, runtimes))
    assert specs["runtime_ceiling-onnxruntime-2-round0"]["artifact"] == "/a/ort"
    assert specs["runtime_pool-auto-2-round0"]["runtime"] == "auto"
    # no runtime: the plan of before; no baselines: the runtime pools alone
    assert not [n for n, _ in core_scaling.plan(args, None) if n.startswith("runtime_")]
    args = core_scaling.parse_args(["--workers", "2", "--runtime-baselines", "none"])
    names = [name for name, _ in core_scaling.plan(args, runtimes)]
    assert [n for n in names if n.startswith("runtime_")] == [
        f"runtime_pool-auto-2-round{r}" for r in range(5)
    ]


def test_verify_scaled_judges_differences_relative_to_the_output_scale() -> None:
    import numpy as np

    common = benchmark_module("common")
    want = {"logits": np.array([[40.0, -30.0], [10.0, 2.0]], dtype=np.float32)}
    near = {"logits": want["logits"] + np.float32(2e-3)}  # 5e-5 of the scale 40
    check = common.verify_scaled(near, want, 1e-4)
    assert check["outputs_match"] and check["rows_compared"] == 2
    assert check["max_rel_diff"] == pytest.approx(2e-3 / 40, rel=1e-3)
    assert not common.verify(near, want)["outputs_match"]  # np.allclose's atol would refuse it
    far = {"logits": want["logits"] + np.float32(0.01)}  # 2.5e-4 of the scale
    check = common.verify_scaled(far, want, 1e-4)
    assert not check["outputs_match"] and "tolerance 0.0001" in check["reason"]
    assert not common.verify_scaled({"other": want["logits"]}, want, 1e-4)["outputs_match"]


def test_core_scaling_merges_rounds_into_one_entry_per_configuration() -> None:
    core_scaling = benchmark_module("core_scaling")

    def entry(round_: int, passes: list[float], cpu: float, calls: int) -> dict:
        return {
            "label": "pool",
            "workers": 2,
            "round": round_,
            "pass_seconds": passes,
            "rows_per_pass": [64] * len(passes),
            "latency_seconds": [0.01 * (round_ + 1)],
            "startup_seconds": 5.0 + round_,
            "memory": {"peak_rss_bytes_max": 100 * (round_ + 1)},
            "parent_cpu": {"seconds": cpu, "user_seconds": cpu, "system_seconds": 0.0},
            "timed_shards": 4 * len(passes),
            "model_calls": {"rows": 64 * len(passes), "model_calls": calls, "shards": 8},
            "copies_per_shard": None,
            "verification": {
                "outputs_match": True,
                "max_abs_diff": 1e-7 * round_,
                "rows_compared": 64,
            },
        }

    single = {"label": "single", "workers": 1, "pass_seconds": [1.0], "rows_per_pass": [64]}
    rounds = [entry(0, [1.0, 2.0], 0.5, 2), entry(1, [3.0], 0.25, 6), entry(2, [4.0], 0.75, 8)]
    merged = core_scaling.merge_rounds([single, *rounds])
    assert merged[0] is single  # configurations measured once are left as they are
    (pool,) = merged[1:]
    assert pool["pass_seconds"] == [1.0, 2.0, 3.0, 4.0]
    assert pool["rows_per_pass"] == [64] * 4
    assert pool["latency_seconds"] == pytest.approx([0.01, 0.02, 0.03])
    assert pool["startup_seconds"] == 6.0  # the median round's
    assert pool["memory"] == {"peak_rss_bytes_max": 300}  # the round with the highest peak
    assert pool["parent_cpu"]["seconds"] == pytest.approx(1.5)
    assert pool["timed_shards"] == 16
    assert pool["model_calls"]["rows_per_model_call"] == pytest.approx(256 / 16)
    assert pool["verification"]["rows_compared"] == 64
    assert [r["round"] for r in pool["rounds"]] == [0, 1, 2]
    rounds[1]["verification"] = {"outputs_match": False, "reason": "values differ"}
    (_, pool) = core_scaling.merge_rounds([single, *rounds])
    assert pool["verification"] == {"outputs_match": False, "reason": "values differ"}


# --- concurrent requests ---------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_concurrent_requests_quick_run_writes_tables_json_and_plot(
    tmp_path: Path, runtime_cache: dict[str, str]
) -> None:
    from pool.runtimes import installed

    auto = installed("openvino", True) or installed("onnxruntime", True)
    run = run_benchmark(
        "concurrent_requests.py",
        "--quick",
        "--output-dir",
        str(tmp_path),
        timeout=290,
        env=runtime_cache,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "| Clients | Configuration |" in run.stdout
    assert (tmp_path / "requests.md").read_text().strip() == run.stdout.strip()
    statuses = target_statuses(run.stdout)
    # 16 and 64 clients are not measured by --quick; 1 client is
    assert statuses[:2] == ["N/A", "N/A"] and statuses[2] in ("PASS", "MISS"), statuses

    png = (tmp_path / "requests.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    results = json.loads((tmp_path / "requests.json").read_text())
    assert results["settings"]["clients"] == [1, 4]
    assert list(results["workloads"]) == ["small_cnn"]
    workload = results["workloads"]["small_cnn"]
    runs = workload["runs"]
    assert sorted(r["kind"] for r in runs) == ["executor", "global", "pool", "pool_auto"]
    assert "runtime='auto' for" in run.stderr  # converted before anything was timed
    (auto_run,) = [r for r in runs if r["kind"] == "pool_auto"]
    assert auto_run["runtime_info"]["requested"] == "auto"
    assert auto_run["runtime_info"]["runtime"] == workload["auto"]["runtime"]
    if auto:  # the small CNN converts: a converted runtime runs it
        assert workload["auto"]["runtime"] in ("openvino", "onnxruntime")
    workers = results["settings"]["workers"]
    for run_ in runs:
        kind = run_["kind"]
        assert run_["startup_seconds"] > 0
        assert run_["processes"] == (1 if kind == "global" else workers)
        assert [lv["clients"] for lv in run_["levels"]] == [1, 4]
        for level in run_["levels"]:
            name = f"{kind} x{level['clients']}"
            check = level["verification"]
            assert check["outputs_match"], (name, check)
            if kind == "pool_auto":  # relative to the output's scale, within f32's tolerance
                assert 0 <= check["max_rel_diff"] <= check["tolerance"] == 1e-4, (name, check)
            assert check["rows_compared"] == workload["rows"], (name, check)
            assert level["requests"] > 0 and level["window_seconds"] > 0
            assert level["requests_per_second"] == pytest.approx(
                level["requests"] / level["window_seconds"]
            )
            latency = level["latency_seconds"]
            assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
            assert level["parent_cpu"]["seconds"] > 0
            assert level["parent_cpu_seconds_per_request"] == pytest.approx(
                level["parent_cpu"]["seconds"] / level["requests"]
            )
            if kind in ("pool", "pool_auto"):  # rows and model calls counted by the pool
                calls = level["model_calls"]
                assert calls["rows"] >= level["requests"] - level["clients"], (name, calls)
                assert 1 <= calls["model_calls"] <= calls["rows"], (name, calls)
                assert level["rows_per_model_call"] == pytest.approx(
                    calls["rows"] / calls["model_calls"]
                )
            else:
                assert level["rows_per_model_call"] == 1.0
        if kind == "global":  # TensorFlow's default thread pools, as recorded
            assert run_["threads"] == {"intra_op_threads": 0, "inter_op_threads": 0}

    summary = workload["summary"]
    for clients in ("1", "4"):
        glob, pool = summary["global"][clients], summary["pool"][clients]
        assert glob["vs_global"] == pytest.approx(1.0)
        assert pool["vs_global"] == pytest.approx(
            pool["requests_per_second"]["median"] / glob["requests_per_second"]["median"]
        )
    latency_target = workload["targets"][-1]
    base = summary["global"]["1"]["p50_seconds"]["median"]
    have = summary["pool"]["1"]["p50_seconds"]["median"]
    assert latency_target["passed"] == (have <= base * 1.2 + 1e-3)

    rendered = subprocess.run(  # --render-only redraws the same tables from the JSON alone
        [
            sys.executable,
            str(BENCHMARKS / "concurrent_requests.py"),
            "--render-only",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert rendered.returncode == 0, rendered.stderr[-4000:]
    assert rendered.stdout == run.stdout
