"""The README's example runs as written; a script without the __main__ guard gets a clear error."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def run_script(path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=240, env=env
    )


def test_readme_example_runs(models, tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    done = run_script(script)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[:4] == ["(8, 1000)"] * 4
    assert lines[4] == "(32, 1000) (8, 1000)"
    assert len([line for line in lines if line.startswith("WorkerStats(")]) == 2


def test_guide_quick_start_runs(models, tmp_path):
    guide = (ROOT / "docs" / "guide.md").read_text()
    section = guide[guide.index("## Quick start") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "guide_quickstart.py"
    script.write_text(code)
    done = run_script(script)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[:5] == ["(64, 10)", *["(16, 10)"] * 4], lines
    assert sorted(lines[5:7]) == ["0 (8, 10)", "1 (32, 10)"], lines  # in completion order
    assert lines[7:] == ["(8, 10)", "2"], lines


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_script_without_main_guard_gets_a_clear_error(models, tmp_path, method):
    script = tmp_path / "no_guard.py"
    script.write_text(
        "import numpy as np\n"
        "from pool import PredictionPool\n"
        f"with PredictionPool({models['small_cnn']!r}, workers=2, start_method={method!r}) as p:\n"
        "    p.predict(np.zeros((1, 32, 32, 3), np.float32))\n"
    )
    done = run_script(script)
    assert done.returncode != 0
    assert "ModelLoadError" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr.splitlines()[-1]
    # one traceback, the script's own: the workers' re-imports end quietly, without
    # multiprocessing's "bootstrapping phase" RuntimeError and its traceback from each worker
    assert done.stderr.count("Traceback (most recent call last)") == 1, done.stderr
    assert "bootstrapping phase" not in done.stderr
    assert len(done.stderr.splitlines()) < 20, done.stderr
