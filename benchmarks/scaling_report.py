"""Figures, targets, markdown tables and plot of a core-scaling run (see core_scaling.py).

Everything here is computed from the raw figures the runners measured; nothing is
extrapolated. ``summarize`` adds a ``summary`` to every entry and ``targets`` to every
workload of the results dict, which is then written to JSON as is.

Targets (issue 8, then the earlier ones): PredictionPool >= 1.05x the plain executor at every
worker count on every workload; on the image workload, at N = physical cores, scaling
efficiency >= 0.95, >= 1.15x the best single process, start-up <= 1.5x start-up with one
worker, and load-per-call >= 50x slower per request. Other workloads show those as INFO.
Issue 14's, at N = physical cores (``runtime_targets``): runtime="auto" >= 1.6x the TensorFlow
pool on the image workload and >= 1.3x on cnn; the pool on each converted runtime >= 0.95x
that runtime's no-IPC ceiling and >= 1.0x its best single process; on text, TensorFlow (the
pool, and auto's fallback) >= 0.9x its no-IPC ceiling; bf16 as INFO with its difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

MIB = 1 << 20

#: PredictionPool / plain executor rows/s, at every worker count, on every workload.
TARGET_VS_EXECUTOR = 1.05
#: The image workload's targets, at N = physical cores.
TARGET_EFFICIENCY = 0.95
TARGET_VS_SINGLE = 1.15
TARGET_STARTUP_RATIO = 1.5
TARGET_LOAD_PER_CALL = 50.0
#: The workload whose scaling, start-up and load-per-call targets are enforced.
MAIN_WORKLOAD = "image"
#: Issue 14, at N = physical cores: the pool with runtime="auto" / the TensorFlow pool.
TARGET_AUTO_VS_TENSORFLOW = {"image": 1.6, "cnn": 1.3}
#: A pool on a converted runtime / that runtime's no-IPC ceiling and best single process.
TARGET_VS_CEILING = 0.95
TARGET_VS_OWN_SINGLE = 1.0
#: The text model (no runtime converts it: TensorFlow) / TensorFlow's no-IPC ceiling.
TEXT_WORKLOAD = "text"
TARGET_TEXT_VS_CEILING = 0.9

TITLES = {
    "load_per_call": "load per call (`hub.load` for every request)",
    "single": "single process, loaded once, shards",
    "single_batch": "single process, loaded once, one batch of all rows",
    "executor": "`ProcessPoolExecutor` + initializer (spawn)",
    "pool": "`PredictionPool`",
    "runtime_pool": "`PredictionPool(runtime=...)`",
    "runtime_single": "runtime's best single process",
    "runtime_ceiling": "no-IPC ceiling",
}

DOCS_BEGIN = "<!-- core_scaling:begin (pasted by core_scaling.py --update-docs) -->"
DOCS_END = "<!-- core_scaling:end -->"


def _stats(samples: list[float]) -> dict[str, Any]:
    return {
        "median": float(np.median(samples)),
        "min": float(np.min(samples)),
        "max": float(np.max(samples)),
        "samples": [float(s) for s in samples],
    }


def _throughput(e: dict) -> float:
    return e["summary"]["rows_per_second"]["median"]


def summarize(results: dict[str, Any]) -> None:
    """Add each entry's derived figures and each workload's targets, in place."""
    # physical cores this process may use (the affinity mask, capped by physical cores)
    physical = results["machine"]["default_workers"]
    for name, workload in results["workloads"].items():
        entries = workload["entries"]
        for e in entries:
            rates = [r / s for r, s in zip(e["rows_per_pass"], e["pass_seconds"], strict=True)]
            summary: dict[str, Any] = {"rows_per_second": _stats(rates)}
            if e["latency_seconds"]:
                lat = np.asarray(e["latency_seconds"])
                summary["latency_seconds"] = {
                    "p50": float(np.percentile(lat, 50)),
                    "p95": float(np.percentile(lat, 95)),
                    "count": int(lat.size),
                }
            e["summary"] = summary
        singles = [e for e in entries if e["label"] in ("single", "single_batch")]
        best_single = max(singles, key=_throughput) if singles else None
        for e in entries:
            if best_single is not None:
                e["summary"]["vs_best_single"] = _throughput(e) / _throughput(best_single)
            if e["label"] in ("executor", "pool"):
                one = _find(entries, e["label"], 1)
                e["summary"]["scaling_efficiency"] = (
                    _throughput(e) / (e["workers"] * _throughput(one)) if one else None
                )
            if e["label"] == "pool":
                plain = _find(entries, "executor", e["workers"])
                e["summary"]["vs_executor"] = _throughput(e) / _throughput(plain) if plain else None
            if e.get("parent_cpu") and e.get("timed_shards"):
                e["summary"]["parent_cpu_seconds_per_shard"] = (
                    e["parent_cpu"]["seconds"] / e["timed_shards"]
                )
            if e.get("model_calls"):
                e["summary"]["rows_per_model_call"] = e["model_calls"]["rows_per_model_call"]
        workload["best_single"] = best_single["label"] if best_single else None
        _runtime_ratios(entries, best_single)
        workload["targets"] = targets(workload, physical, main=name == MAIN_WORKLOAD)
        workload["targets"] += runtime_targets(workload, physical, name)


def _find(
    entries: list[dict], label: str, workers: int, runtime_key: str | None = None
) -> dict | None:
    for e in entries:
        if e["label"] == label and e["workers"] == workers:
            if runtime_key is None or e.get("runtime_key") == runtime_key:
                return e
    return None


def runs_on(e: dict) -> str:
    """The runtime that really ran an entry: ``auto``'s choice, TensorFlow for the TF pool."""
    if e["label"] == "runtime_pool":
        return (e.get("runtime_info") or {}).get("runtime") or e["runtime_key"]
    return e.get("runtime_key") or "tensorflow"


def _runtime_ratios(entries: list[dict], best_single: dict | None) -> None:
    """Each runtime configuration against the TensorFlow pool at the same worker count, each
    pool against the no-IPC ceiling of the runtime it runs (same worker count) and against
    that runtime's best single-process configuration (TensorFlow's: the best ``single``)."""
    for e in entries:
        if e["label"] not in ("pool", "runtime_pool", "runtime_ceiling"):
            continue
        s = e["summary"]
        tf_pool = _find(entries, "pool", e["workers"])
        if tf_pool is not None:
            s["vs_tensorflow_pool"] = _throughput(e) / _throughput(tf_pool)
        if e["label"] == "runtime_ceiling":
            continue
        runtime = runs_on(e)
        precision = e.get("precision", "f32")
        ceiling = _find(entries, "runtime_ceiling", e["workers"], runtime)
        if ceiling is not None and precision == "f32":
            s["vs_ceiling"] = _throughput(e) / _throughput(ceiling)
        own = (
            best_single if runtime == "tensorflow" else _find(entries, "runtime_single", 1, runtime)
        )
        if own is not None and precision == "f32":
            s["vs_own_single"] = _throughput(e) / _throughput(own)


def targets(workload: dict, physical: int, main: bool) -> list[dict[str, Any]]:
    """The targets, computed from the measured figures. ``passed`` is None when a figure was
    not measured; lines not ``enforced`` on this workload are information."""
    entries = workload["entries"]
    pools = {e["workers"]: e for e in entries if e["label"] == "pool"}
    if physical not in pools and pools:  # e.g. --workers 1,2 on an 8-core machine
        physical = max(pools)
    at_p, one = pools.get(physical), pools.get(1)
    scales = at_p is not None and one is not None and physical > 1  # else nothing to compare
    best = max((e for e in entries if e["label"].startswith("single")), key=_throughput)
    lines = []

    def add(
        name: str,
        measured: float | None,
        bound: float,
        at_least: bool,
        detail: str,
        enforced: bool = main,
    ) -> None:
        passed = None
        if measured is not None:
            passed = measured >= bound if at_least else measured <= bound
        lines.append(
            {
                "target": name,
                "measured": measured,
                "bound": bound,
                "comparison": ">=" if at_least else "<=",
                "passed": passed,
                "enforced": enforced,
                "detail": detail,
            }
        )

    add(
        f"scaling efficiency of PredictionPool at N={physical}",
        at_p["summary"]["scaling_efficiency"] if scales else None,
        TARGET_EFFICIENCY,
        True,
        f"throughput({physical}) / ({physical} x throughput(1))",
    )
    add(
        f"PredictionPool N={physical} vs the best single-process configuration",
        _throughput(at_p) / _throughput(best) if at_p else None,
        TARGET_VS_SINGLE,
        True,
        f"best single process: {TITLES[best['label']]}, {_throughput(best):.1f} rows/s",
    )
    for n, e in sorted(pools.items()):
        add(
            f"PredictionPool vs plain ProcessPoolExecutor at N={n}",
            e["summary"].get("vs_executor"),
            TARGET_VS_EXECUTOR,
            True,
            "median rows/s ratio" + (f", {_rounds(e)} rounds interleaved" if _rounds(e) else ""),
            enforced=True,
        )
    add(
        f"start-up with N={physical} workers / start-up with N=1",
        at_p["startup_seconds"] / one["startup_seconds"] if scales else None,
        TARGET_STARTUP_RATIO,
        False,
        "time from creating the pool to the first result"
        + (
            f": {one['startup_seconds']:.2f} s -> {at_p['startup_seconds']:.2f} s" if scales else ""
        ),
    )
    lpc = next((e for e in entries if e["label"] == "load_per_call"), None)
    pool_request = at_p["summary"].get("latency_seconds", {}).get("p50") if at_p else None
    lpc_request = float(np.median(lpc["pass_seconds"])) if lpc else None
    add(
        "load-per-call seconds per request / PredictionPool seconds per request",
        lpc_request / pool_request if lpc_request and pool_request else None,
        TARGET_LOAD_PER_CALL,
        True,
        (
            f"one request = one shard; load per call {lpc_request:.3f} s (median of "
            f"{len(lpc['pass_seconds'])}), PredictionPool N={physical} {pool_request:.4f} s "
            f"(p50 of shards sent one at a time); amortized over a full pass the pool takes "
            f"{workload['shard_size'] / _throughput(at_p):.4f} s per shard"
            if lpc_request and pool_request
            else "not measured"
        ),
    )
    return lines


def runtime_targets(workload: dict, physical: int, name: str) -> list[dict[str, Any]]:
    """Issue 14's targets at N = physical cores (or the largest count measured): ``auto``
    against the TensorFlow pool (image, cnn), every pool against the no-IPC ceiling of the
    runtime it runs and against that runtime's best single process; bf16 as information."""
    entries = workload["entries"]
    rt_pools = [e for e in entries if e["label"] == "runtime_pool"]
    counts = sorted(
        {e["workers"] for e in rt_pools}
        | {e["workers"] for e in entries if e["label"] == "runtime_ceiling"}
    )
    if not counts:
        return []
    n = physical if physical in counts else max(counts)
    lines: list[dict[str, Any]] = []

    def add(target: str, measured: float | None, bound: float, detail: str, enforced: bool) -> None:
        lines.append(
            {
                "target": target,
                "measured": measured,
                "bound": bound,
                "comparison": ">=",
                "passed": None if measured is None else measured >= bound,
                "enforced": enforced,
                "detail": detail,
            }
        )

    auto = _find(entries, "runtime_pool", n, "auto")
    if name in TARGET_AUTO_VS_TENSORFLOW:
        chose = runs_on(auto) if auto else "?"
        add(
            f"runtime='auto' pool vs the TensorFlow pool at N={n}",
            auto["summary"].get("vs_tensorflow_pool") if auto else None,
            TARGET_AUTO_VS_TENSORFLOW[name],
            f"auto ran {chose}; median rows/s ratio, interleaved rounds",
            True,
        )
    tf_pool = _find(entries, "pool", n)
    checked = [e for e in ([tf_pool] if tf_pool else []) + rt_pools if e["workers"] == n]
    # without the baselines (--runtime-baselines none, as make bench runs), no lines for them
    has_ceilings = any(e["label"] == "runtime_ceiling" for e in entries)
    has_singles = any(e["label"] == "runtime_single" for e in entries)
    for e in checked:
        if e.get("precision", "f32") != "f32":
            continue
        if name != TEXT_WORKLOAD and runs_on(e) == "tensorflow":
            continue  # TensorFlow's own pool targets are above; text's are below
        what = _pool_name(e)
        bound = TARGET_TEXT_VS_CEILING if runs_on(e) == "tensorflow" else TARGET_VS_CEILING
        if has_ceilings:
            add(
                f"{what} vs the no-IPC ceiling of {runs_on(e)} at N={n}",
                e["summary"].get("vs_ceiling"),
                bound,
                f"{n} independent processes, rows in memory, shards of "
                f"{workload['shard_size']}, 1 thread each",
                True,
            )
        if has_singles and runs_on(e) != "tensorflow":
            add(
                f"{what} vs the best single-process configuration of {runs_on(e)} at N={n}",
                e["summary"].get("vs_own_single"),
                TARGET_VS_OWN_SINGLE,
                _SINGLE_DETAIL.get(runs_on(e), "one process on every core"),
                True,
            )
    for e in rt_pools:
        if e["workers"] == n and e.get("precision") == "bf16":
            v = e["verification"]
            add(
                f"{_pool_name(e)} at N={n} vs the TensorFlow pool (no target)",
                e["summary"].get("vs_tensorflow_pool"),
                1.0,
                f"{_throughput(e):.1f} rows/s; max difference to TensorFlow "
                f"{_fmt(v.get('max_abs_diff'), '.3g')} ({_fmt(v.get('max_rel_diff'), '.3g')} "
                "of the output's scale)",
                False,
            )
    return lines


_SINGLE_DETAIL = {
    "openvino": "one process, PERFORMANCE_HINT=THROUGHPUT, AsyncInferQueue of its optimal "
    "number of requests, every core",
    "onnxruntime": "one session, intra_op_num_threads = cores",
}


def _pool_name(e: dict) -> str:
    if e["label"] == "pool":
        return "PredictionPool (tensorflow)"
    key = e["runtime_key"]
    chose = runs_on(e)
    return f"PredictionPool runtime={key!r}" + (f" (ran {chose})" if key == "auto" else "")


def _rounds(e: dict) -> int | None:
    return len(e["rounds"]) if e.get("rounds") else None


def one_line(e: dict) -> str:
    rates = [r / s for r, s in zip(e["rows_per_pass"], e["pass_seconds"], strict=True)]
    startup = e.get("startup_seconds")
    return f"{e['label']} {np.median(rates):.1f} rows/s" + (
        f" (start-up {startup:.1f} s)" if startup else ""
    )


# --- markdown --------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str = ".2f", none: str = "—") -> str:
    return none if value is None else format(value, spec)


def _row(e: dict, workload: dict) -> str:
    s = e["summary"]
    rate = s["rows_per_second"]
    threads = e["threads"].get("intra_op_threads") or "all"
    if e["label"] in ("executor", "pool"):
        shape = f"{e['workers']} × {threads}"
    else:
        shape = f"1 × {threads}"
    title = TITLES[e["label"]]
    if e["label"] == "single":
        title += f" of {workload['shard_size']}"
    elif e["label"] == "load_per_call":
        title += f", {len(e['pass_seconds'])} requests of {workload['shard_size']} rows"
    lat = s.get("latency_seconds")
    mem = e["memory"]
    verification = e["verification"]
    if verification.get("reference"):
        check = "reference"
    elif verification["outputs_match"]:
        check = f"match ({verification['rows_compared']} rows)"
    else:
        check = f"**DIFFER**: {verification['reason']}"
    cells = [
        title,
        shape,
        f"{rate['median']:.1f} ({rate['min']:.1f}–{rate['max']:.1f})",
        _fmt(s.get("vs_best_single"), ".2f") + "×",
        _fmt(s.get("scaling_efficiency"), ".2f"),
        _fmt(e.get("startup_seconds"), ".1f"),
        f"{lat['p50'] * 1e3:.0f} / {lat['p95'] * 1e3:.0f}" if lat else "—",
        f"{_fmt(_mib(mem['peak_rss_bytes_max']), '.0f')} / "
        f"{_fmt(_mib(mem['peak_uss_bytes_max']), '.0f')}",
        _fmt(_mib(mem["all_processes_peak_uss_bytes_sum"]), ".0f"),
        check,
    ]
    return "| " + " | ".join(cells) + " |"


def _mib(value: int | None) -> float | None:
    return None if value is None else value / MIB


def markdown(results: dict[str, Any], png_name: str | None = None) -> str:
    m = results["machine"]
    out = [
        "# Core-scaling benchmark: latest run",
        "",
        f"Command: `{results['command']}` ({results['created']}, "
        f"git {results.get('git_revision') or '?'}, {results['total_seconds']:.0f} s)",
        "",
        f"Machine: {m['cpu_model']}, {m['physical_cores']} physical / {m['logical_cores']} "
        f"logical cores, {m['memory_bytes'] / (1 << 30):.0f} GiB, Python {m['python']}, "
        f"TensorFlow {m['tensorflow']}, tensorflow-hub {m['tensorflow_hub']}, "
        f"load average at start {_load(m)}",
        "",
    ]
    for name, w in results["workloads"].items():
        spec = ", ".join(
            f"{n} {i['dtype']}{list(i['shape'][1:]) if i['shape'] else ''}"
            for n, i in w["inputs"].items()
        )
        out += [
            f"## {name} workload: `{w['model']}` ({spec}), {w['rows']} rows, "
            f"shard size {w['shard_size']}",
            "",
            "| Configuration | Processes × intra-op threads | rows/s median (min–max) | "
            "× best single | Scaling efficiency | Start-up s | Latency per shard p50 / p95 ms | "
            "Peak RSS / USS per worker MiB | USS of all processes MiB | Outputs |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        out += [_row(e, w) for e in _ordered(w["entries"])]
        out += ["", *_parent_table(w), *_runtime_table(w), "Targets:", ""]
        out += [f"    {target_line(t)}" for t in w["targets"]]
        out.append("")
    if png_name:
        out += [f"![throughput vs worker count]({png_name})", ""]
    settings = results["settings"]
    rounds = settings.get("rounds", 1)
    out += [
        f"rows/s: median of the timed passes over all rows after a warm-up pass "
        f"({settings['repeats']} per process; the executor and the pool ran in {rounds} "
        "interleaved round(s) of fresh processes, and their passes are pooled; min–max in "
        "brackets); start-up: from creating the pool (or, for one process, from "
        "`import tensorflow`) to the first shard's result (median over the rounds); latency: "
        "shards sent one at a time to the idle configuration; parent CPU: "
        "`getrusage(RUSAGE_SELF)` user + system seconds of the process that sends the shards, "
        "over the timed passes, divided by the shards sent (its memory sampler included, the "
        "same for both); rows per model call: from the pool's `stats()` over the timed passes; "
        "copies per shard: what `PredictionPool.transport_info()` reports (— where it reports "
        "nothing); memory: peak RSS of each worker (the process "
        "doing inference; the kernel's high-water mark, and samples every 0.1 s), peak USS "
        "(read between phases), and the sum of the peak USS of every process of the "
        "configuration (driver, fork server, resource tracker, workers); outputs: "
        "`np.allclose` to the first configuration's (rtol "
        f"{results['tolerance']['rtol']:g}, atol {results['tolerance']['atol']:g})"
        + (RUNTIME_METHOD if _has_runtimes(results) else "")
        + ".",
        "",
    ]
    return "\n".join(out)


RUNTIME_METHOD = (
    "; runtime configurations: the largest difference to the first configuration's "
    "(TensorFlow) relative to each output's scale, within `pool.runtimes.TOLERANCES` of the "
    "precision; no-IPC ceiling: N independent processes, each pinned to one CPU with its share "
    "of the rows in memory, one thread, all starting each pass together, rows/s = all rows / "
    "the slowest process's time, start-up = to the end of the slowest one's warm-up pass"
)


def _has_runtimes(results: dict[str, Any]) -> bool:
    return any(
        e["label"].startswith("runtime_")
        for w in results["workloads"].values()
        for e in w["entries"]
    )


def _parent_table(w: dict) -> list[str]:
    """The parent's cost per shard of the executor and the pool (empty if not measured)."""
    rows = [
        e
        for e in _ordered(w["entries"])
        if e["label"] in ("executor", "pool") and "parent_cpu_seconds_per_shard" in e["summary"]
    ]
    if not rows:
        return []
    out = [
        "| Configuration | Processes | Parent CPU µs per shard (user + system) | "
        "Rows per model call | Copies per shard |",
        "|---|---|---|---|---|",
    ]
    for e in rows:
        s = e["summary"]
        cpu = e["parent_cpu"]
        shards = e["timed_shards"]
        one_call = f"{e['shard_size']} (one shard per call)" if e["label"] == "executor" else "—"
        out.append(
            f"| {TITLES[e['label']]} | {e['workers']} | "
            f"{s['parent_cpu_seconds_per_shard'] * 1e6:.0f} "
            f"({cpu['user_seconds'] / shards * 1e6:.0f} + "
            f"{cpu['system_seconds'] / shards * 1e6:.0f}) | "
            f"{_fmt(s.get('rows_per_model_call'), '.1f', one_call)} | "
            f"{_fmt(e.get('copies_per_shard'), '.1f')} |"
        )
    return [*out, ""]


def _load(m: dict) -> str:
    load = m.get("load_average_at_start")
    return "?" if not load else " / ".join(f"{x:.2f}" for x in load)


def _ordered(entries: list[dict]) -> list[dict]:
    """The TensorFlow configurations of the main table (the runtimes have their own)."""
    order = {"load_per_call": 0, "single": 1, "single_batch": 2, "executor": 3, "pool": 4}
    kept = [e for e in entries if e["label"] in order]
    return sorted(kept, key=lambda e: (order[e["label"]], e["workers"]))


def _runtime_table(w: dict) -> list[str]:
    """The runtime configurations beside the TensorFlow pool (empty if none ran)."""
    entries = w["entries"]
    rt = [e for e in entries if e["label"].startswith("runtime_")]
    runtimes = w.get("runtimes") or {}
    if not rt and not runtimes.get("skipped"):
        return []
    order = {"pool": 0, "runtime_pool": 1, "runtime_ceiling": 2, "runtime_single": 3}
    shown = [e for e in entries if e["label"] == "pool"] + rt
    shown.sort(key=lambda e: (e["workers"], order[e["label"]], e.get("runtime_key") or ""))
    out = [
        "Runtimes (issue 14): the pool on each converted runtime and with `runtime='auto'`, "
        "beside the TensorFlow pool, each runtime's no-IPC ceiling (N independent processes, "
        "rows in memory, 1 thread each) and its own best single-process configuration:",
        "",
        "| Configuration | Runs on | Processes × threads | rows/s median (min–max) | "
        "× TF pool | × no-IPC ceiling | × own best single | Start-up s | "
        "Peak RSS / USS per worker MiB | Outputs vs TensorFlow |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in shown:
        s = e["summary"]
        rate = s["rows_per_second"]
        mem = e["memory"]
        if e["label"] == "pool":
            title = "`PredictionPool` (tensorflow)"
        elif e["label"] == "runtime_pool":
            title = f"`PredictionPool(runtime={e['runtime_key']!r})`"
        elif e["label"] == "runtime_ceiling":
            title = f"no-IPC ceiling, {e['runtime_key']}"
        else:
            settings = e["threads"]
            detail = (
                f"THROUGHPUT, {settings.get('infer_requests')} async requests"
                if e["runtime_key"] == "openvino"
                else "intra-op threads = cores"
            )
            title = f"best single process, {e['runtime_key']} ({detail})"
        threads = e["threads"].get("intra_op_threads") or "all"
        runs = runs_on(e) + ("" if e.get("precision", "f32") == "f32" else f" {e['precision']}")
        v = e["verification"]
        if v.get("reference"):
            check = "reference"
        elif not v["outputs_match"]:
            check = f"**DIFFER**: {v['reason']}"
        elif "max_rel_diff" in v:
            check = f"{v['max_rel_diff']:.2g} of scale (≤ {v['tolerance']:g})"
        else:
            check = f"match ({v.get('rows_compared')} rows)"
        out.append(
            "| "
            + " | ".join(
                [
                    title,
                    runs,
                    f"{e['workers']} × {threads}",
                    f"{rate['median']:.1f} ({rate['min']:.1f}–{rate['max']:.1f})",
                    _fmt(s.get("vs_tensorflow_pool"), ".2f") + "×",
                    _fmt(s.get("vs_ceiling"), ".2f") + "×",
                    _fmt(s.get("vs_own_single"), ".2f") + "×",
                    _fmt(e.get("startup_seconds"), ".1f"),
                    f"{_fmt(_mib(mem['peak_rss_bytes_max']), '.0f')} / "
                    f"{_fmt(_mib(mem['peak_uss_bytes_max']), '.0f')}",
                    check,
                ]
            )
            + " |"
        )
    out.append("")
    for key, r in (runtimes.get("resolved") or {}).items():
        info = r.get("info") or {}
        extra = ""
        if info.get("timings_rows_per_second"):
            extra = ", its timings on one thread: " + ", ".join(
                f"{k} {v:.1f}" for k, v in sorted(info["timings_rows_per_second"].items())
            )
        elif info.get("fallback"):
            extra = f", fallback: {info['fallback']}"
        out.append(
            f"- `{key}` runs {r['runtime']} ({r['precision']}), resolved before timing in "
            f"{r['resolve_seconds']:.1f} s{extra}"
        )
    for key, why in (runtimes.get("skipped") or {}).items():
        out.append(f"- `{key}` skipped: {why}")
    if runtimes.get("resolved") or runtimes.get("skipped"):
        out += [
            f"- artifacts converted once, before anything was timed, and cached in "
            f"`{runtimes.get('cache')}`",
            "",
        ]
    return out


def target_line(t: dict) -> str:
    if t["passed"] is None:
        status = "N/A " if t["enforced"] else "INFO"
    elif not t["enforced"]:
        status = "INFO"
    else:
        status = "PASS" if t["passed"] else "MISS"
    measured = "not measured" if t["measured"] is None else f"{t['measured']:.2f}"
    return (
        f"{status}  {t['target']}: {measured} (target {t['comparison']} {t['bound']:g}); "
        f"{t['detail']}"
    )


# --- plot ------------------------------------------------------------------------------------
def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput against worker count, one panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = results["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.4 * len(workloads), 4.8), squeeze=False)
    for ax, (name, w) in zip(axes[0], workloads.items(), strict=True):
        entries = w["entries"]
        counts = sorted({e["workers"] for e in entries if e["label"] == "pool"})
        for label, style in (("pool", "o-"), ("executor", "s-")):
            points = sorted(
                (e["workers"], e["summary"]["rows_per_second"])
                for e in entries
                if e["label"] == label
            )
            if not points:
                continue
            xs = [n for n, _ in points]
            med = np.array([r["median"] for _, r in points])
            err = [med - [r["min"] for _, r in points], [r["max"] for _, r in points] - med]
            name_shown = "PredictionPool" if label == "pool" else "plain ProcessPoolExecutor"
            ax.errorbar(xs, med, yerr=err, fmt=style, capsize=4, label=name_shown)
        keys = sorted({e["runtime_key"] for e in entries if e["label"] == "runtime_pool"})
        for key in keys:
            points = sorted(
                (e["workers"], _throughput(e))
                for e in entries
                if e["label"] == "runtime_pool" and e["runtime_key"] == key
            )
            shown = f"PredictionPool runtime={key}"
            ax.plot([n for n, _ in points], [r for _, r in points], "^--", label=shown)
        one = _find(entries, "pool", 1)
        if one is not None and counts:
            xs = [0, *counts]
            ax.plot(xs, [n * _throughput(one) for n in xs], "k:", label="ideal linear (pool)")
        for label, style in (("single", "--"), ("single_batch", "-."), ("load_per_call", ":")):
            e = next((e for e in entries if e["label"] == label), None)
            if e is not None:
                text = {
                    "single": f"single process, shards of {w['shard_size']}",
                    "single_batch": "single process, one batch",
                    "load_per_call": "load per call",
                }[label]
                ax.axhline(
                    _throughput(e),
                    linestyle=style,
                    color="grey" if label != "load_per_call" else "red",
                    label=f"{text} ({_throughput(e):.1f})",
                )
        ax.set_xticks(counts or [1])
        ax.set_xlim(0.5, max(counts or [1]) + 0.5)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("worker processes")
        ax.set_ylabel("rows / second")
        ax.set_title(f"{name}: {Path(w['model']).name}, shard size {w['shard_size']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    m = results["machine"]
    fig.suptitle(
        f"{m['cpu_model']}, {m['physical_cores']} physical cores, TensorFlow {m['tensorflow']}",
        fontsize="medium",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
