"""Sessions for the supported Pythons (``make test`` runs ``wheel``; see docs/guide.md).

- ``wheel-3.10``, ``wheel-3.13`` (the oldest and newest supported): build the wheel, install it
  *alone* into a fresh virtual environment, run ``scripts/smoke_wheel.py`` from a temporary
  directory (import, ``--version``, ``inspect``, a prediction on a reference model), then add the
  ``test`` extra and run the quick subset of the suite (``QUICK``) against the installed wheel.
  The full suite runs on the development Python in ``.venv`` (``make test``).
- ``tests-3.10`` ... ``tests-3.13``: the whole suite against the installed wheel, on demand.

Interpreters are found in pyenv's versions directory (``$PYENV_ROOT/versions/3.10.*``), else
on ``PATH`` (``python3.10``). A missing interpreter is an error, never a skip. Nothing but
packages is downloaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
OLDEST, NEWEST = "3.10", "3.13"
SUPPORTED = ["3.10", "3.11", "3.12", "3.13"]

#: The quick subset run on every supported Python besides the full suite on one: the layering
#: and packaging checks, the reference models, and the core, ETL and command line end to end
#: (the README's example; frames, streams and files through pools of the reference models).
QUICK = [
    "tests/test_layering.py",
    "tests/test_reference_models.py",
    "tests/test_quickstart.py::test_readme_example_runs",
    "tests/test_cli.py::test_one_source_for_the_version",
    "tests/test_cli.py::test_inspect_shows_what_to_pass_to_column",
    "tests/test_etl.py::test_predict_accepts_series_and_dataframes",
    "tests/test_etl.py::test_multi_input_frames",
    "tests/test_etl.py::test_map_batches_pandas_keeps_order_index_and_inputs",
    "tests/test_etl.py::test_parquet_to_parquet_keeps_rows_order_and_metadata",
]

nox.options.sessions = ["wheel"]
nox.options.error_on_missing_interpreters = True
nox.options.download_python = "never"
nox.options.default_venv_backend = "venv"


def _expose_pyenv_interpreters() -> None:
    """Put ``pythonX.Y`` of pyenv's installed versions first on PATH (only those names, so
    ``python``/``pip`` keep their meaning). pyenv's shims are not enough: a shim of a version
    that is not selected fails when run."""
    versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    links = ROOT / ".nox" / "pythons"
    links.mkdir(parents=True, exist_ok=True)
    for version in SUPPORTED:
        found = sorted(versions.glob(f"{version}.*/bin/python{version}"))
        link = links / f"python{version}"
        link.unlink(missing_ok=True)
        if found:
            link.symlink_to(found[-1])
    os.environ["PATH"] = f"{links}{os.pathsep}{os.environ.get('PATH', '')}"


_expose_pyenv_interpreters()


def _build_wheel(session: nox.Session) -> Path:
    """The wheel users get, built from this checkout (once per session, in isolation)."""
    out = Path(session.create_tmp()).resolve() / "dist"
    shutil.rmtree(out, ignore_errors=True)
    session.run(
        "python", "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(ROOT)
    )
    (wheel,) = out.glob("prediction_pool-*.whl")
    return wheel


def _pytest(session: nox.Session, *tests: str) -> None:
    """Run pytest on the installed wheel: from a temporary directory, with the console script
    (not ``python -m``), so the checkout is not on ``sys.path``; only ``tests/`` is."""
    session.chdir(session.create_tmp())
    session.run(
        "pytest",
        "--rootdir",
        str(ROOT),
        "-c",
        str(ROOT / "pyproject.toml"),
        "-p",
        "no:cacheprovider",
        "-q",
        "--disable-warnings",  # TensorFlow's deprecation warnings, hundreds per run
        *(str(ROOT / t) for t in tests),
        *session.posargs,
        env={"POOL_INSTALLED_WHEEL": "1"},
    )


@nox.session(python=[OLDEST, NEWEST])
def wheel(session: nox.Session) -> None:
    """Build the wheel, smoke-test it alone in a fresh venv, then run the quick subset."""
    wheel = _build_wheel(session)
    session.install(str(wheel))  # the declared dependencies only: a missing one fails here
    session.chdir(session.create_tmp())
    session.run("python", str(ROOT / "scripts" / "smoke_wheel.py"))
    session.install(f"{wheel}[test]")
    _pytest(session, *QUICK)


@nox.session(python=SUPPORTED)
def tests(session: nox.Session) -> None:
    """The whole suite against the installed wheel (long: run it on demand)."""
    wheel = _build_wheel(session)
    session.install(f"{wheel}[test]")
    _pytest(session, "tests")
