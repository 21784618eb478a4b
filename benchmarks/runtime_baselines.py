"""The converted runtimes called the plain way, for the runtime configurations of core_scaling.

Used by ``scaling_runner.py`` (kinds ``runtime_single`` and ``runtime_ceiling``) and by
``runtimes.py``. Every runtime loads the artifact that the driver resolved (converted, verified
and cached by ``pool.runtimes.resolve`` before anything is timed) and is called as
``{input name: array} -> {output name: array}``:

- :func:`load`: one model on ``threads`` threads, as a pool worker runs it (OpenVINO: one
  stream, ``PERFORMANCE_HINT=LATENCY``; ONNX Runtime: one session; TensorFlow: ``hub.load``);
- :func:`best_single`: the runtime's own best single-process configuration on every core
  (OpenVINO: ``PERFORMANCE_HINT=THROUGHPUT`` and an ``AsyncInferQueue`` of its optimal number
  of requests; ONNX Runtime: one session with ``intra_op_num_threads`` = cores);
- :func:`ceiling_worker`: one of the N independent processes of the no-IPC ceiling (spawned by
  ``multiprocessing``: a top-level function of an importable module).

Nothing here imports TensorFlow unless the runtime is TensorFlow.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

Inputs = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
Call = Callable[[Inputs], Outputs]

TENSORFLOW = "tensorflow"


def _signature(artifact: str) -> Any:
    from pool.runtimes import signature_from_json
    from pool.runtimes.cache import read_manifest

    return signature_from_json(read_manifest(artifact)["signature"])


def load(runtime: str, model: str, artifact: str | None, threads: int, precision: str) -> Call:
    """``runtime``'s model on ``threads`` threads, as one pool worker runs it."""
    if runtime == TENSORFLOW:
        import baselines

        baselines.set_threads(threads, 1)
        return baselines.load(model)
    if artifact is None:
        raise ValueError(f"{runtime} needs a converted artifact")
    if runtime == "openvino":
        from pool.runtimes.openvino import OpenVINOModel

        return OpenVINOModel(artifact, _signature(artifact), precision, threads)
    if runtime == "onnxruntime":
        from pool.runtimes.onnxruntime import ONNXRuntimeModel

        return ONNXRuntimeModel(artifact, _signature(artifact), threads)
    raise ValueError(f"unknown runtime {runtime!r}")


class BestSingle:
    """The runtime's own best single-process configuration, on ``cores`` cores, called on a
    list of shards (one pass): ``(outputs per shard, in order)``."""

    def __init__(self, runtime: str, artifact: str, cores: int, precision: str) -> None:
        self.runtime = runtime
        self.settings: dict[str, Any] = {"cores": cores}
        if runtime == "openvino":
            import openvino as ov

            self._signature = _signature(artifact)
            core = ov.Core()
            model = core.read_model(os.path.join(artifact, "model.xml"))
            self._compiled = core.compile_model(
                model,
                "CPU",
                {
                    "PERFORMANCE_HINT": "THROUGHPUT",
                    "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                    "INFERENCE_NUM_THREADS": int(cores),
                },
            )
            requests = int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            self._queue = ov.AsyncInferQueue(self._compiled, requests)
            self._outputs = [
                (t.name, self._compiled.output(t.name), t.numpy_dtype)
                for t in self._signature.outputs or ()
            ]
            self._results: dict[int, Outputs] = {}
            self._queue.set_callback(self._done)
            self.settings.update(
                performance_hint="THROUGHPUT",
                infer_requests=requests,
                streams=int(self._compiled.get_property("NUM_STREAMS")),
            )
        elif runtime == "onnxruntime":
            from pool.runtimes.onnxruntime import ONNXRuntimeModel

            self._model = ONNXRuntimeModel(artifact, _signature(artifact), cores)
            self.settings.update(intra_op_threads=cores)
        else:
            raise ValueError(f"no best single-process configuration for {runtime!r}")

    def _done(self, request: Any, index: int) -> None:
        self._results[index] = {
            name: np.array(request.get_tensor(port).data).astype(dtype, copy=False)
            for name, port, dtype in self._outputs
        }

    def __call__(self, shards: list[Inputs]) -> list[Outputs]:
        if self.runtime == "onnxruntime":
            return [self._model(shard) for shard in shards]
        self._results = {}
        for i, shard in enumerate(shards):
            self._queue.start_async(
                {k: np.ascontiguousarray(v) for k, v in shard.items()}, userdata=i
            )
        self._queue.wait_all()
        return [self._results[i] for i in range(len(shards))]


def _own_memory() -> dict[str, int]:
    """This process's peak RSS (the kernel's ``VmHWM``) and its USS now."""
    import psutil

    figures = {"uss_bytes": int(psutil.Process().memory_full_info().uss), "rss_bytes": 0}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                figures["rss_bytes"] = int(line.split()[1]) * 1024
    return figures


def ceiling_worker(spec: dict[str, Any], index: int, barrier: Any, results: Any) -> None:
    """One process of the no-IPC ceiling: pinned to its CPU like a pool worker, it loads the
    model on one thread and its share of the rows from the ``.npy`` files, warms up on one
    pass, waits for the others at ``barrier``, then times ``repeats`` passes over its shards."""
    try:
        started = time.perf_counter()
        cpus = spec.get("cpus")
        if cpus:
            os.sched_setaffinity(0, [cpus[index % len(cpus)]])
        start, stop = spec["share"][index]
        inputs = {
            name: np.load(path, allow_pickle=True)[start:stop]
            for name, path in spec["inputs"].items()
        }
        size = spec["shard_size"]
        shards = [
            {k: v[a : a + size] for k, v in inputs.items()} for a in range(0, stop - start, size)
        ]
        model = load(spec["runtime"], spec["model"], spec.get("artifact"), 1, spec["precision"])
        for shard in shards:  # the warm-up pass
            model(shard)
        ready = time.perf_counter() - started
        barrier.wait(timeout=900)
        seconds, outputs = [], []
        for _ in range(spec["repeats"]):
            t = time.perf_counter()
            outputs = [model(shard) for shard in shards]
            seconds.append(time.perf_counter() - t)
            barrier.wait(timeout=900)  # every pass starts together
        merged = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]} if outputs else {}
        memory = _own_memory()
        results.put((index, {"ready_seconds": ready, "pass_seconds": seconds, **memory}, merged))
    except BaseException as e:  # noqa: BLE001 - reported to the runner, which fails the run
        barrier.abort()
        results.put((index, {"error": f"{type(e).__name__}: {e}"}, {}))
