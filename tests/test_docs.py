"""Small promises of the docs that no other test holds: the exit statuses `predict --help`
lists, and the environment variables the guide documents."""

from __future__ import annotations

from pathlib import Path

import pytest

from pool import cli, reference_models

ROOT = Path(__file__).parent.parent


def test_predict_help_lists_both_interruption_statuses(capsys):
    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "130 interrupted by Ctrl-C, 143 stopped by SIGTERM" in text, text


def test_pool_model_cache_moves_the_reference_models(tmp_path, monkeypatch):
    monkeypatch.setenv("POOL_MODEL_CACHE", str(tmp_path))
    assert reference_models.cache_dir() == tmp_path
    monkeypatch.delenv("POOL_MODEL_CACHE")
    assert reference_models.cache_dir() == Path.home() / ".cache" / "pool" / "models"


@pytest.mark.parametrize("variable", ["POOL_MODEL_CACHE", "POOL_TF_LOGS"])
def test_environment_variables_are_documented(variable):
    assert variable in (ROOT / "docs" / "guide.md").read_text()
