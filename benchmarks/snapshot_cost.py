"""What the input snapshot costs (docs/design.md, "What the input snapshot costs").

``sharding.prepare`` as every call runs it (the inputs copied when the call is accepted)
against ``prepare(snapshot=False)``, in one process, interleaved rounds, medians; then 16
threads preparing one-row inputs at once (the concurrent one-row request path). NumPy only:
no pool, no worker, no TensorFlow.

    python benchmarks/snapshot_cost.py
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import numpy as np

from pool import sharding
from pool.messages import SignatureInfo, TensorInfo

ROUNDS = 11


def image_signature(side: int) -> SignatureInfo:
    return SignatureInfo(
        inputs=(TensorInfo("images", "float32", (None, side, side, 3)),),
        outputs=(TensorInfo("probabilities", "float32", (None, 10)),),
        single_output="probabilities",
    )


def seconds_per_call(fn: Callable[[], object], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n


def interleaved(x: np.ndarray, signature: SignatureInfo, n: int) -> tuple[float, float]:
    """Median seconds per ``prepare`` call with and without the snapshot, rounds interleaved
    (the machine may be shared: both see the same load)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(ROUNDS):
        times[0].append(seconds_per_call(lambda: sharding.prepare(x, signature), n))
        times[1].append(seconds_per_call(lambda: sharding.prepare(x, signature, snapshot=False), n))
    return statistics.median(times[0]), statistics.median(times[1])


def threaded(x: np.ndarray, signature: SignatureInfo, snapshot: bool, threads: int = 16) -> float:
    """Wall seconds per call with ``threads`` threads calling ``prepare`` at once."""
    calls = 5000

    def work() -> None:
        for _ in range(calls):
            sharding.prepare(x, signature, snapshot=snapshot)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    started = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return (time.perf_counter() - started) / (threads * calls)


def main() -> None:
    rng = np.random.default_rng(0)
    print("| input | MB | prepare, snapshot | prepare, no snapshot | snapshot cost | per MB |")
    print("|---|---|---|---|---|---|")
    for rows, side, dtype in [
        (1, 32, np.float32),
        (1, 224, np.float32),
        (8, 224, np.float32),
        (32, 224, np.float32),
        (32, 224, np.float64),
    ]:
        signature = image_signature(side)
        x = rng.random((rows, side, side, 3)).astype(dtype)
        mb = x.nbytes / 1e6
        n = 20000 if mb < 0.1 else max(10, int(400 / mb))
        with_copy, without = interleaved(x, signature, n)
        cost = with_copy - without
        print(
            f"| {rows} × {side}×{side}×3 {x.dtype.name} | {mb:.3f} | {with_copy * 1e6:.1f} µs | "
            f"{without * 1e6:.1f} µs | {cost * 1e6:.1f} µs | {cost * 1e6 / mb:.1f} µs |"
        )
    x = rng.random((1, 32, 32, 3), dtype=np.float32)
    signature = image_signature(32)
    for snapshot in (True, False, True, False, True, False):  # interleaved
        per_call = threaded(x, signature, snapshot)
        print(
            f"16 threads, one row 32×32×3 float32, snapshot={snapshot}: "
            f"{per_call * 1e6:.2f} µs of wall time per call"
        )


if __name__ == "__main__":
    main()
