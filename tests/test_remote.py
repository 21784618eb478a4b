"""A remote TF Hub handle is downloaded once, in the parent; workers load the local copy."""

from __future__ import annotations

import http.server
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_rows_equal, in_process

from pool import PredictionPool


@pytest.fixture()
def model_server(models, tmp_path):
    """An HTTP server on 127.0.0.1 serving the multi_io SavedModel as a .tar.gz; counts GETs."""
    archive = tmp_path / "site" / "multi_io.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for item in Path(models["multi_io"]).iterdir():
            tar.add(item, arcname=item.name)
    downloads: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(archive.parent), **kwargs)

        def do_GET(self):
            downloads.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/multi_io.tar.gz", downloads
    server.shutdown()
    server.server_close()


def test_remote_handle_is_downloaded_once_for_all_workers(
    model_server, models, tmp_path, monkeypatch
):
    url, downloads = model_server
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hub-cache"))
    x = {"a": np.ones((5, 4), np.float32), "b": np.arange(15, dtype=np.int32).reshape(5, 3)}
    with PredictionPool(url, workers=2, shard_size=2) as pool:
        got = pool.predict(x)
        assert [s.loads for s in pool.stats()] == [1, 1]
    assert len(downloads) == 1, downloads
    assert any((tmp_path / "hub-cache").iterdir())
    assert_rows_equal(got, in_process(models["multi_io"], x))
