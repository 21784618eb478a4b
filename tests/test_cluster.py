"""PredictionPool on a real Dask LocalCluster (issue 9): the same answers, in order, as the
model called in-process; one load per Dask worker; nothing lost when a worker dies.

One module-scoped LocalCluster (2 worker processes, 1 thread each, Nanny-managed). Its
scheduler runs with ``allowed-failures: 1`` so that Dask gives up on a worker-killing shard
after 2 deaths instead of 4 (each death restarts a worker and reloads every registered model;
the pool's behaviour does not depend on the value, docs/scale-out.md). The first model loaded
in a worker process sizes TensorFlow's thread pools, so the thread-settings test comes first.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import cluster_factories
import dask
import dask.dataframe as dd
import distributed
import factories
import numpy as np
import pandas as pd
import pytest
import row_factories
from conftest import assert_rows_equal, in_process

from pool import (
    ModelLoadError,
    PredictionPool,
    QueueFullError,
    WorkerCrashedError,
    WorkerError,
    etl,
)
from pool import cluster as pool_cluster
from pool.cluster.backend import COPY_SUFFIX

pytestmark = pytest.mark.timeout(240)

TESTS = Path(__file__).parent
RNG = np.random.default_rng(9)


@pytest.fixture(scope="module")
def cluster():
    with cluster_factories.local_cluster(
        **{"distributed.scheduler.allowed-failures": 1}
    ) as started:
        yield started


@pytest.fixture(scope="module")
def client(cluster):
    return cluster[1]


@pytest.fixture(scope="module")
def faulty_pool(client):
    """Identity on float rows with fault markers (tests/factories.py); 50 ms per model call,
    which carries at most two shards (8 rows)."""
    model = functools.partial(factories.faulty, delay=0.05)
    with PredictionPool(
        model, cluster=client, shard_size=4, max_retries=0, max_batch_rows=8
    ) as pool:
        yield pool


@pytest.fixture(scope="module")
def cnn_pool(client, models):
    with PredictionPool(
        models["small_cnn"], cluster=client, shard_size=4, threads_per_worker=2
    ) as pool:
        yield pool


@pytest.fixture(scope="module")
def text_pool(client, models):
    with PredictionPool(models["text_embedding"], cluster=client, shard_size=64) as pool:
        yield pool


def rows(n: int, width: int = 3) -> np.ndarray:
    return RNG.random((n, width)).astype(np.float32)


def texts(n: int) -> list[str]:
    return [f"row {i} the quick brown fox {i % 97} jumps over {i % 13} dogs" for i in range(n)]


def images(n: int) -> np.ndarray:
    return RNG.random((n, 32, 32, 3), dtype=np.float32)


def wait_until(condition, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.2)


def loads(pool: PredictionPool) -> int:
    return sum(s.loads for s in pool.stats())


def pids(client) -> set[int]:
    """The Dask workers' pids (a worker exiting at that moment is left out)."""
    answers = client.run(os.getpid, on_error="return")
    return {pid for pid in answers.values() if isinstance(pid, int)}


def all_loaded(pool: PredictionPool) -> bool:
    stats = pool.stats()
    return len(stats) == 2 and all(s.load_seconds > 0 for s in stats)


def kill_one_worker(client) -> int:
    pid = sorted(client.run(os.getpid).values())[0]
    os.kill(pid, signal.SIGKILL)
    return pid


def healed(client, pool: PredictionPool, loads_before: int) -> None:
    """Both Dask workers are back and the replaced one loaded the model again, once."""
    client.wait_for_workers(2, timeout=120)
    wait_until(
        lambda: all_loaded(pool) and loads(pool) >= loads_before + 1, 120, "the replacement's load"
    )
    assert loads(pool) == loads_before + 1, pool.stats()
    assert len(pool.stats()) == 2


def test_lost_worker_timeout_is_in_force_on_the_clusters_event_loop(cluster):
    """The setting must be read where SpecCluster reads it: on the cluster's loop, when a worker
    is removed (not only while the cluster was created)."""
    local, _ = cluster

    async def read():
        return dask.config.get("distributed.deploy.lost-worker-timeout")

    seen = local.sync(read)
    assert dask.utils.parse_timedelta(seen) >= 3600, seen


# --- a real model, loaded first in fresh workers (TensorFlow's threads are per process) -----------


def test_predict_imap_submit_equal_the_model_in_process_in_order(cnn_pool, models):
    x = images(37)
    want = in_process(models["small_cnn"], x)["probabilities"]
    assert_rows_equal(cnn_pool.predict(x), want)
    batches = [x[:5], x[5:6], x[6:30], x[30:]]
    got = list(cnn_pool.imap(iter(batches), max_in_flight=3))
    assert [len(g) for g in got] == [5, 1, 24, 7]
    assert_rows_equal(np.concatenate(got), want)
    futures = [cnn_pool.submit(x[i : i + 9]) for i in range(0, 37, 9)]
    assert_rows_equal(np.concatenate([f.result(timeout=60) for f in futures]), want)
    assert cnn_pool.predict(x[:0]).shape == (0, 10)


def test_one_load_per_dask_worker_with_its_thread_settings(cnn_pool, client):
    for _ in range(3):
        cnn_pool.predict(images(16))
    stats = cnn_pool.stats()
    dask_pids = sorted(pids(client))
    assert sorted(s.pid for s in stats) == dask_pids
    assert [s.loads for s in stats] == [1, 1] and [s.restarts for s in stats] == [0, 0]
    assert sum(s.rows for s in stats) >= 48 and all(s.load_seconds > 0 for s in stats)
    # The Nanny sets OMP_NUM_THREADS=1; the pool's thread settings reached TensorFlow anyway.
    assert set(client.run(lambda: os.environ.get("OMP_NUM_THREADS")).values()) == {"1"}
    assert [r.intra_op_threads for r in cnn_pool.ready_info] == [2, 2]
    assert cnn_pool.worker_pids() == dask_pids


def test_bad_input_is_refused_in_the_client(cnn_pool):
    with pytest.raises(ValueError, match="images"):
        cnn_pool.predict(np.zeros((2, 31, 32, 3), np.float32))


# --- faults ---------------------------------------------------------------------------------------


def test_a_poison_shard_fails_alone_with_its_rows(faulty_pool, client):
    """Rows 4:8 kill every worker that runs them: Dask gives up (KilledWorker) after its
    allowed failures, the pool re-runs them as a suspect, which fails after max_retries=0
    deaths while running; every other call, submitted at the same time, is answered."""
    poison = rows(12)
    poison[7, 0] = factories.KILL
    healthy = [rows(8) for _ in range(6)]
    futures = [faulty_pool.submit(x) for x in healthy[:3]]
    poisoned = faulty_pool.submit(poison)
    futures += [faulty_pool.submit(x) for x in healthy[3:]]
    with pytest.raises(WorkerCrashedError, match=r"rows 4:8 killed their Dask worker 1 time"):
        poisoned.result(timeout=180)
    for x, future in zip(healthy, futures, strict=True):
        np.testing.assert_array_equal(future.result(timeout=120)["y"], x)
    client.wait_for_workers(2, timeout=120)
    after = rows(9)
    np.testing.assert_array_equal(faulty_pool.predict(after)["y"], after)
    assert max(s.restarts for s in faulty_pool.stats()) >= 1


def test_a_hanging_shard_times_out_with_its_rows_and_the_worker_is_restarted(client):
    before = pids(client)
    hang = rows(8)
    hang[5, 0] = factories.HANG
    others = [rows(8) for _ in range(4)]
    model = functools.partial(factories.faulty, delay=0.05)
    # 10 s: a generous bound for the healthy shards on a loaded 2-core machine
    with PredictionPool(model, cluster=client, shard_size=4, max_retries=0, timeout=10) as pool:
        hanging = pool.submit(hang)
        futures = [pool.submit(x) for x in others]
        with pytest.raises(TimeoutError, match=r"rows 4:8 ran past the timeout of 10 s on 1 Dask"):
            hanging.result(timeout=120)
        for x, future in zip(others, futures, strict=True):
            np.testing.assert_array_equal(future.result(timeout=120)["y"], x)
        client.wait_for_workers(2, timeout=120)
        wait_until(
            lambda: len(pids(client) - before) == 1,
            120,
            "the restart of the timed-out worker",
        )
        np.testing.assert_array_equal(pool.predict(others[0])["y"], others[0])


def scattered_copies(client, pool: PredictionPool) -> dict[str, int]:
    """How many of the pool's scattered parcels each Dask worker holds now."""
    tag = pool.backend._tag
    held: dict[str, int] = {}
    for key, where in client.who_has().items():
        if str(key).startswith(tag) and str(key).endswith(COPY_SUFFIX):
            for address in where:
                held[address] = held.get(address, 0) + 1
    return held


def test_sigkill_of_a_worker_holding_scattered_shards_loses_no_row(faulty_pool, client):
    """The shards reach the workers scattered (not in the task graph), so a killed worker takes
    its copies with it: the client still holds every shard and sends the lost ones again."""
    client.wait_for_workers(2, timeout=120)
    wait_until(lambda: all_loaded(faulty_pool), 120, "both workers loaded")
    loads_before = loads(faulty_pool)
    shards_before = sum(s.shards for s in faulty_pool.stats())
    x = rows(240)  # 60 shards, 30 model calls of 50 ms
    future = faulty_pool.submit(x)
    wait_until(lambda: sum(s.shards for s in faulty_pool.stats()) >= shards_before + 4)
    held = scattered_copies(client, faulty_pool)
    victim = max(held, key=lambda a: held[a])
    assert held[victim] >= 1 and not future.done()
    os.kill(client.run(os.getpid)[victim], signal.SIGKILL)
    np.testing.assert_array_equal(future.result(timeout=120)["y"], x)  # the model: identity
    healed(client, faulty_pool, loads_before)


def test_sigkill_mid_imap_loses_no_row_and_the_cluster_heals(faulty_pool, client):
    wait_until(lambda: all_loaded(faulty_pool), 120, "both workers loaded")
    loads_before = loads(faulty_pool)
    batches = [rows(8) for _ in range(40)]
    out = []
    for i, result in enumerate(faulty_pool.imap(iter(batches), max_in_flight=6)):
        out.append(result["y"])
        if i == 3:
            kill_one_worker(client)
    np.testing.assert_array_equal(np.concatenate(out), np.concatenate(batches))
    healed(client, faulty_pool, loads_before)


def test_a_call_of_many_parcels_is_answered_with_its_own_rows(client):
    """40 parcels in a fresh pool's first call: no task's Dask key may equal a scattered copy's
    (a task keyed like a live copy is answered with the copy: the inputs came back as the
    answer, seen on the text workload of benchmarks/cluster.py)."""
    x = np.arange(640, dtype=np.float32).reshape(320, 2)
    model = functools.partial(factories.faulty, delay=0.0)
    with PredictionPool(model, cluster=client, shard_size=4, max_batch_rows=8) as pool:
        assert_rows_equal(pool.predict(x)["y"], x)


def test_shards_on_a_worker_share_model_calls_and_a_bad_one_fails_alone(faulty_pool, client):
    """Shards that reach a Dask worker together are combined (max_batch_rows=8: two shards of
    4 per call); a combined call that raises is re-run shard by shard, so only the shard with
    the bad row fails, with its rows, and its neighbour in the same call is answered."""
    client.wait_for_workers(2, timeout=120)
    wait_until(lambda: all_loaded(faulty_pool), 120, "both workers loaded")
    before = faulty_pool.stats()
    bad, healthy = rows(16), rows(16)  # 4 shards each: 2 parcels of 2 shards each
    bad[5, 0] = factories.RAISE
    failing, answered = faulty_pool.submit(bad), faulty_pool.submit(healthy)
    with pytest.raises(
        WorkerError, match=r"rows 4:8: the model raised ValueError: bad rows: \[1\]"
    ):
        failing.result(timeout=120)
    np.testing.assert_array_equal(answered.result(timeout=120)["y"], healthy)
    after = faulty_pool.stats()
    assert [s.pid for s in after] == [s.pid for s in before]  # nothing restarted
    delta = {
        name: sum(getattr(a, name) - getattr(b, name) for a, b in zip(after, before, strict=True))
        for name in ("shards", "batches", "rows")
    }
    # healthy: 2 calls of 8 rows; bad: 0:8 failed combined, then 0:4 alone answered, 4:8 alone
    # failed; 8:16 in one call. Failed calls are not counted.
    assert delta == {"shards": 7, "batches": 4, "rows": 28}, delta


def test_a_large_job_keeps_its_data_out_of_the_task_graph(client, caplog):
    """48 MB of inputs: the scheduler is given task specs of a few hundred bytes (the data is
    scattered straight to the workers), and Dask never warns of a large graph."""
    client.register_plugin(cluster_factories.GraphSizes())
    x = RNG.random((12_000, 1000), dtype=np.float32)
    try:
        with (
            PredictionPool(factories.plain_double, cluster=client, shard_size=500) as pool,
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            np.testing.assert_array_equal(pool.predict(x), x * 2)
        sizes = client.run_on_scheduler(cluster_factories.graph_sizes)  # only the pool's tasks
    finally:
        client.unregister_scheduler_plugin(cluster_factories.GraphSizes.name)
    assert sizes and max(sizes.values()) < 1024, sizes
    assert not [w for w in caught if "large graph" in str(w.message).lower()]
    assert "large graph" not in caplog.text.lower()


def test_imap_over_an_endless_generator_stays_flat(faulty_pool):
    """imap holds at most max_in_flight shards (here one per batch) ahead of what it yields."""
    produced = [0]

    def endless():
        while True:
            produced[0] += 1
            yield np.full((4, 3), produced[0], dtype=np.float32)

    for consumed, result in enumerate(faulty_pool.imap(endless(), max_in_flight=5), start=1):
        assert result["y"][0, 0] == consumed  # in order
        assert produced[0] - consumed <= 5
        if consumed == 60:
            break


def test_max_queued_requests_refuses_calls_at_once(client):
    model = functools.partial(factories.faulty, delay=0.3)
    with PredictionPool(model, cluster=client, shard_size=2, max_queued_requests=2) as pool:
        first, second = pool.submit(rows(4)), pool.submit(rows(4))
        assert pool.queued_requests() == 2
        with pytest.raises(QueueFullError, match=r"max_queued_requests=2"):
            pool.submit(rows(4))
        for future in (first, second):
            future.result(timeout=60)
        wait_until(lambda: pool.queued_requests() == 0, 10)
        x = rows(4)
        np.testing.assert_array_equal(pool.predict(x)["y"], x)


def test_wrong_row_count_on_the_cluster_is_a_worker_error(client):
    """Checked on the Dask worker, as the local dispatcher checks it: the caller gets a
    WorkerError naming the model and both counts, never rows shifted onto other inputs."""
    model = functools.partial(row_factories.short_on_marker, delay=0.3)
    with PredictionPool(model, cluster=client, shard_size=2, max_retries=0) as pool:
        x = rows(6)
        x[3, 0] = row_factories.SHORT
        with pytest.raises(
            WorkerError,
            match=r"rows 2:4: the factory functools.partial\(row_factories.short_on_marker\) "
            r"returned 1 rows of output 'y' for 2 input rows",
        ):
            pool.predict(x)
        good = rows(4)
        np.testing.assert_array_equal(pool.predict(good)["y"], good)


def test_a_done_callback_on_the_cluster_may_call_the_pool(client):
    """Callbacks run on the callback thread, not on the gatherer that completes the futures:
    one that calls predict() would otherwise wait for the thread it blocks."""
    model = functools.partial(row_factories.short_on_marker, delay=0.3)
    with PredictionPool(model, cluster=client, shard_size=2) as pool:
        seen = []
        again = rows(2)
        future = pool.submit(rows(2))
        future.add_done_callback(
            lambda f: seen.append((threading.current_thread().name, pool.predict(again)["y"]))
        )
        future.result(timeout=60)
        wait_until(lambda: seen, 60, "the callback")
        name, answer = seen[0]
        assert name == "pool-callbacks"
        np.testing.assert_array_equal(answer, again)


# --- data frames, files, the address form, the client's imports -------------------------


def test_map_batches_on_the_cluster(text_pool, models):
    strings = texts(700)
    frames = [
        pd.DataFrame({"id": range(a, b), "text": strings[a:b]}) for a, b in ((0, 300), (300, 700))
    ]
    out = pd.concat(etl.map_batches(text_pool, iter(frames)))
    assert out["id"].tolist() == list(range(700))
    want = in_process(models["text_embedding"], np.asarray(strings, dtype=object))["embedding"]
    assert_rows_equal(np.stack(list(out["embedding"])), want)


def test_dask_dataframe_helper(text_pool, client, models):
    strings = texts(500)
    frame = pd.DataFrame({"id": np.arange(500), "text": strings})
    ddf = dd.from_pandas(frame, npartitions=4)
    lazy = pool_cluster.map_partitions(ddf, text_pool, columns="text", output_column="vector")
    assert list(lazy.columns) == ["id", "text", "vector"]
    assert lazy.dtypes["vector"] == np.dtype(object)
    out = client.compute(lazy).result(timeout=120)
    assert out["id"].tolist() == list(range(500))
    want = in_process(models["text_embedding"], np.asarray(strings, dtype=object))["embedding"]
    assert_rows_equal(np.stack(list(out["vector"])), want)
    local = PredictionPool(factories.plain_double, workers=1)
    with pytest.raises(TypeError, match="running PredictionPool on a Dask cluster"):
        pool_cluster.map_partitions(ddf, local, columns="text")


def test_dask_dataframe_helper_several_inputs_and_outputs(client, models):
    a = RNG.normal(size=(90, 4)).astype(np.float32)
    b = RNG.integers(0, 9, size=(90, 3)).astype(np.int32)
    frame = pd.DataFrame({"a": list(a), "b": list(b)})
    with dask.config.set({"dataframe.convert-string": False}):  # keep the arrays, not their str
        ddf = dd.from_pandas(frame, npartitions=3)
    with PredictionPool(models["multi_io"], cluster=client) as pool:
        lazy = pool_cluster.map_partitions(ddf, pool, output_column={"sum": "total"})
        assert list(lazy.columns) == ["a", "b", "logits", "total"]
        out = client.compute(lazy).result(timeout=120)
    want = in_process(models["multi_io"], {"a": a, "b": b})
    assert out["total"].dtype == np.float32  # [N, 1]: a number column
    assert_rows_equal(out["total"].to_numpy()[:, None], want["sum"])
    assert_rows_equal(np.stack(list(out["logits"])), want["logits"])


def test_a_slow_load_does_not_stall_the_cluster(client):
    """The load runs in a thread: while it sleeps, the worker answers the scheduler, runs other
    tasks, and keeps sending heartbeats."""
    pool = PredictionPool(functools.partial(cluster_factories.slow_double, 8.0), cluster=client)
    starter = threading.Thread(target=pool.start)
    starter.start()
    time.sleep(2.0)
    assert starter.is_alive(), "the 8 s load should still be running"
    started = time.monotonic()
    assert client.submit(sum, [1, 2], pure=False).result(timeout=10) == 3
    assert sorted(client.run(lambda: 1).values()) == [1, 1]
    assert time.monotonic() - started < 5
    seen = {a: w["last_seen"] for a, w in client.scheduler_info()["workers"].items()}
    time.sleep(2.5)
    now = {a: w["last_seen"] for a, w in client.scheduler_info()["workers"].items()}
    assert all(now[a] > seen[a] for a in seen), "heartbeats stopped during the load"
    assert starter.is_alive()
    starter.join(timeout=120)
    with pool:
        x = rows(6)
        np.testing.assert_array_equal(pool.predict(x), x * 2)


def test_a_failed_load_names_the_workers_reason_and_unregisters(client):
    before = client.run(lambda dask_worker: sorted(dask_worker.plugins))
    pool = PredictionPool("/nowhere/on/the/workers", cluster=client)
    with pytest.raises(ModelLoadError, match=r"could not load the model.*not found"):
        pool.start()
    assert client.run(lambda dask_worker: sorted(dask_worker.plugins)) == before


def test_waiting_for_more_workers_than_join_fails_at_start_timeout(client):
    pool = PredictionPool(factories.plain_double, cluster=client, workers=3, start_timeout=1)
    with pytest.raises(ModelLoadError, match=r"fewer than 3 Dask worker\(s\) joined"):
        pool.start()


@pytest.mark.parametrize(
    "option, instead",
    [
        ({"max_worker_memory": 1 << 30}, "memory_limit"),
        ({"max_shards_per_worker": 100}, "lifetime"),
        ({"start_method": "spawn"}, "multiprocessing-method"),
    ],
)
def test_local_only_options_are_refused_with_what_to_use_instead(client, option, instead):
    pool = PredictionPool(factories.plain_double, cluster=client, **option)
    name = next(iter(option))
    with pytest.raises(ValueError, match=rf"{name}=.* does not apply with cluster=: .*{instead}"):
        pool.start()


def test_scheduler_address_form_and_shutdown_unregisters(cluster, client, models):
    local, _ = cluster
    before = client.run(lambda dask_worker: sorted(dask_worker.plugins))
    x = images(10)
    with PredictionPool(models["small_cnn"], cluster=local.scheduler_address) as pool:
        assert_rows_equal(pool.predict(x), in_process(models["small_cnn"], x)["probabilities"])
        during = client.run(lambda dask_worker: sorted(dask_worker.plugins))
        own = pool.backend
        assert isinstance(own, pool_cluster.DaskBackend) and own.client is not client
        added = {n for names in during.values() for n in names} - {
            n for names in before.values() for n in names
        }
        assert added == {own.name}
    assert own.client.status == "closed"  # the pool's own client, to an address
    assert client.status == "running"  # a Client passed in is never closed
    after = client.run(lambda dask_worker: sorted(dask_worker.plugins))
    assert after == before
    assert [s.rss_bytes for s in pool.stats()] == [0, 0]  # final stats stay readable


def test_cli_predict_with_cluster(cluster, models, tmp_path):
    local, _ = cluster
    strings = texts(300)
    pd.DataFrame({"id": range(300), "text": strings}).to_parquet(tmp_path / "in.parquet")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pool",
            "predict",
            models["text_embedding"],
            "--input",
            str(tmp_path / "in.parquet"),
            "--output",
            str(tmp_path / "out.parquet"),
            "--cluster",
            local.scheduler_address,
            "--shard-size",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert out["id"].tolist() == list(range(300))
    want = in_process(models["text_embedding"], np.asarray(strings, dtype=object))["embedding"]
    assert_rows_equal(np.stack(list(out["embedding"])), want)
    assert sorted(os.listdir(tmp_path)) == ["in.parquet", "out.parquet"]


def test_the_client_never_imports_tensorflow(cluster, models):
    local, _ = cluster
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        import pool
        imported_dask = "distributed" in sys.modules
        import dask.dataframe as dd
        import pandas as pd
        from distributed import Client
        from pool import PredictionPool
        from pool.cluster import map_partitions
        texts = ["a b c", "d e", "f"] * 7
        client = Client({local.scheduler_address!r}, set_as_default=False)
        with PredictionPool({models["text_embedding"]!r}, cluster=client, shard_size=4) as p:
            whole = p.predict(texts)
            parts = list(p.imap([texts[:5], texts[5:]]))
            ddf = dd.from_pandas(pd.DataFrame({{"text": texts}}), npartitions=2)
            frame = client.compute(map_partitions(ddf, p, columns="text")).result()
        client.close()
        print(json.dumps({{
            "tensorflow": "tensorflow" in sys.modules,
            "distributed_on_import_pool": imported_dask,
            "rows": len(whole),
            "parts": [len(x) for x in parts],
            "imap_same": bool(np.array_equal(np.concatenate(parts), whole)),
            "frame_same": bool(np.array_equal(np.stack(list(frame["embedding"])), whole)),
        }}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {
        "tensorflow": False,
        "distributed_on_import_pool": False,
        "rows": 21,
        "parts": [5, 16],
        "imap_same": True,
        "frame_same": True,
    }


def test_pin_cpus_is_refused_with_a_cluster(models):
    with pytest.raises(ValueError, match="pin_cpus does not apply with cluster="):
        PredictionPool(models["small_cnn"], cluster="tcp://127.0.0.1:1", pin_cpus=True)


def test_map_partitions_computes_on_a_pool_given_the_cluster_object(cluster):
    """``cluster=LocalCluster`` is the same as ``cluster=client``: a plain ``.compute()`` of
    ``map_partitions`` runs on the pool's cluster (its client is the default one while the pool
    runs, there being no other), and stops doing so when the pool shuts down."""
    local, _ = cluster
    with pytest.raises(ValueError):
        distributed.default_client()  # the module's client is not the default one
    x = np.arange(40, dtype=np.float64)
    ddf = dd.from_pandas(pd.DataFrame({"x": x}), npartitions=4)
    meta = pd.DataFrame({"x": x[:0], "doubled": x[:0]})
    with PredictionPool(factories.plain_double, cluster=local) as pool:
        lazy = pool_cluster.map_partitions(
            ddf, pool, columns="x", output_column="doubled", meta=meta
        )
        out = lazy.compute()
        assert distributed.default_client() is pool.backend.client
    want = factories.plain_double()(x)  # the model in-process
    np.testing.assert_array_equal(out["x"].to_numpy(), x)
    np.testing.assert_array_equal(out["doubled"].to_numpy(), want)
    with pytest.raises(ValueError):
        distributed.default_client()  # closed with the pool: no default left behind


needs_onnx = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("tf2onnx") is None,
    reason="ONNX Runtime (the onnx extra) is not installed",
)


@pytest.fixture(scope="module")
def runtime_cache(tmp_path_factory):
    """The client's runtime cache for this module: the model is converted once, by the first
    test that needs it."""
    return tmp_path_factory.mktemp("runtimes")


@needs_onnx
def test_a_converted_runtime_runs_on_the_cluster_workers(
    client, models, runtime_cache, monkeypatch
):
    """``runtime=`` with ``cluster=``: converted once in the client (in a subprocess), verified,
    and loaded by every Dask worker from the runtime cache they share with the client; rows
    within the f32 tolerance of TensorFlow in-process, in order."""
    from pool.runtimes import TOLERANCES

    monkeypatch.setenv("POOL_RUNTIME_CACHE", str(runtime_cache))
    x = images(20)
    want = in_process(models["small_cnn"], x)["probabilities"]
    with PredictionPool(
        models["small_cnn"], cluster=client, shard_size=4, runtime="onnxruntime"
    ) as pool:
        info = pool.runtime_info()
        assert info["runtime"] == "onnxruntime" and info["artifact"].startswith(str(runtime_cache))
        assert {r.runtime for r in pool.ready_info} == {"onnxruntime"}
        where = client.run(cluster_factories.loaded_artifact, pool.backend.name)
        assert set(where.values()) == {info["artifact"]}  # the shared path, as it is
        got = pool.predict(x)
        parts = list(pool.imap(x[i : i + 7] for i in range(0, 20, 7)))
    scale = float(np.max(np.abs(want)))
    assert_rows_equal(got, want, rtol=0, atol=TOLERANCES["f32"] * scale + 1e-7)
    assert_rows_equal(np.concatenate(parts), want, rtol=0, atol=TOLERANCES["f32"] * scale + 1e-7)


@needs_onnx
def test_a_converted_runtime_reaches_workers_that_do_not_see_the_clients_cache(
    client, models, runtime_cache, tmp_path, monkeypatch
):
    """Workers with their own ``POOL_RUNTIME_CACHE`` that cannot read the client's entry (it is
    moved away as soon as the client has packed it, as if it were on another machine) install
    the files the plugin carries into their own cache, checked against the manifest's hashes,
    and load from there; nothing converts on them."""
    from pool.runtimes import TOLERANCES, cache

    monkeypatch.setenv("POOL_RUNTIME_CACHE", str(runtime_cache))
    workers_cache = tmp_path / "workers-cache"
    previous = client.run(cluster_factories.set_runtime_cache, str(workers_cache))
    pack_entry, hidden = cache.pack_entry, []

    def pack_then_hide(directory):
        files = pack_entry(directory)
        os.rename(directory, f"{directory}.hidden")
        hidden.append(str(directory))
        return files

    monkeypatch.setattr(cache, "pack_entry", pack_then_hide)
    x = images(12)
    want = in_process(models["small_cnn"], x)["probabilities"]
    try:
        with PredictionPool(
            models["small_cnn"], cluster=client, shard_size=4, runtime="onnxruntime"
        ) as pool:
            where = client.run(cluster_factories.loaded_artifact, pool.backend.name)
            got = pool.predict(x)
    finally:
        for address, value in previous.items():
            client.run(cluster_factories.set_runtime_cache, value, workers=[address])
        for directory in hidden:
            os.rename(f"{directory}.hidden", directory)
    assert hidden and not os.path.exists(f"{hidden[0]}.hidden")
    name = Path(hidden[0]).name
    assert set(where.values()) == {str(workers_cache / name)}, where
    assert cache.valid_manifest(workers_cache / name) is not None
    scale = float(np.max(np.abs(want)))
    assert_rows_equal(got, want, rtol=0, atol=TOLERANCES["f32"] * scale + 1e-7)
