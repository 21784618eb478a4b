"""One configuration of the core-scaling benchmark, measured in a fresh process of its own.

``core_scaling.py`` starts ``python scaling_runner.py SPEC.json`` once per configuration, so
each one pays its own start-up, has its own TensorFlow thread settings and its own memory, and
the driver stays free of TensorFlow. The spec names the kind, the model, the ``.npy`` file of
inputs (the same file for every configuration) and the sizes; the runner writes the figures to
``SPEC.result.json`` and the outputs of its last timed pass to ``SPEC.outputs.npz``.

Every kind follows the same protocol, so the figures compare:

- start-up: from just before anything is started or loaded (``import tensorflow`` for the
  in-process baselines, the executor or pool constructor for the pools) until the first
  shard's result is in hand, the whole first pass having been submitted at once;
- the rest of that first pass is the warm-up (the pools: until every worker has answered);
- ``repeats`` timed passes over all rows -> rows/s;
- ``latency_requests`` shards sent one at a time to the idle configuration -> latency;
- the RSS and USS of every process of the configuration are measured meanwhile (see
  :class:`PeakMemory`);
- for ``executor`` and ``pool``, this process's CPU seconds over the timed passes
  (``getrusage``: the parent's share of the work, its memory sampler included) and the shards
  they sent; for ``pool`` also its rows and model calls over the timed passes (``stats()``)
  and what its transport reports (``pool_figures.copies_per_shard``).

Kinds: ``describe`` (signature of a model), ``single`` (hub.load once, all cores via intra-op
threads; shards, then one batch of all rows), ``load_per_call`` (hub.load for every request),
``executor`` (plain spawn ``ProcessPoolExecutor`` whose initializer loads the model),
``pool`` (``PredictionPool``), and issue 14's runtime configurations: ``runtime_pool``
(``PredictionPool(runtime=..., precision=...)``, its artifact already in the cache),
``runtime_single`` (a converted runtime's own best single-process configuration on every core)
and ``runtime_ceiling`` (the no-IPC ceiling: N spawned processes, each pinned to one CPU with
its share of the rows in memory, one thread, passes started together at a barrier; see
``runtime_baselines.py``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import baselines
import numpy as np
import pool_figures
import psutil
import runtime_baselines

Inputs = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]


class PeakMemory:
    """Peak memory of this configuration's processes: RSS and USS of each one.

    ``workers()`` names the processes doing inference; every other process of the
    configuration (this driver, a fork server, the resource tracker) is measured too and
    reported apart, so that the whole memory cost of a configuration is visible.

    A background thread reads each process's RSS every ``interval`` seconds (cheap: one read
    of ``/proc/PID/statm``). USS, and the kernel's exact RSS high-water mark (``VmHWM``), are
    read only at :meth:`checkpoint` calls between the phases of a run and on exit: reading USS
    walks the process's page tables (about 20-30 ms of CPU for a 1 GB TensorFlow process,
    mostly in the kernel), so doing it every 0.1 s would itself slow down the timed passes.
    """

    def __init__(self, workers: Callable[[], Iterable[int]], interval: float = 0.1) -> None:
        self._workers = workers
        self._interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._me = psutil.Process()
        self._handles: dict[int, psutil.Process] = {}
        self._roles: dict[int, str] = {}
        self.peaks: dict[int, dict[str, Any]] = {}
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.checkpoint()

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(self._interval):
            self._sample(full=False, discover=tick % 10 == 0)
            tick += 1

    def checkpoint(self) -> None:
        """Read every process's USS and RSS high-water mark now (between timed phases)."""
        self._sample(full=True, discover=True)

    def _sample(self, full: bool, discover: bool) -> None:
        with self._lock:
            try:
                workers = set(self._workers())
            except Exception:  # the pool is not started yet, or already shut down
                workers = set()
            for pid in workers:
                self._roles[pid] = "worker"
            if discover:
                try:
                    others = [self._me, *self._me.children(recursive=True)]
                except psutil.Error:
                    others = [self._me]
                for process in others:
                    if process.pid not in self._roles:
                        try:
                            name = _role(process, self._me)
                        except psutil.Error:
                            continue
                        self._roles[process.pid] = "worker" if process.pid in workers else name
            for pid in list(self._roles):
                try:
                    handle = self._handles.setdefault(pid, psutil.Process(pid))
                    info = handle.memory_full_info() if full else handle.memory_info()
                except psutil.Error:
                    continue
                peak = self.peaks.setdefault(
                    pid, {"role": self._roles[pid], "rss_bytes": 0, "uss_bytes": 0}
                )
                peak["role"] = self._roles[pid]
                peak["rss_bytes"] = max(peak["rss_bytes"], info.rss, _rss_high_water(pid) or 0)
                if full:
                    peak["uss_bytes"] = max(peak["uss_bytes"], info.uss)

    def figures(self) -> dict[str, Any]:
        workers = {p: v for p, v in self.peaks.items() if v["role"] == "worker"}
        rss = [p["rss_bytes"] for p in workers.values()]
        uss = [p["uss_bytes"] for p in workers.values()]
        return {
            "processes": len(workers),
            "peak_rss_bytes_max": max(rss, default=None),
            "peak_uss_bytes_max": max(uss, default=None),
            "peak_rss_bytes_sum": sum(rss) if rss else None,
            "peak_uss_bytes_sum": sum(uss) if uss else None,
            # every process of the configuration, workers included: its whole memory cost
            "all_processes_peak_uss_bytes_sum": sum(p["uss_bytes"] for p in self.peaks.values()),
            "all_processes_peak_rss_bytes_sum": sum(p["rss_bytes"] for p in self.peaks.values()),
            "per_process": {str(pid): peak for pid, peak in sorted(self.peaks.items())},
        }


def _role(process: psutil.Process, me: psutil.Process) -> str:
    if process.pid == me.pid:
        return "driver"
    command = " ".join(process.cmdline())
    for marker, role in (("forkserver", "fork server"), ("resource_tracker", "resource tracker")):
        if marker in command:
            return role
    return command[:80]


def _rss_high_water(pid: int) -> int | None:
    """The kernel's peak RSS of ``pid`` (Linux ``VmHWM``), or None where there is none."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def shard_bounds(rows: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, rows)) for start in range(0, rows, size)]


def take(inputs: Inputs, start: int, stop: int) -> Inputs:
    return {name: array[start:stop] for name, array in inputs.items()}


def concat(parts: list[Outputs]) -> Outputs:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def entry(label: str, **figures: Any) -> dict[str, Any]:
    return {"label": label, **figures}


def log(message: str) -> None:
    print(f"    [{os.getpid()}] {message}", file=sys.stderr, flush=True)


# --- kinds ------------------------------------------------------------------------------------
def run_describe(spec: dict) -> tuple[list[dict], list[Outputs]]:
    baselines.set_threads(None, None)
    path = baselines.resolve(spec["model"])
    return [{"label": "describe", "model": path, **baselines.load(path).describe()}], []


def run_single(spec: dict, inputs: Inputs, shards: list[Inputs]) -> tuple[list, list]:
    """``hub.load`` once in this process, TensorFlow using every core via intra-op threads."""
    own = os.getpid()
    with PeakMemory(lambda: [own]) as memory:
        started = time.perf_counter()
        threads = baselines.set_threads(spec["intra_op_threads"], spec["inter_op_threads"])
        model = baselines.load(spec["model"])
        first = None
        for shard in shards:  # the first pass: start-up, then warm-up
            model(shard)
            first = first or time.perf_counter() - started
        cold = time.perf_counter() - started
        log(f"single: first result after {first:.2f} s")
        memory.checkpoint()
        passes, parts = _timed_passes(lambda: [model(shard) for shard in shards], spec)
        outputs = concat(parts)
        memory.checkpoint()
        latency = _latency(lambda shard: model(shard), shards, spec["latency_requests"])
    shard_entry = entry(
        "single",
        startup_seconds=first,
        first_pass_seconds=cold,
        pass_seconds=passes,
        latency_seconds=latency,
        memory=memory.figures(),
        threads=threads,
    )
    with PeakMemory(lambda: [own]) as memory:  # the same process, one call on every row
        t = time.perf_counter()
        model(inputs)
        warmup = time.perf_counter() - t
        memory.checkpoint()
        passes, batch_outputs = _timed_passes(lambda: model(inputs), spec)
    batch_entry = entry(
        "single_batch",
        startup_seconds=None,  # the same process as "single": its start-up is that one
        first_pass_seconds=warmup,
        pass_seconds=passes,
        latency_seconds=None,  # no shards: one call answers every row
        memory=memory.figures(),
        threads=threads,
    )
    return [shard_entry, batch_entry], [outputs, batch_outputs]


def run_load_per_call(spec: dict, inputs: Inputs, shards: list[Inputs]) -> tuple[list, list]:
    """The anti-pattern: ``hub.load`` then call, for every request (a request = one shard)."""
    own = os.getpid()
    requests = shards[: spec["requests"]]
    with PeakMemory(lambda: [own]) as memory:
        started = time.perf_counter()
        threads = baselines.set_threads(spec["intra_op_threads"], spec["inter_op_threads"])
        seconds, parts, first = [], [], None
        for shard in requests:
            t = time.perf_counter()
            model = baselines.load(spec["model"])
            parts.append(model(shard))
            del model
            seconds.append(time.perf_counter() - t)
            first = first or time.perf_counter() - started
            memory.checkpoint()
            log(f"load_per_call: request {len(seconds)} took {seconds[-1]:.2f} s")
    return [
        entry(
            "load_per_call",
            startup_seconds=first,
            first_pass_seconds=None,
            pass_seconds=seconds,  # one "pass" = one request of one shard
            rows_per_pass=[len(next(iter(s.values()))) for s in requests],
            latency_seconds=seconds,
            memory=memory.figures(),
            threads=threads,
        )
    ], [concat(parts)]


def run_executor(spec: dict, inputs: Inputs, shards: list[Inputs]) -> tuple[list, list]:
    """The standard-library idiom: spawn, an initializer that loads the model, pickled arrays."""
    workers = spec["workers"]
    started = time.perf_counter()
    executor = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=baselines.init_worker,
        initargs=(spec["model"], spec["threads_per_worker"], 1),
    )
    with executor, PeakMemory(lambda: list(getattr(executor, "_processes", None) or {})) as memory:
        futures = [executor.submit(baselines.run_shard, shard) for shard in shards]
        wait_futures(futures, return_when=FIRST_COMPLETED)
        first = time.perf_counter() - started
        answered = {f.result()[0] for f in futures}
        cold = time.perf_counter() - started
        log(f"executor x{workers}: first result after {first:.2f} s")
        if len(answered) < workers:  # some worker had not loaded the model yet: wait for
            deadline = time.monotonic() + 600  # every one, then warm them all up once more
            while len(answered) < workers and time.monotonic() < deadline:
                answered |= set(executor.map(baselines.pid_after, [0.2] * workers))
            for _ in executor.map(baselines.run_shard, shards):
                pass
        memory.checkpoint()
        cpu_before = pool_figures.parent_cpu()
        passes, parts = _timed_passes(
            lambda: [out for _, out in executor.map(baselines.run_shard, shards)], spec
        )
        cpu = pool_figures.cpu_delta(cpu_before, pool_figures.parent_cpu())
        outputs = concat(parts)
        memory.checkpoint()
        latency = _latency(
            lambda shard: executor.submit(baselines.run_shard, shard).result(),
            shards,
            spec["latency_requests"],
        )
    return [
        entry(
            "executor",
            startup_seconds=first,
            first_pass_seconds=cold,
            pass_seconds=passes,
            latency_seconds=latency,
            memory=memory.figures(),
            workers_answered=len(answered),
            threads={"intra_op_threads": spec["threads_per_worker"], "inter_op_threads": 1},
            parent_cpu=cpu,
            timed_shards=len(shards) * len(passes),
        )
    ], [outputs]


def run_pool(spec: dict, inputs: Inputs, shards: list[Inputs]) -> tuple[list, list]:
    """``PredictionPool`` with ``workers`` processes and the same shard size."""
    from pool import PredictionPool

    options: dict[str, Any] = {}
    if spec.get("max_batch_rows") is not None:
        options["max_batch_rows"] = spec["max_batch_rows"]
    runtime = spec.get("runtime")
    if runtime is not None:  # runtime_pool: the artifact is cached already (see core_scaling)
        options.update(runtime=runtime, precision=spec.get("precision", "f32"))
    started = time.perf_counter()
    pool = PredictionPool(
        spec["model"],
        workers=spec["workers"],
        shard_size=spec["shard_size"],
        threads_per_worker=spec["threads_per_worker"],
        start_method=spec.get("start_method"),
        **options,
    )
    try:
        with PeakMemory(pool.worker_pids) as memory:
            pool.start()
            futures = [pool.submit(shard) for shard in shards]
            wait_futures(futures, return_when=FIRST_COMPLETED)
            first = time.perf_counter() - started
            for f in futures:
                f.result()
            cold = time.perf_counter() - started
            log(
                f"pool x{spec['workers']}: ready after {pool.startup_seconds:.2f} s, "
                f"first result after {first:.2f} s"
            )
            memory.checkpoint()
            counts_before = pool_figures.call_counts(pool.stats())
            cpu_before = pool_figures.parent_cpu()
            passes, result = _timed_passes(lambda: pool.predict(inputs), spec)
            cpu = pool_figures.cpu_delta(cpu_before, pool_figures.parent_cpu())
            calls = pool_figures.settled_model_calls(
                pool, counts_before, rows=len(next(iter(inputs.values()))) * len(passes)
            )
            copies = pool_figures.copies_per_shard(pool)
            transport = pool_figures.transport_info(pool)
            outputs = _as_dict(result, pool.signature.single_output)
            memory.checkpoint()
            latency = _latency(pool.predict, shards, spec["latency_requests"])
            stats = [vars(s) for s in pool.stats()]
            ready = [
                {k: v for k, v in vars(r).items() if k != "signature"} for r in pool.ready_info
            ]
            runtime_info = pool.runtime_info()
    finally:
        pool.shutdown()
    return [
        entry(
            "runtime_pool" if runtime is not None else "pool",
            runtime_info=runtime_info,
            startup_seconds=first,
            ready_seconds=pool.startup_seconds,
            first_pass_seconds=cold,
            pass_seconds=passes,
            latency_seconds=latency,
            memory=memory.figures(),
            start_method=pool.start_method,
            worker_stats=stats,
            ready_info=ready,
            threads={"intra_op_threads": spec["threads_per_worker"], "inter_op_threads": 1},
            parent_cpu=cpu,
            timed_shards=len(shards) * len(passes),
            model_calls=calls,
            copies_per_shard=copies,
            transport_info=transport,
        )
    ], [outputs]


def _as_dict(result: Any, single_output: str | None) -> Outputs:
    return dict(result) if isinstance(result, dict) else {single_output or "output_0": result}


def _timed_passes(run_pass: Callable[[], Any], spec: dict[str, Any]) -> tuple[list[float], Any]:
    """Time ``spec["repeats"]`` calls of ``run_pass``: the seconds of each, and the last result."""
    passes, result = [], None
    for _ in range(spec["repeats"]):
        started = time.perf_counter()
        result = run_pass()
        passes.append(time.perf_counter() - started)
    return passes, result


def _latency(call: Callable[[Inputs], Any], shards: list[Inputs], requests: int) -> list[float]:
    """Seconds for each of ``requests`` shards sent one at a time (each waits for the last)."""
    seconds = []
    for shard in shards[: max(0, requests)]:
        t = time.perf_counter()
        call(shard)
        seconds.append(time.perf_counter() - t)
    return seconds


def run_runtime_single(spec: dict, inputs: Inputs, shards: list[Inputs]) -> tuple[list, list]:
    """A converted runtime's own best single-process configuration on every core."""
    own = os.getpid()
    with PeakMemory(lambda: [own]) as memory:
        started = time.perf_counter()
        model = runtime_baselines.BestSingle(
            spec["runtime"], spec["artifact"], spec["cores"], spec.get("precision", "f32")
        )
        model(shards[:1])
        first = time.perf_counter() - started
        model(shards)  # the warm-up pass
        cold = time.perf_counter() - started
        log(f"{spec['runtime']} best single process: first result after {first:.2f} s")
        memory.checkpoint()
        passes, parts = _timed_passes(lambda: model(shards), spec)
        outputs = concat(parts)
        memory.checkpoint()
        latency = _latency(lambda shard: model([shard]), shards, spec["latency_requests"])
    return [
        entry(
            "runtime_single",
            startup_seconds=first,
            first_pass_seconds=cold,
            pass_seconds=passes,
            latency_seconds=latency,
            memory=memory.figures(),
            threads={"intra_op_threads": spec["cores"], **model.settings},
        )
    ], [outputs]


def run_runtime_ceiling(spec: dict, inputs: Inputs, shards: list[Inputs]) -> tuple[list, list]:
    """The no-IPC ceiling: ``workers`` independent processes (spawn), each pinned to one CPU
    with its share of the rows in memory, calling the runtime on one thread on shards of the
    pool's size; all start each pass together; a pass takes as long as the slowest one."""
    workers = spec["workers"]
    rows = len(next(iter(inputs.values())))
    per = -(-rows // workers)
    per = -(-per // spec["shard_size"]) * spec["shard_size"]  # whole shards, like the pool's
    share = [(min(i * per, rows), min((i + 1) * per, rows)) for i in range(workers)]
    allowed = sorted(psutil.Process().cpu_affinity()) if hasattr(os, "sched_setaffinity") else []
    child = {
        **{k: spec.get(k) for k in ("runtime", "model", "artifact", "shard_size", "repeats")},
        "precision": spec.get("precision", "f32"),
        "inputs": spec["inputs"],
        "share": share,
        "cpus": allowed,
    }
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    queue = ctx.Queue()
    started = time.perf_counter()
    processes = [
        # daemons: a ceiling process that hangs is killed when this runner exits
        ctx.Process(
            target=runtime_baselines.ceiling_worker, args=(child, i, barrier, queue), daemon=True
        )
        for i in range(workers)
    ]
    for p in processes:
        p.start()
    with PeakMemory(lambda: [p.pid for p in processes if p.pid is not None]) as memory:
        got = [queue.get(timeout=1800) for _ in processes]
        for p in processes:
            p.join(timeout=60)
    got.sort(key=lambda g: g[0])
    errors = [g[1]["error"] for g in got if "error" in g[1]]
    if errors:
        raise RuntimeError(f"a ceiling process failed: {errors[0]}")
    figures = [g[1] for g in got]
    # every pass started together: its time is the slowest process's
    passes = [max(f["pass_seconds"][i] for f in figures) for i in range(spec["repeats"])]
    ready = max(f["ready_seconds"] for f in figures)
    log(f"{spec['runtime']} ceiling x{workers}: ready after {ready:.2f} s")
    outputs = concat([g[2] for g in got if g[2]])
    figures_of_memory = memory.figures()
    rss = [
        max(f["rss_bytes"], _peak(memory, p.pid, "rss_bytes"))
        for f, p in zip(figures, processes, strict=True)
    ]
    uss = [f["uss_bytes"] for f in figures]  # read by each process after its passes
    figures_of_memory.update(
        processes=workers,
        peak_rss_bytes_max=max(rss),
        peak_uss_bytes_max=max(uss),
        peak_rss_bytes_sum=sum(rss),
        peak_uss_bytes_sum=sum(uss),
        all_processes_peak_uss_bytes_sum=sum(uss)
        + sum(v["uss_bytes"] for v in memory.peaks.values() if v["role"] != "worker"),
    )
    return [
        entry(
            "runtime_ceiling",
            startup_seconds=ready,  # to the end of the slowest process's warm-up pass
            first_pass_seconds=time.perf_counter() - started,
            pass_seconds=passes,
            latency_seconds=None,
            memory=figures_of_memory,
            threads={"intra_op_threads": 1, "inter_op_threads": 1},
            process_pass_seconds=[f["pass_seconds"] for f in figures],
            rows_per_process=[b - a for a, b in share],
        )
    ], [outputs]


def _peak(memory: PeakMemory, pid: int | None, key: str) -> int:
    return int(memory.peaks.get(pid or -1, {}).get(key) or 0)


KINDS = {
    "runtime_pool": run_pool,
    "runtime_single": run_runtime_single,
    "runtime_ceiling": run_runtime_ceiling,
    "single": run_single,
    "load_per_call": run_load_per_call,
    "executor": run_executor,
    "pool": run_pool,
}


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    if spec["kind"] == "describe":
        entries, outputs = run_describe(spec)
    else:
        inputs = {name: np.load(path, allow_pickle=True) for name, path in spec["inputs"].items()}
        rows = len(next(iter(inputs.values())))
        shards = [take(inputs, a, b) for a, b in shard_bounds(rows, spec["shard_size"])]
        entries, outputs = KINDS[spec["kind"]](spec, inputs, shards)
    arrays = {f"{i}/{name}": a for i, out in enumerate(outputs) for name, a in out.items()}
    np.savez(spec["outputs_path"], **arrays)
    with open(spec["result_path"], "w") as f:
        json.dump({"pid": os.getpid(), "entries": entries}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
