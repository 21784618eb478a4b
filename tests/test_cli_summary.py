"""The file job's last words: the summary counts wall time with start-up, a resumed job with
nothing left starts no worker, and an error says what ``.OUT.partial/`` keeps."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_rows_equal, in_process

from pool import PredictionPool, cli
from pool.etl.staging import Staging

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def images(n: int) -> np.ndarray:
    return np.random.default_rng(0).random((n, 32, 32, 3), dtype=np.float32)


def test_resume_with_every_row_committed_starts_no_worker(models, tmp_path, monkeypatch, capsys):
    x = images(40)
    np.save(tmp_path / "in.npy", x)
    arguments = ["predict", models["small_cnn"], "-i", str(tmp_path / "in.npy")]
    arguments += ["-o", str(tmp_path / "out.npy"), "--workers", "1", "--chunk-rows", "16"]

    def interrupted(self, total_rows):  # every chunk is committed, then Ctrl-C
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Staging, "finish", interrupted)
        assert cli.main(arguments) == 130
    assert not (tmp_path / "out.npy").exists()
    assert len(list((tmp_path / ".out.npy.partial").glob("part-*"))) == 3
    capsys.readouterr()

    def no_pool(*args, **kwargs):
        raise AssertionError("a pool was started with nothing left to compute")

    monkeypatch.setattr(PredictionPool, "start", no_pool)
    assert cli.main([*arguments, "--resume"]) == 0
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"wrote 40 rows to {tmp_path / 'out.npy'} in "), line
    assert "nothing left to compute; 3 chunk(s) resumed" in line, line
    assert_rows_equal(
        np.load(tmp_path / "out.npy"), in_process(models["small_cnn"], x)["probabilities"]
    )
    assert not (tmp_path / ".out.npy.partial").exists()


def test_the_summary_counts_wall_time_with_start_up(models, tmp_path, capsys):
    np.save(tmp_path / "in.npy", images(8))
    arguments = ["predict", models["small_cnn"], "-i", str(tmp_path / "in.npy")]
    assert cli.main([*arguments, "-o", str(tmp_path / "out.npy"), "--workers", "1"]) == 0
    line = capsys.readouterr().err.strip()
    assert ", worker start-up included (" in line and "rows/s once the workers were ready" in line
    seconds = float(line.split(" in ")[1].split(" s,")[0])
    assert seconds >= 0.5, line  # a pool start takes seconds: wall time, not compute time


def test_an_error_after_committed_chunks_says_what_partial_keeps(models, tmp_path, capsys):
    a = np.abs(np.random.default_rng(0).normal(size=(48, 4))).astype(np.float32)
    a[40, 2] = -1.0  # the `checked` signature fails inside TensorFlow on this row
    values = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), 4)
    pq.write_table(pa.table({"a": values}), tmp_path / "in.parquet")
    code = cli.main(
        ["predict", models["multi_io"], "-i", str(tmp_path / "in.parquet")]
        + ["-o", str(tmp_path / "out.parquet"), "--signature", "checked", "--workers", "1"]
        + ["--model-output", "checked", "--chunk-rows", "16", "--shard-size", "8", "--quiet"]
    )
    assert code == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    partial = tmp_path / ".out.parquet.partial"
    assert f"; {partial}/ keeps the 2 chunk(s) committed before the error: --resume" in line, line
    assert len(list(partial.glob("part-*"))) == 2
