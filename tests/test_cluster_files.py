"""File jobs on a Dask cluster (pool/cluster/files.py): the workers read their own partitions
and write their own parts, the client plans, submits, and renames the output. A real
LocalCluster of 2 worker processes, shared by the module; a cheap model (LoggedDouble: doubles
``x``, optionally slowly, logging the rows it saw) where the model does not matter."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import distributed
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cluster_factories import LoggedDouble, local_cluster
from conftest import assert_rows_equal, in_process

from pool import PredictionPool, etl

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).parent.parent
N = 6000


@pytest.fixture(scope="module")
def cluster():
    with local_cluster() as started:  # workers SIGKILLed here come back: LOST_WORKER_TIMEOUT
        yield started


@pytest.fixture(scope="module")
def client(cluster):
    return cluster[1]


@pytest.fixture(scope="module")
def cluster_pool(client):
    with PredictionPool(LoggedDouble(), cluster=client, shard_size=100) as pool:
        yield pool


@pytest.fixture(scope="module")
def local_pool():
    with PredictionPool(LoggedDouble(), workers=1, shard_size=100) as pool:
        yield pool


def table(n: int = N) -> pa.Table:
    ids = np.arange(n)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "x": pa.array(ids.astype(np.float64)),
            "zip": [f"{i % 1000:05d}" for i in ids],
            "note": [f'say "hi", {i}' if i % 3 else "" for i in ids],
            "day": pa.array((ids % 365).astype("datetime64[D]")),
            "pair": pa.array([[int(i), -int(i)] for i in ids], pa.list_(pa.int32(), 2)),
        },
        metadata={b"source": b"test_cluster_files"},
    )


def write_input(directory: Path, fmt: str, n: int = N) -> Path:
    path = directory / f"in.{fmt}"
    data = table(n)
    if fmt == "parquet":
        pq.write_table(data, path, row_group_size=1700)
    else:  # CRLF lines, quoting as written: what CSV -> CSV keeps byte for byte
        lines = [b"id,x,zip,note,day"]
        for row in data.drop_columns(["pair"]).to_pylist():
            note = '"' + row["note"].replace('"', '""') + '"' if row["note"] else ""
            lines.append(f"{row['id']},{row['x']:.1f},{row['zip']},{note},{row['day']}".encode())
        path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    return path


def check_doubled(path: Path, n: int = N) -> None:
    """Every input row once, in order, with its prediction."""
    out = (
        pq.read_table(path)
        if path.suffix == ".parquet"
        else pa.Table.from_pandas(pd.read_csv(path))
    )
    assert [int(i) for i in out.column("id").to_pylist()] == list(range(n))  # CSV: text
    assert np.array_equal(np.asarray(out.column("doubled")), 2.0 * np.arange(n))


def parts(staging: Path) -> list[str]:
    return sorted(p.name for p in staging.glob("part-*")) if staging.is_dir() else []


@pytest.fixture
def task_sizes(monkeypatch):
    """The pickled size of every task the client submits (arguments included)."""
    sizes: list[int] = []
    submit = distributed.Client.submit

    def recording(self, func, *args, **kwargs):
        sizes.append(len(pickle.dumps((func, args))))
        return submit(self, func, *args, **kwargs)

    monkeypatch.setattr(distributed.Client, "submit", recording)
    return sizes


@pytest.mark.parametrize(
    ("source", "sink"), [("csv", "csv"), ("parquet", "parquet"), ("csv", "parquet")]
)
def test_a_cluster_file_job_equals_the_local_one(
    cluster_pool, local_pool, tmp_path, task_sizes, source, sink
):
    path = write_input(tmp_path, source)
    options = {"columns": "x", "output_column": "doubled", "chunk_rows": 700}
    local = etl.predict_file(local_pool, path, tmp_path / f"local.{sink}", **options)
    report = etl.predict_file(cluster_pool, path, tmp_path / f"cluster.{sink}", **options)
    assert report.rows == local.rows == N and report.chunks >= 8
    if sink == "csv":  # same bytes: each input record as written, then the prediction
        assert (tmp_path / "cluster.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()
    else:  # same columns, types, metadata and values
        got, want = (
            pq.read_table(tmp_path / "cluster.parquet"),
            pq.read_table(tmp_path / "local.parquet"),
        )
        assert got.schema.equals(want.schema, check_metadata=True)
        assert got.equals(want)
    check_doubled(tmp_path / f"cluster.{sink}")
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, f"local.{sink}", f"cluster.{sink}"])
    # the client sent paths and ranges, never rows: one small task per partition + assembly
    assert len(task_sizes) == report.chunks + 1
    assert max(task_sizes) < 4096, task_sizes


@pytest.mark.parametrize("source", ["csv", "parquet"])
def test_the_client_reads_only_the_inputs_metadata(cluster_pool, tmp_path, source):
    """/proc/self/io counts every byte this process reads (files and sockets alike)."""
    n = 60_000
    rng = np.random.default_rng(3)
    noise = [rng.bytes(100).hex() for _ in range(n)]  # 200 incompressible characters per row
    data = pa.table({"id": np.arange(n), "x": np.arange(n, dtype=np.float64), "noise": noise})
    path = tmp_path / f"in.{source}"
    if source == "parquet":
        pq.write_table(data, path, compression="none")
    else:
        data.to_pandas().to_csv(path, index=False)
    size = path.stat().st_size
    assert size > 12_000_000

    def read_bytes() -> int:
        text = Path("/proc/self/io").read_text()
        return int(re.search(r"rchar: (\d+)", text)[1])

    before = read_bytes()
    report = etl.predict_file(
        cluster_pool, path, tmp_path / "out.parquet", columns="x", output_column="doubled"
    )
    read = read_bytes() - before
    assert report.rows == n
    assert read < size / 4, f"the client read {read} bytes of a {size}-byte input"
    check_doubled(tmp_path / "out.parquet", n)


def logged(log: Path) -> np.ndarray:
    """``[[pid, row], ...]`` that LoggedDouble logged."""
    return np.loadtxt(log, dtype=np.int64, ndmin=2) if log.exists() else np.empty((0, 2))


def test_a_worker_killed_midway_loses_and_duplicates_nothing(client, tmp_path):
    path = write_input(tmp_path, "parquet")
    log = tmp_path / "rows.log"
    output = tmp_path / "out.parquet"
    staging = tmp_path / ".out.parquet.partial"
    chunk = 500
    with PredictionPool(LoggedDouble(str(log), 0.05), cluster=client, shard_size=100) as pool:
        outcome: dict = {}

        def job() -> None:
            try:
                outcome["report"] = etl.predict_file(
                    pool, path, output, columns="x", output_column="doubled", chunk_rows=chunk
                )
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=job)
        thread.start()
        victim = sorted(client.run(os.getpid).values())[0]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # midway: a part committed, the victim inside one
            by_victim = int((logged(log)[:, 0] == victim).sum())
            if parts(staging) and by_victim % chunk:
                break
            time.sleep(0.01)
        assert parts(staging) and by_victim % chunk, "the job ended before the kill"
        os.kill(victim, signal.SIGKILL)
        thread.join(120)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["report"].rows == N
    check_doubled(output)  # every row once, in order
    rows = logged(log)[:, 1]
    assert set(rows.tolist()) == set(range(N))
    assert len(rows) > N  # the victim's partition ran again on the other worker
    client.wait_for_workers(2, timeout=120)


def test_a_killed_client_resumes_without_recomputing_committed_parts(cluster, client, tmp_path):
    local, _ = cluster
    path = write_input(tmp_path, "csv")
    log = tmp_path / "rows.log"
    output = tmp_path / "out.csv"
    staging = tmp_path / ".out.csv.partial"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from cluster_factories import LoggedDouble, local_cluster
        from pool import etl
        etl.predict_file(
            LoggedDouble({str(log)!r}, 0.05), {str(path)!r}, {str(output)!r}, columns="x",
            output_column="doubled", chunk_rows=500, shard_size=100,
            cluster={local.scheduler_address!r},
        )
        """
    )
    job = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(parts(staging)) < 3 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.poll() is None, job.stderr.read().decode() if job.stderr else ""
        assert len(parts(staging)) >= 3
        job.send_signal(signal.SIGKILL)
        job.wait(30)
    finally:
        if job.poll() is None:
            job.kill()
        job.wait()
    assert not output.exists()
    time.sleep(1.0)  # the tasks still running when the client died finish and commit
    committed = parts(staging)
    (staging / ".tmp-0123-part-000002-777.csv").write_bytes(b"id,x\r\nhalf a part")
    offset = log.stat().st_size
    # the rows of the committed parts: from the parts themselves (CSV partitions are bytes)
    done_rows = set()
    for name in committed:
        done_rows |= set(pd.read_csv(staging / name)["id"].tolist())
    report = etl.predict_file(
        LoggedDouble(str(log), 0.05),
        path,
        output,
        columns="x",
        output_column="doubled",
        shard_size=100,
        resume=True,
        cluster=client,
    )
    assert report.resumed_chunks >= len(committed) >= 3
    assert report.rows == N and report.computed_rows < N
    with open(log, "rb") as f:
        f.seek(offset)
        again = {int(row) for row in f.read().split()[1::2]}
    assert not again & done_rows, "committed rows were computed again"
    check_doubled(output)
    assert (output.read_bytes().split(b"\r\n")[0]) == b"id,x,zip,note,day,doubled"
    assert not staging.exists()


def _unshare_works() -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -m (a private mount namespace)")
def test_an_output_directory_the_workers_cannot_see_is_a_clear_error(cluster, models, tmp_path):
    """The client writes its output on a tmpfs of its own mount namespace: the workers see an
    empty directory at that path, as workers on another machine without a shared filesystem."""
    local, _ = cluster
    pq.write_table(pa.table({"text": ["a b", "c"]}), tmp_path / "in.parquet")
    private = tmp_path / "private"
    private.mkdir()
    command = (
        f"mount -t tmpfs none {private} && exec {sys.executable} -m pool predict "
        f"{models['text_embedding']} -i {tmp_path / 'in.parquet'} -o {private / 'out.parquet'} "
        f"--cluster {local.scheduler_address}"
    )
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert re.search(
        r"error: Dask worker tcp://\S+ cannot see the output's staging directory .*"
        r"must be at the same path on storage every worker sees",
        done.stderr,
    ), done.stderr
    assert os.listdir(private) == []


def _doc_example() -> str:
    text = (ROOT / "docs" / "scale-out.md").read_text()
    found = re.search(r"<!-- example: parquet-to-parquet -->\n```python\n(.*?)```", text, re.S)
    assert found, "docs/scale-out.md lost its read_parquet -> map_partitions -> to_parquet example"
    return found[1]


def test_the_documented_read_parquet_map_partitions_to_parquet_example(client, models, tmp_path):
    texts = [f"review {i}: the quick brown fox {i % 7}" for i in range(300)]
    source = tmp_path / "reviews"
    source.mkdir()
    for k in range(3):  # a directory of files, as a data lake holds them
        pq.write_table(
            pa.table({"id": range(100 * k, 100 * k + 100), "text": texts[100 * k : 100 * k + 100]}),
            source / f"part-{k}.parquet",
        )
    namespace: dict = {}
    exec(_doc_example(), namespace)
    namespace["embed_reviews"](
        models["text_embedding"], str(source), str(tmp_path / "embedded"), client
    )
    out = pd.read_parquet(tmp_path / "embedded")
    assert out["id"].tolist() == list(range(300))
    want = in_process(models["text_embedding"], np.asarray(texts, dtype=object))["embedding"]
    assert_rows_equal(np.stack(list(out["embedding"])), want)


def test_a_cluster_job_resumes_only_on_a_cluster(tmp_path):
    """Parts are laid out per partition on a cluster, per chunk locally: a resume that would
    mix them is refused (status 2) before any worker starts."""
    path = write_input(tmp_path, "parquet", 100)
    staging = tmp_path / ".out.parquet.partial"
    staging.mkdir()
    (staging / "manifest.json").write_text('{"layout": "partitions", "chunk_rows": 50}')
    (staging / "part-000001-50.parquet").write_bytes(b"committed by a cluster job")
    with pytest.raises(etl.EtlError, match=r"it was written with --cluster .* resume it the same"):
        etl.predict_file(LoggedDouble(), path, tmp_path / "out.parquet", columns="x", resume=True)
    assert (staging / "part-000001-50.parquet").exists()  # kept for a resume on the cluster


def test_a_csv_cut_inside_a_quoted_line_break_stops_with_a_clear_error(cluster_pool, tmp_path):
    """A CSV partition starts at a line start; where that is inside a quoted field, the job
    stops (status 2 from the command line) instead of writing rows split wrongly."""
    path = tmp_path / "in.csv"
    path.write_bytes(
        b"id,x,note\n" + b"".join(b'%d,%d.5,"line one\nline two"\n' % (i, i) for i in range(2000))
    )
    with pytest.raises(etl.EtlError, match=r"quoted field that holds a line break .* Parquet"):
        etl.predict_file(
            cluster_pool, path, tmp_path / "out.csv", columns="x", output_column="y", chunk_rows=50
        )
    assert not (tmp_path / "out.csv").exists()
