"""pool.etl: data frames and Arrow through the pool, map_batches, and predict_file's formats,
atomic output, commit and resume. Every prediction is compared with the model called in-process.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import assert_rows_equal, in_process

from pool import PredictionPool, etl
from pool.etl import formats

pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pacsv = pytest.importorskip("pyarrow.csv")

pytestmark = pytest.mark.timeout(300)


def texts(stop: int, start: int = 0) -> list[str]:
    """Rows ``start..stop-1``, all distinct, so any reordering or duplication shows."""
    return [
        f"row {i} the quick brown fox {i % 97} jumps over {i % 13} dogs" for i in range(start, stop)
    ]


@pytest.fixture(scope="module")
def text_pool(models):
    with PredictionPool(models["text_embedding"], workers=2) as pool:
        yield pool


@pytest.fixture(scope="module")
def multi_pool(models):
    with PredictionPool(models["multi_io"], workers=1) as pool:
        yield pool


def embeddings(models, strings) -> np.ndarray:
    return in_process(models["text_embedding"], np.asarray(strings, dtype=object))["embedding"]


def stacked(column) -> np.ndarray:
    """A pandas column of row arrays, or an Arrow fixed-size-list column, as one 2-D array."""
    if isinstance(column, (pa.ChunkedArray, pa.Array)):
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        return column.flatten().to_numpy().reshape(len(column), -1)
    return np.stack(list(column))


def only_output(directory: Path, name: str) -> None:
    """Nothing but the inputs and the finished output: no staging directory, no temp files."""
    leftovers = [p.name for p in directory.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
    assert (directory / name).is_file()


# --- without the extra (what `import pool` loads: test_layering.py) -------------------------


def test_pool_works_without_the_etl_extra(tmp_path):
    """With pandas, pyarrow and tqdm missing, `import pool` works and the ETL entry points say
    which extra to install."""
    (tmp_path / "in.parquet").write_bytes(b"PAR1")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "saved_model.pb").write_bytes(b"")
    code = f"""
import sys
sys.modules.update(pandas=None, pyarrow=None, tqdm=None)  # as if not installed
import numpy as np
import pool
from pool import cli, etl
from pool.etl.progress import NoBar
assert not etl.is_table(np.zeros(3)) and not etl.is_table([1, 2])
assert isinstance(etl.progress_bar(True), NoBar)
try:
    etl.predict_file({str(tmp_path / "model")!r}, {str(tmp_path / "in.parquet")!r}, "o.parquet")
except ImportError as exc:
    assert "pip install 'prediction-pool[etl]'" in str(exc), exc
else:
    raise AssertionError("expected ImportError")
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- in memory: predict on frames and Arrow ------------------------------------------------


def test_predict_accepts_series_and_dataframes(text_pool, models):
    rows = texts(300)
    want = embeddings(models, rows)
    assert_rows_equal(etl.predict(text_pool, pd.Series(rows)), want)
    frame = pd.DataFrame({"id": range(300), "text": rows}, index=range(1000, 1300))
    assert_rows_equal(etl.predict(text_pool, frame), want)  # the column named like the input
    renamed = frame.rename(columns={"text": "body"})
    assert_rows_equal(etl.predict(text_pool, renamed, columns="body"), want)
    assert_rows_equal(etl.submit(text_pool, renamed, columns="body").result(), want)
    as_objects = pd.DataFrame({"body": pd.Series(rows, dtype=object)})
    assert_rows_equal(etl.predict(text_pool, as_objects), want)  # the only column


def test_predict_accepts_arrow(text_pool, models):
    rows = texts(200)
    want = embeddings(models, rows)
    for data in (
        pa.array(rows),
        pa.array(rows, pa.large_string()),
        pa.array(rows).dictionary_encode(),
        pa.chunked_array([rows[:70], rows[70:]]),
        pa.record_batch({"id": list(range(200)), "text": rows}),
        pa.table({"text": rows}),
        pa.table({"text": pa.array([r.encode() for r in rows], pa.binary())}),
    ):
        assert_rows_equal(etl.predict(text_pool, data), want)
    assert_rows_equal(etl.predict(text_pool, pa.array(rows).slice(50, 100)), want[50:150])


class Delegate:
    """Not a PredictionPool: only what ``pool.etl.Predictor`` asks for, passed on to one, and a
    record of what reached it."""

    def __init__(self, pool):
        self.pool = pool
        self.seen: list[tuple[str, object]] = []

    @property
    def signature(self):
        return self.pool.signature

    def submit(self, inputs, **options):
        self.seen.append(("submit", inputs))
        return self.pool.submit(inputs, **options)

    def imap(self, batches, **options):
        def recorded():
            for batch in batches:
                self.seen.append(("imap", batch))
                yield batch

        return self.pool.imap(recorded(), **options)


def test_tables_are_adapted_at_the_edge_for_any_predictor(text_pool, models):
    """pool.etl works with any object that has signature, submit and imap, and hands it NumPy
    arrays only: the core never sees a data frame."""
    rows = texts(120)
    want = embeddings(models, rows)
    proxy = Delegate(text_pool)
    assert_rows_equal(etl.predict(proxy, pd.DataFrame({"id": range(120), "text": rows})), want)
    batches = [pd.DataFrame({"text": rows[:50]}), pa.record_batch({"text": rows[50:]})]
    out = list(etl.map_batches(proxy, batches))
    assert_rows_equal(
        np.concatenate([stacked(out[0]["embedding"]), stacked(out[1]["embedding"])]), want
    )
    assert [kind for kind, _ in proxy.seen] == ["submit", "imap", "imap"]
    for _, inputs in proxy.seen:
        assert list(inputs) == ["text"] and isinstance(inputs["text"], np.ndarray)


def test_multi_input_frames(multi_pool, models):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 4)).astype(np.float32)
    b = rng.integers(-5, 5, size=(64, 3)).astype(np.int32)
    want = in_process(models["multi_io"], {"a": a, "b": b})
    frame = pd.DataFrame({"a": list(a), "b0": b[:, 0], "b1": b[:, 1], "b2": b[:, 2]})
    got = etl.predict(multi_pool, frame, columns={"a": "a", "b": ["b0", "b1", "b2"]})
    assert_rows_equal(got, want)
    nullable = frame.astype({"b0": "Int32", "b1": "Int32", "b2": "Int32"})
    assert_rows_equal(
        etl.predict(multi_pool, nullable, columns={"a": "a", "b": ["b0", "b1", "b2"]}), want
    )
    batch = pa.record_batch({"a": etl.arrow_column(a), "b": etl.arrow_column(b)})
    assert batch.schema.field("a").type == pa.list_(pa.float32(), 4)
    assert_rows_equal(etl.predict(multi_pool, batch), want)
    lists = pa.table({"x": pa.array(a.tolist()), "y": pa.array(b.tolist(), pa.list_(pa.int32()))})
    assert_rows_equal(etl.predict(multi_pool, lists, columns={"a": "x", "b": "y"}), want)


def test_frame_errors_name_the_column(text_pool, multi_pool):
    frame = pd.DataFrame({"id": [1, 2], "body": ["a", "b"]})
    with pytest.raises(etl.EtlError, match=r"no column named 'text'.*\['id', 'body'\]"):
        etl.predict(text_pool, frame)
    with pytest.raises(etl.EtlError, match=r"unknown column 'nope'.*\['id', 'body'\]"):
        etl.predict(text_pool, frame, columns="nope")
    with pytest.raises(TypeError, match=r"column 'id' does not fit the model's input 'text'"):
        etl.predict(text_pool, frame, columns="id")
    with pytest.raises(etl.EtlError, match=r"column 'text' has 1 missing value\(s\).*row 1"):
        etl.predict(text_pool, pd.DataFrame({"text": ["a", None, "c"]}))
    with pytest.raises(etl.EtlError, match=r"null value\(s\), the first at row 2"):
        etl.predict(text_pool, pa.array(["a", "b", None]))
    with pytest.raises(TypeError, match=r"expected a pandas Series/DataFrame .* got ndarray"):
        etl.predict(text_pool, np.array(["a"], dtype=object), columns="text")
    with pytest.raises(etl.EtlError, match=r"has 2 inputs.*columns=\{'a'"):
        etl.predict(multi_pool, pd.DataFrame({"x": [[0.0] * 4]}), columns="x")
    with pytest.raises(etl.EtlError, match=r"names inputs the model does not have: \['c'\]"):
        etl.predict(multi_pool, pd.DataFrame({"x": [[0.0] * 4]}), columns={"a": "x", "c": "x"})
    with pytest.raises(etl.EtlError, match=r"no column for the model's input 'b'"):
        etl.predict(multi_pool, pd.DataFrame({"x": [[0.0] * 4]}), columns={"a": "x"})
    ragged = pa.table({"a": [[0.0] * 4, [0.0] * 3], "b": [[1, 2, 3], [1, 2, 3]]})
    with pytest.raises(etl.EtlError, match=r"column 'a' holds lists of different lengths"):
        etl.predict(multi_pool, ragged)
    wrong_width = pd.DataFrame({"a": [np.zeros(5, np.float32)], "b": [np.zeros(3, np.int32)]})
    with pytest.raises(ValueError, match=r"column 'a' does not fit.*axis 1 is 5, not 4"):
        etl.predict(multi_pool, wrong_width)


# --- map_batches -----------------------------------------------------------------------------


def test_map_batches_pandas_keeps_order_index_and_inputs(text_pool, models):
    rows = texts(5000)
    sizes = [700, 0, 1, 1299, 3000]
    frames, at = [], 0
    for size in sizes:
        index = pd.RangeIndex(10_000 + at, 10_000 + at + size)
        frames.append(
            pd.DataFrame({"id": range(at, at + size), "text": rows[at : at + size]}, index)
        )
        at += size
    copies = [f.copy() for f in frames]
    out = list(etl.map_batches(text_pool, iter(frames), shard_size=256))
    assert [len(f) for f in out] == sizes
    for frame, copy, result in zip(frames, copies, out, strict=True):
        pd.testing.assert_frame_equal(frame, copy)  # the input is not modified
        assert list(result.columns) == ["id", "text", "embedding"]
        pd.testing.assert_index_equal(result.index, frame.index)
        pd.testing.assert_frame_equal(result[["id", "text"]], frame)
    whole = pd.concat(out)
    assert whole["id"].tolist() == list(range(5000))
    assert_rows_equal(stacked(whole["embedding"]), embeddings(models, rows))


def test_map_batches_record_batches_from_parquet(text_pool, models, tmp_path):
    rows = texts(6000)
    pq.write_table(
        pa.table({"id": range(6000), "text": rows}), tmp_path / "in.parquet", row_group_size=1000
    )
    batches = pq.ParquetFile(tmp_path / "in.parquet").iter_batches(batch_size=1500)
    out = list(etl.map_batches(text_pool, batches, output_column="vector", max_in_flight=2))
    table = pa.Table.from_batches(out)
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 64)
    assert table.column("id").to_pylist() == list(range(6000))
    assert table.column("text").to_pylist() == rows
    assert_rows_equal(stacked(table.column("vector")), embeddings(models, rows))
    tables = [pa.table({"text": rows[:10]}).replace_schema_metadata({"source": "test"})]
    (out,) = etl.map_batches(text_pool, tables)  # a Table works too, and keeps its metadata
    assert out.schema.metadata == {b"source": b"test"} and out.column_names == ["text", "embedding"]
    assert_rows_equal(stacked(out.column("embedding")), embeddings(models, rows[:10]))


def test_map_batches_several_outputs(multi_pool, models):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 4)).astype(np.float32)
    b = rng.integers(0, 9, size=(300, 3)).astype(np.int32)
    want = in_process(models["multi_io"], {"a": a, "b": b})
    frames = [
        pd.DataFrame({"a": list(a[i : i + 100]), "b": list(b[i : i + 100])}) for i in (0, 100, 200)
    ]
    out = pd.concat(etl.map_batches(multi_pool, frames, output_column={"sum": "total"}))
    assert list(out.columns) == ["a", "b", "logits", "total"]
    assert out["total"].dtype == np.float32  # [N, 1]: a column of numbers, not of arrays
    assert_rows_equal(out["total"].to_numpy()[:, None], want["sum"])
    assert_rows_equal(stacked(out["logits"]), want["logits"])
    with pytest.raises(etl.EtlError, match=r"has 2 outputs \['logits', 'sum'\]"):
        list(etl.map_batches(multi_pool, frames, output_column="x"))
    with pytest.raises(etl.EtlError, match=r"output column 'a' already exists"):
        list(etl.map_batches(multi_pool, frames, output_column={"sum": "a"}))
    with pytest.raises(TypeError, match="expects pandas DataFrames"):
        list(etl.map_batches(multi_pool, [{"a": a, "b": b}]))


def test_map_batches_holds_a_bounded_number_of_batches(text_pool, models):
    """However long the stream, the batches read ahead of the one yielded stay within
    max_in_flight (each batch here is one shard), so memory does not grow with the input."""
    produced = [0]

    def endless():
        while True:
            start = produced[0] * 64
            produced[0] += 1
            yield pd.DataFrame({"text": texts(start + 64, start)})

    ahead = []
    stream = etl.map_batches(text_pool, endless(), shard_size=64, max_in_flight=3)
    for count, frame in enumerate(stream, start=1):
        ahead.append(produced[0] - count)
        if count == 1000:
            assert_rows_equal(
                stacked(frame["embedding"]), embeddings(models, texts(64_000, 63_936))
            )
            break
    assert max(ahead) <= 3, max(ahead)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(text_pool, capsys, monkeypatch):
    frames = [pd.DataFrame({"text": texts(500)})] * 4
    list(etl.map_batches(text_pool, frames, progress=True, total=2000))
    assert capsys.readouterr().err == ""  # stderr is not a terminal under pytest
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    list(etl.map_batches(text_pool, frames, progress=True, total=2000))
    monkeypatch.undo()  # before capsys restores sys.stderr
    shown = terminal.getvalue()
    assert "2.00k/2.00k" in shown and "rows/s" in shown and "100%" in shown, shown


# --- predict_file: formats -------------------------------------------------------------------


def test_parquet_to_parquet_keeps_rows_order_and_metadata(text_pool, models, tmp_path):
    rows = texts(10_000)
    frame = pd.DataFrame(
        {"id": np.arange(10_000), "text": rows, "score": np.linspace(0, 1, 10_000)}
    )
    frame.to_parquet(tmp_path / "in.parquet", row_group_size=3000)
    report = etl.predict_file(
        text_pool,
        tmp_path / "in.parquet",
        tmp_path / "out.parquet",
        chunk_rows=2048,
        shard_size=512,
    )
    assert (report.rows, report.computed_rows, report.chunks, report.resumed_chunks) == (
        10_000,
        10_000,
        5,
        0,
    )
    only_output(tmp_path, "out.parquet")
    assert pq.ParquetFile(tmp_path / "out.parquet").num_row_groups == 5  # one per chunk
    out = pd.read_parquet(tmp_path / "out.parquet")
    pd.testing.assert_frame_equal(out[["id", "text", "score"]], frame)
    assert_rows_equal(stacked(out["embedding"]), embeddings(models, rows))


def test_csv_to_csv_and_to_parquet(text_pool, models, tmp_path):
    rows = texts(3000)
    rows[5] = 'quoted "text", with a comma'
    rows[6] = "two\nlines"
    rows[7] = "12345"  # looks like a number, but feeds a text input: read as text
    rows[8] = ""
    with open(tmp_path / "in.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows(enumerate(rows))
    want = embeddings(models, rows)

    etl.predict_file(
        text_pool, tmp_path / "in.csv", tmp_path / "out.csv", chunk_rows=1024, output_column="vec"
    )
    with open(tmp_path / "out.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert [r["id"] for r in records] == [str(i) for i in range(3000)]
    assert [r["text"] for r in records] == rows
    vectors = np.array([json.loads(r["vec"]) for r in records]).astype(np.float32)
    assert_rows_equal(vectors, want)  # JSON keeps every float32 exactly

    etl.predict_file(text_pool, tmp_path / "in.csv", tmp_path / "out.parquet", chunk_rows=1024)
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("text").to_pylist() == rows
    assert_rows_equal(stacked(table.column("embedding")), want)
    only_output(tmp_path, "out.parquet")


def test_npy_inputs_and_outputs(text_pool, models, tmp_path):
    rows = texts(2500)
    np.save(tmp_path / "in.npy", np.asarray(rows, dtype=str))  # fixed-width unicode
    want = embeddings(models, rows)

    report = etl.predict_file(text_pool, tmp_path / "in.npy", tmp_path / "out.npy", chunk_rows=1000)
    assert report.chunks == 3
    got = np.load(tmp_path / "out.npy")
    assert_rows_equal(got, want)

    etl.predict_file(text_pool, tmp_path / "in.npy", tmp_path / "out.parquet", columns="sentence")
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column_names == ["sentence", "embedding"]
    assert table.column("sentence").to_pylist() == rows
    assert_rows_equal(stacked(table.column("embedding")), want)

    np.save(tmp_path / "objects.npy", np.asarray(rows, dtype=object), allow_pickle=True)
    with pytest.raises(etl.EtlError, match="fixed-width string array"):
        etl.predict_file(text_pool, tmp_path / "objects.npy", tmp_path / "x.npy")


def test_multi_io_files(multi_pool, models, tmp_path):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(1000, 4)).astype(np.float32)
    b = rng.integers(0, 9, size=(1000, 3)).astype(np.int32)
    want = in_process(models["multi_io"], {"a": a, "b": b})
    table = pa.table({"x": etl.arrow_column(a), "b": etl.arrow_column(b)})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=300)
    etl.predict_file(
        multi_pool, tmp_path / "in.parquet", tmp_path / "out.parquet", columns={"a": "x", "b": "b"}
    )
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.column_names == ["x", "b", "logits", "sum"]
    assert_rows_equal(stacked(out.column("logits")), want["logits"])
    assert out.schema.field("sum").type == pa.float32()  # [N, 1]: a number column
    assert_rows_equal(out.column("sum").to_numpy()[:, None], want["sum"])
    with pytest.raises(etl.EtlError, match=r"a \.npy output holds one array.*\['logits', 'sum'\]"):
        etl.predict_file(
            multi_pool, tmp_path / "in.parquet", tmp_path / "o.npy", columns={"a": "x", "b": "b"}
        )
    np.save(tmp_path / "a.npy", a)
    with pytest.raises(etl.EtlError, match=r"a \.npy input holds one array, but the model has 2"):
        etl.predict_file(multi_pool, tmp_path / "a.npy", tmp_path / "o.parquet")
    with pytest.raises(etl.EtlError, match=r"column 'b' has type .*double.*cannot be cast safely"):
        bad = pa.table({"a": etl.arrow_column(a), "b": etl.arrow_column(b.astype(np.float64))})
        pq.write_table(bad, tmp_path / "bad.parquet")
        etl.predict_file(multi_pool, tmp_path / "bad.parquet", tmp_path / "o.parquet")


def test_empty_input_gives_an_empty_output(text_pool, tmp_path):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "in.parquet")
    report = etl.predict_file(text_pool, tmp_path / "in.parquet", tmp_path / "out.parquet")
    assert report.rows == 0
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.num_rows == 0 and out.schema.field("embedding").type == pa.list_(pa.float32(), 64)


def test_a_null_mid_file_names_its_row_and_keeps_the_chunks_before_it(text_pool, tmp_path):
    rows: list[str | None] = list(texts(8000))
    rows[5000] = None
    pq.write_table(pa.table({"text": rows}), tmp_path / "in.parquet", row_group_size=1000)
    with pytest.raises(
        etl.EtlError, match=r"column 'text' has 1 null value\(s\), the first at row 5000"
    ):
        etl.predict_file(
            text_pool,
            tmp_path / "in.parquet",
            tmp_path / "out.parquet",
            chunk_rows=2048,
            shard_size=512,
        )
    assert not (tmp_path / "out.parquet").exists()
    staging = tmp_path / ".out.parquet.partial"
    assert sorted(p.name for p in staging.glob("part-*")) == [
        "part-000000-2048.parquet",
        "part-000001-2048.parquet",
    ]


# --- predict_file: errors before any worker starts ---------------------------------------------


@pytest.fixture
def no_workers(monkeypatch):
    """Fail the test if anything starts a pool."""

    def start(self):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(PredictionPool, "start", start)


def test_errors_before_any_worker_starts(models, tmp_path, no_workers):
    model = models["text_embedding"]
    pq.write_table(pa.table({"id": [1, 2], "body": ["a", "b"]}), tmp_path / "in.parquet")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "dir.parquet").mkdir()
    cases = [
        ({"input": tmp_path / "missing.parquet"}, r"input '.*missing\.parquet' does not exist"),
        ({"input": tmp_path / "a_file"}, r"cannot tell the format of input"),
        ({"columns": "nope"}, r"unknown column 'nope'.*\['id', 'body'\]"),
        (
            {"columns": "id"},
            r"column 'id' has type int64, but the model's input text: string\[None\]",
        ),
        ({}, r"no column named 'text'.*\['id', 'body'\]"),
        ({"columns": "body", "output_column": "id"}, r"output column 'id' already exists"),
        ({"output": tmp_path / "no" / "out.parquet"}, r"directory '.*no' not found"),
        ({"output": tmp_path / "a_file" / "out.parquet"}, r"directory '.*a_file' not found"),
        ({"output": tmp_path / "dir.parquet"}, r"is a directory"),
        ({"output": tmp_path / "in.parquet"}, r"is the input file"),
        ({"output": tmp_path / "out.txt"}, r"cannot tell the format of output"),
        ({"model": tmp_path / "nowhere"}, r"is not a SavedModel directory \(no such directory\)"),
        ({"columns": "body", "chunk_rows": 0}, r"chunk_rows must be a positive integer"),
    ]
    for change, message in cases:
        arguments = {
            "model": model,
            "input": tmp_path / "in.parquet",
            "output": tmp_path / "out.parquet",
        }
        arguments.update(change)
        with pytest.raises(etl.EtlError, match=message):
            etl.predict_file(
                arguments.pop("model"), arguments.pop("input"), arguments.pop("output"), **arguments
            )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "dir.parquet", "in.parquet"]


def test_peek_signature_reads_what_the_workers_load(models, text_pool, multi_pool):
    assert etl.peek_signature(models["text_embedding"]) == text_pool.signature
    assert etl.peek_signature(models["multi_io"]) == multi_pool.signature
    scaled = etl.peek_signature(models["multi_io"], "scaled")
    assert [t.describe() for t in scaled.inputs] == ["a: float32[None, 4]"]
    assert etl.peek_signature(models["multi_io"], "missing") is None
    assert etl.peek_signature("https://tfhub.dev/some/model") is None


def test_another_live_job_holds_the_output(text_pool, tmp_path):
    pq.write_table(pa.table({"text": texts(10)}), tmp_path / "in.parquet")
    staging = tmp_path / ".out.parquet.partial"
    staging.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = psutil.Process(other.pid)
        (staging / "lock").write_text(
            json.dumps({"pid": other.pid, "create_time": owner.create_time()})
        )
        with pytest.raises(
            etl.EtlError, match=rf"being written by another job \(pid {other.pid}\)"
        ):
            etl.predict_file(text_pool, tmp_path / "in.parquet", tmp_path / "out.parquet")
    finally:
        other.kill()
        other.wait()
    report = etl.predict_file(text_pool, tmp_path / "in.parquet", tmp_path / "out.parquet")
    assert report.rows == 10  # the owner is gone: its lock is stale and taken over
    only_output(tmp_path, "out.parquet")


# --- predict_file: commit and resume ------------------------------------------------------------


class _Interrupt:
    """Patch the Parquet sink to press Ctrl-C when chunk ``at`` is about to be written."""

    def __init__(self, monkeypatch, at: int):
        self.written: list[int] = []
        original = formats.ParquetSink.write_part

        def write_part(sink, pieces, outputs, path):
            index = int(path.name.split("-")[2])  # .tmp-part-000004-2048.parquet
            if index == at:
                path.write_bytes(b"half a part")  # as if the process died mid-write
                raise KeyboardInterrupt
            self.written.append(index)
            original(sink, pieces, outputs, path)

        monkeypatch.setattr(formats.ParquetSink, "write_part", write_part)


def test_interrupt_then_resume_commits_every_row_once(
    text_pool, models, tmp_path, monkeypatch, caplog
):
    rows = texts(20_000)
    pq.write_table(
        pa.table({"id": range(20_000), "text": rows}), tmp_path / "in.parquet", row_group_size=3000
    )
    arguments = (text_pool, tmp_path / "in.parquet", tmp_path / "out.parquet")
    interrupt = _Interrupt(monkeypatch, at=4)
    with pytest.raises(KeyboardInterrupt):
        etl.predict_file(*arguments, chunk_rows=2048, shard_size=256)
    assert interrupt.written == [0, 1, 2, 3]
    assert not (tmp_path / "out.parquet").exists()  # no partial output, ever
    staging = tmp_path / ".out.parquet.partial"
    parts = sorted(p.name for p in staging.glob("part-*"))
    assert parts == [f"part-{i:06d}-2048.parquet" for i in range(4)]
    assert not (staging / "lock").exists() and not list(staging.glob(".tmp-*"))
    (staging / ".tmp-part-000004-2048.parquet").write_bytes(b"left by a killed run")

    monkeypatch.undo()
    resumed = _Interrupt(monkeypatch, at=-1)
    with caplog.at_level(logging.INFO, logger="pool"):
        report = etl.predict_file(*arguments, resume=True, shard_size=256)  # chunk_rows: manifest
    assert "resuming: 4 chunk(s), 8192 rows, already committed" in caplog.text
    assert resumed.written == [4, 5, 6, 7, 8, 9]  # the committed chunks were not recomputed
    assert (report.rows, report.computed_rows, report.resumed_chunks, report.chunks) == (
        20_000,
        11_808,
        4,
        10,
    )
    only_output(tmp_path, "out.parquet")
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.column("id").to_pylist() == list(range(20_000))  # every row once, in order
    assert out.column("text").to_pylist() == rows
    assert_rows_equal(stacked(out.column("embedding")), embeddings(models, rows))


def test_resume_refuses_a_different_job_and_a_fresh_run_starts_over(
    text_pool, tmp_path, monkeypatch, caplog
):
    pq.write_table(pa.table({"text": texts(5000)}), tmp_path / "in.parquet")
    arguments = (text_pool, tmp_path / "in.parquet", tmp_path / "out.parquet")
    _Interrupt(monkeypatch, at=2)
    with pytest.raises(KeyboardInterrupt):
        etl.predict_file(*arguments, chunk_rows=1000)
    monkeypatch.undo()
    with pytest.raises(etl.EtlError, match=r"committed in chunks of 1000 rows, not 500"):
        etl.predict_file(*arguments, resume=True, chunk_rows=500)
    with pytest.raises(etl.EtlError, match=r"cannot resume .*output_column was None .* and is 'v'"):
        etl.predict_file(*arguments, resume=True, output_column="v")
    pq.write_table(pa.table({"text": texts(5001)}), tmp_path / "in.parquet")  # the input changed
    with pytest.raises(etl.EtlError, match=r"cannot resume .*input_size was"):
        etl.predict_file(*arguments, resume=True)
    with caplog.at_level(logging.WARNING, logger="pool"):
        report = etl.predict_file(*arguments, chunk_rows=1000)
    assert "discarding 2 chunk(s) committed by an earlier run" in caplog.text
    assert (report.rows, report.resumed_chunks) == (5001, 0)
    only_output(tmp_path, "out.parquet")


def test_resume_with_nothing_to_resume_runs_the_whole_job(text_pool, tmp_path):
    pq.write_table(pa.table({"text": texts(100)}), tmp_path / "in.parquet")
    report = etl.predict_file(
        text_pool, tmp_path / "in.parquet", tmp_path / "out.parquet", resume=True
    )
    assert (report.rows, report.resumed_chunks) == (100, 0)
    only_output(tmp_path, "out.parquet")


# --- docs -------------------------------------------------------------------------------------


def test_the_complete_etl_script_in_the_docs_works(text_pool, models, tmp_path, monkeypatch):
    """docs/etl.md's script, its functions run with this module's pool instead of a new one."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "etl.md").read_text()
    script = doc.split("## A complete ETL script")[1].split("```python\n")[1].split("```")[0]
    namespace = {"__name__": "etl_example"}  # not "__main__": only define the functions
    exec(compile(script, "docs/etl.md", "exec"), namespace)
    monkeypatch.chdir(tmp_path)
    namespace["make_sample"]("reviews.parquet", rows=20_000)
    assert namespace["embed_parquet"](text_pool, "reviews.parquet", "out.parquet") == 20_000
    source, out = pq.read_table("reviews.parquet"), pq.read_table("out.parquet")
    assert out.select(["id", "text"]).equals(source)
    want = embeddings(models, source.column("text").to_pylist())
    assert_rows_equal(stacked(out.column("embedding")), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet", "reviews.parquet"]


# --- issue 17: data kept as it is, inputs cast by value, one column per output -----------------


def test_csv_columns_the_model_does_not_read_are_kept_byte_for_byte(text_pool, models, tmp_path):
    rows = texts(2500)
    rows[3] = 'said "hi", then left'
    rows[4] = "two\r\nlines"
    lines = [b"id,zip,when,flag,price,text,note"]
    for i, text in enumerate(rows):
        quoted = '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\r\n') else text
        flag = "true" if i % 2 else "FALSE"
        line = f'{i:05d},0{i % 7}123,2024-01-{i % 28 + 1:02d},{flag},{i}.50,{quoted},"plain"'
        lines.append(line.encode())
    (tmp_path / "in.csv").write_bytes(b"\r\n".join(lines) + b"\r\n")
    want = embeddings(models, rows)

    etl.predict_file(
        text_pool, tmp_path / "in.csv", tmp_path / "out.csv", chunk_rows=1000, shard_size=256
    )
    out = (tmp_path / "out.csv").read_bytes()
    assert out.startswith(lines[0] + b",embedding\r\n")
    at = 0
    for line in lines:  # each input record's own bytes, then its prediction
        assert out.startswith(line + b",", at), (line, out[at : at + len(line) + 20])
        at = out.index(b"\r\n", at + len(line)) + 2
    assert at == len(out)
    records = list(csv.reader(io.StringIO(out.decode(), newline="")))[1:]
    assert [r[5] for r in records] == rows
    assert_rows_equal(np.array([json.loads(r[-1]) for r in records], np.float32), want)

    etl.predict_file(text_pool, tmp_path / "in.csv", tmp_path / "out.parquet", chunk_rows=1000)
    table = pq.read_table(tmp_path / "out.parquet")
    for column in ("id", "zip", "when", "flag", "price", "note"):
        assert table.schema.field(column).type == pa.string(), column  # the text, as written
    assert table.column("id").to_pylist()[:2] == ["00000", "00001"]
    assert table.column("zip").to_pylist()[:2] == ["00123", "01123"]
    assert table.column("when").to_pylist()[0] == "2024-01-01"
    assert table.column("flag").to_pylist()[:2] == ["FALSE", "true"]
    assert table.column("price").to_pylist()[:2] == ["0.50", "1.50"]
    assert table.column("text").to_pylist() == rows
    assert_rows_equal(stacked(table.column("embedding")), want)


def test_an_existing_output_is_refused_unless_overwrite_or_the_same_jobs_resume(
    text_pool, models, tmp_path
):
    source, output = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(pa.table({"text": texts(100)}), source)
    output.write_bytes(b"someone else's file")
    with pytest.raises(
        etl.EtlError, match=r"output '.*out\.parquet' already exists; pass overwrite=True"
    ):
        etl.predict_file(text_pool, source, output)
    assert output.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "out.parquet"]
    etl.predict_file(text_pool, source, output, overwrite=True)
    assert_rows_equal(
        stacked(pq.read_table(output).column("embedding")), embeddings(models, texts(100))
    )

    # A job that overwrites, stopped by a bad row after two committed chunks...
    rows: list[str | None] = list(texts(6000))
    rows[5000] = None
    pq.write_table(pa.table({"text": rows}), source, row_group_size=1000)
    first = output.read_bytes()
    job = dict(chunk_rows=2048, shard_size=512)
    with pytest.raises(etl.EtlError, match=r"null value\(s\), the first at row 5000"):
        etl.predict_file(text_pool, source, output, overwrite=True, **job)
    staging = tmp_path / ".out.parquet.partial"
    committed = sorted(p.name for p in staging.glob("part-*"))
    assert len(committed) == 2 and output.read_bytes() == first
    # ...is refused without overwrite (its chunks kept), and resumed without it.
    with pytest.raises(etl.EtlError, match=r"already exists"):
        etl.predict_file(text_pool, source, output, **job)
    assert sorted(p.name for p in staging.glob("part-*")) == committed
    with pytest.raises(etl.EtlError, match=r"null value\(s\), the first at row 5000"):
        etl.predict_file(text_pool, source, output, resume=True, **job)


def test_integer_columns_feed_narrower_inputs_by_value(multi_pool, models, tmp_path):
    rng = np.random.default_rng(17)
    a = rng.integers(-1000, 1000, size=(1500, 4))  # int64: into the float32 input, exact
    b = rng.integers(-(2**31), 2**31, size=(1500, 3))  # int64 in int32's range
    want = in_process(models["multi_io"], {"a": a.astype(np.float32), "b": b.astype(np.int32)})
    parquet = pa.table({"a": etl.arrow_column(a), "b": etl.arrow_column(b)})
    assert parquet.schema.field("b").type == pa.list_(pa.int64(), 3)
    pq.write_table(parquet, tmp_path / "in.parquet", row_group_size=400)
    etl.predict_file(multi_pool, tmp_path / "in.parquet", tmp_path / "out.parquet")
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.schema.field("b").type == pa.list_(pa.int64(), 3)  # the input's type, kept
    assert out.schema.field("sum").type == pa.float32()
    assert_rows_equal(out.column("sum").to_numpy()[:, None], want["sum"])
    assert_rows_equal(stacked(out.column("logits")), want["logits"])

    names = [f"a{i}" for i in range(4)] + [f"b{i}" for i in range(3)]
    flat = pa.table(dict(zip(names, [*a.T, *b.T], strict=True)))
    pacsv.write_csv(flat, tmp_path / "in.csv")
    columns = {"a": names[:4], "b": names[4:]}
    etl.predict_file(multi_pool, tmp_path / "in.csv", tmp_path / "out.csv", columns=columns)
    with open(tmp_path / "out.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert [[int(r[n]) for n in names] for r in records] == np.hstack([a, b]).tolist()
    got_sum = np.array([float(r["sum"]) for r in records], np.float32)  # a number, not "[x]"
    assert_rows_equal(got_sum[:, None], want["sum"])

    b[1234, 1] = 2**31  # out of int32's range: refused, naming the file's row
    flat = pa.table(dict(zip(names, [*a.T, *b.T], strict=True)))
    pacsv.write_csv(flat, tmp_path / "big.csv")
    with pytest.raises(
        etl.EtlError, match=r"columns \['b0', 'b1', 'b2'\] does not fit.*2147483648.*row 1234"
    ):
        etl.predict_file(
            multi_pool, tmp_path / "big.csv", tmp_path / "o.csv", columns=columns, chunk_rows=500
        )
    floats = flat.set_column(4, "b0", pa.array(b[:, 0] + 0.5))
    pacsv.write_csv(floats, tmp_path / "floats.csv")
    with pytest.raises(etl.EtlError, match=r"column 'b0' has type double.*int32\[None, 3\]"):
        etl.predict_file(multi_pool, tmp_path / "floats.csv", tmp_path / "o.csv", columns=columns)


def test_inputs_not_named_in_columns_fall_back_to_their_columns(multi_pool, models, tmp_path):
    rng = np.random.default_rng(4)
    a = rng.normal(size=(50, 4)).astype(np.float32)
    b = rng.integers(0, 9, size=(50, 3)).astype(np.int32)
    want = in_process(models["multi_io"], {"a": a, "b": b})
    frame = pd.DataFrame({"x": list(a), "b": list(b)})
    assert_rows_equal(etl.predict(multi_pool, frame, columns={"a": "x"}), want)
    table = pa.table({"x": etl.arrow_column(a), "b": etl.arrow_column(b)})
    pq.write_table(table, tmp_path / "in.parquet")
    etl.predict_file(
        multi_pool, tmp_path / "in.parquet", tmp_path / "o.parquet", columns={"a": "x"}
    )
    assert_rows_equal(
        stacked(pq.read_table(tmp_path / "o.parquet").column("logits")), want["logits"]
    )


@pytest.fixture(scope="module")
def echo_model(tmp_path_factory) -> str:
    """A SavedModel with text outputs: ``text`` string [N] -> ``echo`` (the same bytes) and
    ``upper`` (tf.strings.upper), string [N]."""
    import tensorflow as tf

    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serve(text):
        return {"echo": tf.identity(text), "upper": tf.strings.upper(text)}

    path = str(tmp_path_factory.mktemp("echo") / "model")
    tf.saved_model.save(module, path, signatures={"serving_default": serve})
    return path


def test_text_outputs_are_parquet_text_unless_a_value_is_not_utf8(echo_model, tmp_path):
    words = [f"wörd {i}".encode() for i in range(600)]
    pq.write_table(pa.table({"text": pa.array(words, pa.binary())}), tmp_path / "in.parquet")
    with PredictionPool(echo_model, workers=1) as pool:
        etl.predict_file(pool, tmp_path / "in.parquet", tmp_path / "out.parquet", chunk_rows=200)
        out = pq.read_table(tmp_path / "out.parquet")
        assert out.schema.field("text").type == pa.binary()  # the input's type, kept
        assert out.schema.field("echo").type == pa.string()
        assert out.schema.field("upper").type == pa.string()
        want = in_process(echo_model, np.asarray(words, dtype=object))
        assert out.column("upper").to_pylist() == [w.decode() for w in want["upper"]]
        assert out.column("echo").to_pylist() == [w.decode() for w in want["echo"]]
        assert pd.read_parquet(tmp_path / "out.parquet")["upper"][1] == "WöRD 1"
        etl.predict_file(pool, tmp_path / "in.parquet", tmp_path / "out.csv", chunk_rows=200)
        with open(tmp_path / "out.csv", newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f))
        assert [r["upper"] for r in records] == [w.decode() for w in want["upper"]]

        words[450] = b"\xff\xfe not utf-8"  # in the third chunk: that output stays bytes
        pq.write_table(pa.table({"text": pa.array(words, pa.binary())}), tmp_path / "in2.parquet")
        etl.predict_file(pool, tmp_path / "in2.parquet", tmp_path / "out2.parquet", chunk_rows=200)
        out = pq.read_table(tmp_path / "out2.parquet")
        assert out.schema.field("echo").type == pa.binary()
        assert out.schema.field("upper").type == pa.binary()
        want = in_process(echo_model, np.asarray(words, dtype=object))
        assert out.column("echo").to_pylist() == list(want["echo"])
        assert out.column("upper").to_pylist() == list(want["upper"])
        with pytest.raises(etl.EtlError, match=r"column 'text' holds bytes that are not UTF-8"):
            etl.predict_file(pool, tmp_path / "in2.parquet", tmp_path / "out2.csv")
        assert not (tmp_path / "out2.csv").exists()


def test_csv_records_are_split_where_pyarrow_splits_rows(tmp_path):
    """Each record's own bytes, parsed alone by pyarrow, give its row: with quoted commas,
    quotes, line breaks in fields, literal quotes inside unquoted fields, \\r\\n, \\r and empty
    lines, whatever the read size."""
    rng = np.random.default_rng(5)
    values = ["x", "", '"q,u"', 'a""b', '"multi\nline"', '"cr\r\nlf"', "01234", 'x"y', '"a""b"']
    values += ['"x"y', "2024-01-05"]
    files = [b'\xef\xbb\xbfid,b\r\n1,2\r\n\r\n2,"a,b"\n\n3,"two\nlines"', b"a,b\n1,2\r3,4\r\n5,6"]
    for _ in range(60):
        rows = [f"{i},{values[rng.integers(len(values))]}" for i in range(rng.integers(0, 30))]
        line_break = ["\n", "\r\n"][rng.integers(2)]
        tail = ["", line_break][rng.integers(2)]
        files.append(("a,b" + line_break + line_break.join(rows) + tail).encode())
    path = tmp_path / "in.csv"
    for data in files:
        path.write_bytes(data)
        names = pacsv.read_csv(path).schema.names
        options = pacsv.ConvertOptions(column_types={n: pa.string() for n in names})
        want = pacsv.read_csv(path, convert_options=options).to_pylist()
        for block in (1, 7, 1 << 20):
            records = formats.CsvRecords(path, block=block)
            got = records.take(len(want)).to_pylist()
            assert records.exhausted()
            records.close()
            header = records.header.removeprefix(b"\xef\xbb\xbf")
            for record, row in zip(got, want, strict=True):
                alone = pacsv.read_csv(io.BytesIO(header + b"\n" + record), convert_options=options)
                assert alone.to_pylist() == [row], (data, block, record)
