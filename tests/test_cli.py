"""``python -m pool predict``: one-line errors and exit codes, a million rows in bounded memory,
a kill midway and ``--resume``, and a progress bar that stays off stdout. ``inspect``: the
signatures as TensorFlow loads them, read without it. ``--version``: the package metadata's.

The runs that stream data start the command in a subprocess, as a user would; every output is
compared row by row with the model called in-process.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import default_sigint, in_process

import pool
from pool import PredictionPool, cli

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pacsv = pytest.importorskip("pyarrow.csv")

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent


def texts(stop: int, start: int = 0) -> list[str]:
    return [
        f"row {i} the quick brown fox {i % 97} jumps over {i % 13} dogs" for i in range(start, stop)
    ]


def write_texts(path: Path, rows: int, row_group_size: int = 20_000) -> None:
    """A Parquet file of ``id`` and ``text``, written a row group at a time."""
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, row_group_size):
            stop = min(rows, start + row_group_size)
            writer.write_table(
                pa.table({"id": np.arange(start, stop), "text": texts(stop, start)}, schema)
            )


def command(*args: object) -> list[str]:
    return [sys.executable, "-m", "pool", *map(str, args)]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def check_output(models, path: Path, rows: int, column: str = "embedding") -> None:
    """Every input row exactly once, in order, with the embedding the model gives in-process.

    Compared a row group at a time against in-process calls on the same strings, in big batches.
    """
    source = pq.ParquetFile(path)
    assert source.metadata.num_rows == rows
    at = 0
    for group in range(source.num_row_groups):
        table = source.read_row_group(group)
        ids = table.column("id").to_numpy()
        if ids.dtype == object:  # from a CSV input: the id's text, as written
            assert ids.tolist() == [str(i) for i in range(at, at + table.num_rows)]
            ids = ids.astype(np.int64)
        np.testing.assert_array_equal(ids, np.arange(at, at + table.num_rows))
        want_text = texts(at + table.num_rows, at)
        assert table.column("text").to_pylist() == want_text
        vectors = table.column(column).combine_chunks()
        got = vectors.flatten().to_numpy().reshape(table.num_rows, -1)
        want = in_process(models["text_embedding"], np.asarray(want_text, dtype=object))[
            "embedding"
        ]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"rows from {at}")
        at += table.num_rows
    assert at == rows


# --- errors: one line, non-zero, before any worker starts ------------------------------------


@pytest.fixture
def no_workers(monkeypatch):
    def start(self):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(PredictionPool, "start", start)


def test_help_and_the_console_script():
    done = subprocess.run(
        command("predict", "--help"), capture_output=True, text=True, env=environment(), timeout=60
    )
    assert done.returncode == 0
    assert "--resume" in done.stdout and "Exit status" in done.stdout
    script = Path(sys.executable).parent / "tf-pool"  # installed by `pip install -e .`
    if script.exists():
        done = subprocess.run([script, "predict", "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "--resume" in done.stdout


def test_one_source_for_the_version(capsys):
    """pyproject.toml's version is what the metadata, ``pool.__version__`` and ``--version``
    say (a stale editable install fails here: reinstall with ``make``)."""
    declared = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    version = importlib.metadata.version("prediction-pool")
    assert declared is not None and declared[1] == version == pool.__version__
    done = subprocess.run(
        command("--version"), capture_output=True, text=True, env=environment(), timeout=60
    )
    assert (done.returncode, done.stdout) == (0, f"prediction-pool {version}\n"), done.stderr
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"prediction-pool {version}\n"


# --- inspect -------------------------------------------------------------------------------------


def as_json(tensors) -> list[dict]:
    return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in tensors]


def test_inspect_reads_without_tensorflow_what_tensorflow_loads(models):
    """Every signature of every reference model, read from saved_model.pb in a process that
    never imports TensorFlow, equals what the workers' loader (TensorFlow, here) reports."""
    from pool import model as loader  # TensorFlow, in this process: the ground truth

    for name in ("multi_io", "text_embedding", "small_cnn", "mobilenet_v2"):
        code = (
            "import sys\nfrom pool import cli\n"
            f"code = cli.main(['inspect', {models[name]!r}, '--json'])\n"
            "assert 'tensorflow' not in sys.modules, 'inspect imported TensorFlow'\n"
            "sys.exit(code)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=environment(),
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        document = json.loads(done.stdout)
        assert (document["model"], document["source"]) == (models[name], "saved_model.pb")
        expected = ["serving_default", "checked", "scaled"] if name == "multi_io" else None
        assert list(document["signatures"]) == (expected or ["serving_default"])
        for signature, described in document["signatures"].items():
            want = loader.load(models[name], signature, None).signature
            assert described == {"inputs": as_json(want.inputs), "outputs": as_json(want.outputs)}


def test_inspect_shows_what_to_pass_to_column(models, capsys, no_workers):
    assert cli.main(["inspect", models["multi_io"]]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == f"model: {models['multi_io']} (read from saved_model.pb, without TensorFlow)"
    assert lines[2:13] == [
        "signature 'serving_default' (the default)",
        "  inputs:",
        "    a: float32[None, 4]   4 float32 values per row: a list column of 4, or 4 columns: "
        "a=C1,C2,C3,C4",
        "    b: int32[None, 3]     3 int32 values per row: a list column of 3, or 3 columns: "
        "b=C1,C2,C3",
        "  outputs:",
        "    logits: float32[None, 5]   a list column of 5 numbers (CSV: a JSON array)",
        "    sum: float32[None, 1]      a number column (its axis of size 1 dropped)",
        "  predict: python -m pool predict MODEL -i IN -o OUT --column a=COLUMN --column b=COLUMN",
        "           (without --column: the columns named 'a' and 'b')",
        "",
        "signature 'checked' (--signature checked)",
    ]
    assert (
        "  predict: python -m pool predict MODEL -i IN -o OUT --column COLUMN --signature scaled"
        in lines
    )

    assert cli.main(["inspect", models["text_embedding"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3:9] == [
        "  inputs:",
        "    text: string[None]   one text per row: a string column",
        "  outputs:",
        "    embedding: float32[None, 64]   a list column of 64 numbers (CSV: a JSON array)",
        "  predict: python -m pool predict MODEL -i IN -o OUT --column COLUMN",
        "           (without --column: the column named 'text', or the only column)",
    ]
    assert cli.main(["inspect", models["small_cnn"], "--signature", "serving_default"]) == 0
    assert (
        "    images: float32[None, 32, 32, 3]   32x32x3 float32 values per row: a nested list "
        "column (Parquet) or a .npy array" in capsys.readouterr().out.splitlines()
    )


def test_inspect_loads_with_tensorflow_what_the_file_cannot_tell(models, capsys, monkeypatch):
    """A TF Hub handle, or sparse and composite tensors, are described by TensorFlow instead."""
    from pool import model as loader

    monkeypatch.setattr(cli.etl, "read_signatures", lambda model: None)
    assert cli.main(["inspect", models["multi_io"], "--signature", "scaled", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    want = loader.load(models["multi_io"], "scaled", None).signature
    assert document["source"] == "tensorflow"
    assert document["signatures"] == {
        "scaled": {"inputs": as_json(want.inputs), "outputs": as_json(want.outputs)}
    }
    assert cli.main(["inspect", models["multi_io"], "--signature", "nope"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ModelLoadError: expected signature 'nope'; the model has ")


def test_inspect_errors_are_one_line_exit_2(models, tmp_path, capsys, no_workers):
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "nowhere")], r"model '.*nowhere' is not a SavedModel directory \(no such"),
        ([str(tmp_path / "empty")], r"is not a SavedModel directory \(no saved_model\.pb in it\)"),
        (
            [models["multi_io"], "--signature", "nope"],
            r"the model has no signature 'nope'; it has \['checked', 'scaled', 'serving_default'\]",
        ),
        ([], r"the following arguments are required: MODEL"),
    ]
    for arguments, message in cases:
        assert cli.main(["inspect", *arguments]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        (line,) = err.splitlines()
        assert re.search(message, line), line


def test_format_options_override_the_suffix(models, tmp_path, capsys, no_workers):
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "data.bin")
    arguments = ["predict", models["text_embedding"], "-i", str(tmp_path / "data.bin")]
    arguments += ["-o", str(tmp_path / "out.dat"), "--input-format", "parquet"]
    assert cli.main([*arguments, "--output-format", "csv", "-c", "nope"]) == 2
    assert "error: unknown column 'nope'" in capsys.readouterr().err  # data.bin read as Parquet
    assert cli.main([*arguments, "--output-format", "xlsx"]) == 2
    assert "invalid choice: 'xlsx'" in capsys.readouterr().err


def test_sigterm_and_ctrl_c_exit_with_one_line_and_keep_the_handlers(monkeypatch, capsys):
    before = signal.getsignal(signal.SIGTERM)

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    arguments = ["predict", "model", "-i", "in.parquet", "-o", "out.parquet"]
    for job, code, word in ((terminated, 143, "terminated"), (interrupted, 130, "interrupted")):
        monkeypatch.setattr(cli.etl, "predict_file", job)
        assert cli.main(arguments) == code
        (line,) = capsys.readouterr().err.splitlines()
        assert line == (
            f"error: {word}; out.parquet was not written, committed chunks are kept: rerun with "
            "--resume to continue"
        )
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--input", "{tmp}/missing.parquet"], r"input '.*missing\.parquet' does not exist"),
        (["--column", "nope"], r"unknown column 'nope'; .* has columns \['id', 'body', 'n'\]"),
        (
            ["--column", "n"],
            r"column 'n' has type int64, but the model's input text: string\[None\]",
        ),
        ([], r"no column named 'text' for the model's input 'text'"),
        (["--output", "{tmp}/missing/out.parquet"], r"cannot write output .*not found"),
        (["--output", "{tmp}/in.parquet/out.parquet"], r"cannot write output .*not found"),
        (["--output", "{tmp}/out.xlsx"], r"cannot tell the format of output"),
        (["--column", "body", "--output-column", "id"], r"output column 'id' already exists"),
        (["--column", "body", "--column", "text=body"], r"--column: use either NAME or"),
        (["--workers", "0"], r"argument --workers/-w: expected a positive integer, got '0'"),
        (["--frobnicate"], r"unrecognized arguments: --frobnicate"),
        (["--model", "{tmp}/nowhere"], r"model '.*nowhere' is not a SavedModel directory"),
    ],
)
def test_errors_are_one_line_exit_2_and_start_no_worker(
    models, tmp_path, capsys, no_workers, arguments, message
):
    pq.write_table(
        pa.table({"id": [1, 2], "body": ["a", "b"], "n": [3, 4]}), tmp_path / "in.parquet"
    )
    model = models["text_embedding"]
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    if arguments[:1] == ["--model"]:
        model, arguments = arguments[1], arguments[2:]
    defaults = {"--input": str(tmp_path / "in.parquet"), "--output": str(tmp_path / "out.parquet")}
    for option, value in defaults.items():
        if option not in arguments:
            arguments += [option, value]
    code = cli.main(["predict", model, *arguments])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert re.search(message, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]


def test_a_failing_model_exits_1_with_one_error_line(models, tmp_path):
    """The `checked` signature fails inside TensorFlow on a negative value: a runtime error."""
    a = np.abs(np.random.default_rng(0).normal(size=(500, 4))).astype(np.float32)
    a[321, 2] = -1.0
    values = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), 4)
    pq.write_table(pa.table({"a": values}), tmp_path / "in.parquet")
    done = subprocess.run(
        command("predict", models["multi_io"], "-i", tmp_path / "in.parquet")
        + ["-o", str(tmp_path / "out.parquet"), "--signature", "checked", "--workers", "1"]
        + ["--model-output", "checked", "--quiet"],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=240,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    (line,) = error_lines(done.stderr)
    assert line.startswith("error: WorkerError: input rows 0..499 of "), line  # the file's rows
    assert "InvalidArgumentError" in line and "wrote" not in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["in.parquet"]  # nothing committed, no staging


# --- a million rows ----------------------------------------------------------------------------


def run_measured(args: list[str], **popen: object) -> tuple[subprocess.CompletedProcess, int]:
    """Run the command; return it and the peak RSS of its own process (psutil, polled)."""
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(), **popen
    )
    me = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, me.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.01)
    out, err = process.communicate()
    return subprocess.CompletedProcess(args, process.returncode, out, err), peak


@pytest.mark.timeout(600)
def test_a_million_rows_stream_in_bounded_memory(models, tmp_path):
    """1,000,000 text rows, Parquet to Parquet: the parent's peak RSS must not grow with rows.

    Compared with the same job on the first 100,000 rows: the 900,000 extra rows carry about
    230 MB of embeddings and 60 MB of text, so a parent holding even a third of them would
    break the 80 MB margin; a streaming parent's peak depends only on chunk and shard sizes.
    """
    peaks = {}
    for rows in (100_000, 1_000_000):
        source, target = tmp_path / f"in-{rows}.parquet", tmp_path / f"out-{rows}.parquet"
        write_texts(source, rows)
        done, peaks[rows] = run_measured(
            command("predict", models["text_embedding"], "-i", source, "-o", target)
            + ["--shard-size", "4096", "--workers", "2"]
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == ""  # nothing but data in files; no bar in a pipe either
        assert "\r" not in done.stderr and "rows/s]" not in done.stderr
        assert f"wrote {rows:,} rows to {target}" in done.stderr
    print(f"peak RSS: {peaks[100_000] >> 20} MB for 100k rows, {peaks[1_000_000] >> 20} MB for 1M")
    assert peaks[1_000_000] < peaks[100_000] + (80 << 20), peaks
    assert peaks[1_000_000] < 600 << 20, peaks
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    check_output(models, tmp_path / "out-1000000.parquet", 1_000_000)


# --- killed midway, then --resume ------------------------------------------------------------


def parts(staging: Path) -> list[str]:
    return sorted(p.name for p in staging.glob("part-*")) if staging.is_dir() else []


def start_and_stop_at(args: list[str], staging: Path, parts_at_least: int, how: int) -> tuple:
    """Start the command; once ``parts_at_least`` chunks are committed, send it signal ``how``."""
    process = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
        preexec_fn=default_sigint,
    )
    deadline = time.monotonic() + 180
    while len(parts(staging)) < parts_at_least:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no chunk was committed in time"
        time.sleep(0.01)
    process.send_signal(how)
    # Reap it before reading its pipes: its workers (which share them) exit only once its pid
    # is gone, and a killed process's pid lingers as a zombie until its parent waits for it.
    process.wait(timeout=120)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


@pytest.mark.timeout(600)
def test_killed_midway_leaves_no_output_and_resume_finishes_every_row_once(models, tmp_path):
    """Ctrl-C, then SIGKILL during the resumed run, then a resume that completes the job."""
    rows = 300_000
    source, target = tmp_path / "in.parquet", tmp_path / "out.parquet"
    staging = tmp_path / ".out.parquet.partial"
    write_texts(source, rows)
    job = command("predict", models["text_embedding"], "-i", source, "-o", target)
    job += ["--shard-size", "2048", "--chunk-rows", "8192", "--workers", "2"]

    code, out, err = start_and_stop_at(job, staging, 3, signal.SIGINT)
    assert code == 130, err
    (line,) = error_lines(err)
    assert "interrupted" in line and "--resume" in line
    assert not target.exists() and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([source.name, staging.name])
    first = parts(staging)
    assert len(first) >= 3 and not (staging / "lock").exists()

    code, out, err = start_and_stop_at(job + ["--resume"], staging, len(first) + 3, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not target.exists()  # killed without any cleanup: still no partial output
    second = parts(staging)
    assert set(first) < set(second)  # the first run's chunks were kept, more were added
    assert second == [f"part-{i:06d}-8192.parquet" for i in range(len(second))]

    done = subprocess.run(
        job + ["--resume", "-v"], capture_output=True, text=True, env=environment(), timeout=300
    )
    assert done.returncode == 0, done.stderr
    committed = len(second)
    assert (
        f"resuming: {committed} chunk(s), {committed * 8192} rows, already committed" in done.stderr
    )
    assert f"{committed} chunk(s) resumed" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([source.name, target.name])
    check_output(models, target, rows)


# --- progress ---------------------------------------------------------------------------------


def test_progress_bar_on_a_terminal_and_never_on_stdout(models, tmp_path):
    """stderr on a terminal shows rows, rate and ETA; stdout (a pipe) gets nothing."""
    rows = 60_000
    source = tmp_path / "in.csv"
    pq.write_table(pa.table({"id": np.arange(rows), "text": texts(rows)}), tmp_path / "in.parquet")
    pacsv.write_csv(pq.read_table(tmp_path / "in.parquet"), source)
    target = tmp_path / "out.parquet"
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        command("predict", models["text_embedding"], "-i", source, "-o", target)
        + ["--output-column", "vector", "--chunk-rows", "8192", "--max-in-flight", "8"],
        stdout=subprocess.PIPE,
        stderr=follower,
        env=environment(),
    )
    os.close(follower)
    shown = bytearray()

    def drain() -> None:
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:
                return
            if not data:
                return
            shown.extend(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, _ = process.communicate(timeout=240)
    reader.join(timeout=10)
    os.close(leader)
    text = shown.decode(errors="replace")
    assert process.returncode == 0, text
    assert out == b""
    assert "rows/s" in text and "60.0k/60.0k" in text and "100%" in text, text
    assert pq.read_schema(target).field("id").type == pa.string()  # not read by the model
    check_output(models, target, rows, column="vector")


# --- issue 17: existing outputs, one --column among several inputs, the pool's options ---------


def test_an_existing_output_needs_overwrite_and_one_column_leaves_the_rest_to_names(
    models, tmp_path, capsys, monkeypatch
):
    rng = np.random.default_rng(11)
    a = rng.normal(size=(300, 4)).astype(np.float32)
    b = rng.integers(-50, 50, size=(300, 3))  # int64 into the int32 input
    values = {"x": a, "b": b}
    table = pa.table(
        {
            k: pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
            for k, v in values.items()
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    (tmp_path / "out.csv").write_text("keep me\n")
    argv = [
        "predict",
        models["multi_io"],
        "-i",
        tmp_path / "in.parquet",
        "-o",
        tmp_path / "out.csv",
    ]
    argv += ["--column", "a=x"]  # b: the column named b

    def start(self):
        raise AssertionError("a worker was started")

    with monkeypatch.context() as patched:
        patched.setattr(PredictionPool, "start", start)
        assert cli.main([str(v) for v in argv]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(
        r"error: output '.*out\.csv' already exists; pass overwrite=True / --overwrite to "
        r"replace it",
        lines[0],
    )
    assert (tmp_path / "out.csv").read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "out.csv"]

    options = ["--overwrite", "--workers", "1", "--threads-per-worker", "1", "--timeout", "120"]
    options += ["--max-retries", "1", "--max-batch-rows", "64", "--max-batch-bytes", "65536"]
    done = subprocess.run(
        command(*argv, *options, "--quiet"),
        capture_output=True,
        text=True,
        env=environment(),
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    want = in_process(models["multi_io"], {"a": a, "b": b.astype(np.int32)})
    out = pacsv.read_csv(tmp_path / "out.csv")
    assert out.column_names == ["x", "b", "logits", "sum"]
    assert out.schema.field("sum").type == pa.float64()  # a number column, not "[0.25]"
    got_sum = out.column("sum").to_numpy().astype(np.float32)
    np.testing.assert_allclose(got_sum[:, None], want["sum"], rtol=1e-6)
    logits = np.array([json.loads(v) for v in out.column("logits").to_pylist()], np.float32)
    np.testing.assert_allclose(logits, want["logits"], rtol=1e-6)


def test_predict_passes_the_pools_options(monkeypatch, tmp_path, capsys):
    seen: dict = {}

    def predict_file(model, input, output, **kwargs):
        seen.update(kwargs)
        raise cli.etl.EtlError("stop here")

    monkeypatch.setattr(cli.etl, "predict_file", predict_file)
    argv = ["predict", "m", "-i", "in.parquet", "-o", "out.parquet", "--threads-per-worker", "2"]
    argv += ["--inter-op-threads", "2", "--timeout", "2.5", "--max-retries", "0"]
    argv += ["--max-batch-rows", "32", "--max-batch-bytes", "1000", "--batch-timeout-micros", "5"]
    argv += ["--max-worker-memory", "1000000", "--max-shards-per-worker", "9"]
    argv += ["--start-timeout", "30", "--no-pin-cpus"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "error: stop here\n"
    assert {k: seen[k] for k in seen if k not in ("columns", "output_column")} == {
        "workers": None,
        "shard_size": None,
        "chunk_rows": None,
        "max_in_flight": None,
        "resume": False,
        "overwrite": False,
        "progress": True,
        "input_format": None,
        "output_format": None,
        "signature": "serving_default",
        "model_output": None,
        "threads_per_worker": 2,
        "inter_op_threads": 2,
        "timeout": 2.5,
        "max_retries": 0,
        "max_batch_rows": 32,
        "max_batch_bytes": 1000,
        "batch_timeout_micros": 5,
        "max_worker_memory": 1_000_000,
        "max_shards_per_worker": 9,
        "start_timeout": 30.0,
        "pin_cpus": False,
    }
    seen.clear()
    assert cli.main(["predict", "m", "-i", "in.parquet", "-o", "out.parquet"]) == 2
    assert "threads_per_worker" not in seen and "pin_cpus" not in seen  # the pool's defaults
    capsys.readouterr()
    assert cli.main([*argv[:6], "--timeout", "0"]) == 2
    assert "argument --timeout: expected seconds > 0, got '0'" in capsys.readouterr().err
