"""How batches travel: the socket framing, the shared arena, its fallback and its growth."""

from __future__ import annotations

import errno
import multiprocessing
import os
import threading

import numpy as np
import pytest
from conftest import assert_rows_equal, in_process, shm_segments

from pool import PredictionPool, transport
from pool.messages import ArenaRef

RNG = np.random.default_rng(5)


def images(n: int) -> np.ndarray:
    return RNG.random((n, 32, 32, 3), dtype=np.float32)


# --- the pieces ---------------------------------------------------------------------------
def test_socket_framing_carries_large_arrays_out_of_band_and_writable():
    left, right = multiprocessing.Pipe(duplex=True)
    message = {"a": RNG.random((300, 1000)), "s": np.array(["x", "é", ""], dtype=object), "n": 3}
    sender = threading.Thread(target=transport.send, args=(left, message))
    sender.start()  # 2.4 MB: more than the socket holds, so someone must read meanwhile
    got = transport.recv(right)
    sender.join()
    np.testing.assert_array_equal(got["a"], message["a"])
    assert got["a"].flags.writeable and list(got["s"]) == ["x", "é", ""] and got["n"] == 3
    left.close()
    with pytest.raises(EOFError):
        transport.recv(right)


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd_create is Linux-only")
def test_arena_places_arrays_aligned_and_refuses_what_does_not_fit():
    arena = transport.create(1 << 20)
    assert arena is not None
    start, end = arena.region(1)
    parts = [RNG.random((3, 5)).astype(np.float32), RNG.random((2, 5)).astype(np.float32)]
    ref, next_start = arena.put(parts, start + 1, end)
    assert isinstance(ref, ArenaRef) and ref.offset % transport.ALIGN == 0
    view = arena.view(ref)
    np.testing.assert_array_equal(view, np.concatenate(parts))
    assert view.ctypes.data % 64 == 0  # TensorFlow wraps it without a copy
    assert next_start == ref.offset + view.nbytes
    del view
    assert arena.put([np.zeros((1 << 20,), np.uint8)], start, end) is None
    arena.close()


def test_no_shared_memory_means_the_socket_and_no_leftover(monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert transport.create(1 << 20) is None


# --- on real workers ------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd_create is Linux-only")
def test_workers_share_an_unnamed_arena_and_dev_shm_stays_empty(models):
    before = shm_segments()
    x = images(40)
    with PredictionPool(models["small_cnn"], workers=2) as pool:
        got = pool.predict(x)
        info = pool.transport_info()
        for pid in pool.worker_pids():
            with open(f"/proc/{pid}/maps") as maps:
                assert "memfd:pool-arena" in maps.read()
        assert shm_segments() == before  # nothing named, nothing to leak
    assert info["batches_in_arena"] > 0 and info["batches_on_socket"] == 0
    assert info["copies_per_shard"] == 3
    assert all(size > 0 for size in info["arena_bytes"])
    assert_rows_equal(got, in_process(models["small_cnn"], x)["probabilities"])


def test_fallback_to_the_socket_when_shared_memory_cannot_be_reserved(models, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)  # the parent reserves every arena
    inputs = [images(n) for n in (1, 3, 64, 1, 2, 100, 1)]  # 64+ rows: >64 KiB messages
    with PredictionPool(models["small_cnn"], workers=2) as pool:
        futures = [pool.submit(x, shard_size=len(x)) for x in inputs]
        results = [f.result(timeout=60) for f in futures]
        info = pool.transport_info()
    assert info["arena_bytes"] == [0, 0] and info["batches_in_arena"] == 0
    assert info["batches_on_socket"] > 0 and info["copies_per_shard"] == 6
    for x, got in zip(inputs, results, strict=True):
        assert_rows_equal(got, in_process(models["small_cnn"], x)["probabilities"])


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd_create is Linux-only")
def test_arena_grows_for_a_shard_larger_than_its_region(models):
    x = images(1200)  # 14 MiB in one shard: more than the default region
    with PredictionPool(models["small_cnn"], workers=1, max_batch_bytes=1 << 20) as pool:
        small = pool.transport_info()["arena_bytes"][0]
        got = pool.predict(x, shard_size=len(x))
        info = pool.transport_info()
    assert info["arena_bytes"][0] > small and info["batches_on_socket"] == 0
    assert_rows_equal(got, in_process(models["small_cnn"], x)["probabilities"])
