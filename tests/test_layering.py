"""The package's layers: the core (``pool/*.py``) never imports an edge (``pool.etl``,
``pool.serve``, ``pool.cluster``, ``pool.cli``); ``import pool`` loads no edge, no TensorFlow and
no optional dependency; only ``pool.model`` and ``pool.reference_models`` import TensorFlow; and
no module uses another module's private names: what one module offers another is public.

The import graph is read from the source with ``ast`` (imports at module level and inside
functions alike), so a lazy import counts as much as an eager one.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pool

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(pool.__file__).resolve().parent
#: The command lines are edges too: ``python -m pool`` and ``python -m pool.runtimes`` (the same
#: ``compile`` command, which shares ``pool.argtypes`` with the others).
EDGES = (
    "pool.etl",
    "pool.serve",
    "pool.cluster",
    "pool.cli",
    "pool.argtypes",
    "pool.__main__",
    "pool.runtimes.__main__",
)
TENSORFLOW = ("tensorflow", "tensorflow_hub", "tf_keras", "keras")
#: ``pool.runtimes.converter`` runs only as its own subprocess (the conversion to other runtimes).
TENSORFLOW_MODULES = ("pool.model", "pool.reference_models", "pool.runtimes.converter")
OPTIONAL = (
    *("pandas", "pyarrow", "tqdm", "distributed", "dask", "starlette", "uvicorn", "httpx"),
    *("openvino", "onnxruntime", "onnx", "tf2onnx"),
)
#: Documented standard-library names that happen to start with an underscore.
STDLIB_UNDERSCORE = {"os._exit", "sys._getframe"}


def is_edge(module: str) -> bool:
    return any(module == edge or module.startswith(edge + ".") for edge in EDGES)


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@dataclass(frozen=True)
class Import:
    where: str  # "pool/etl/files.py:21"
    module: str  # the module imported from, absolute: "pool.etl.formats"
    name: str | None  # the name imported from it (``from m import name``), else None


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_from(node: ast.ImportFrom, path: Path, root: Path) -> str:
    """The absolute module of ``from ... import``: ``..messages`` in pool/etl is pool.messages."""
    if not node.level:
        return node.module or ""
    name = module_name(path, root)
    package = (name if path.name == "__init__.py" else name.rpartition(".")[0]).split(".")
    anchor = package[: len(package) - (node.level - 1)]
    return ".".join([*anchor, node.module] if node.module else anchor)


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every import in ``path``, relative ones resolved, at any depth of the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [Import(where, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = imported_from(node, path, root)
            found += [Import(where, base, alias.name) for alias in node.names]
    return found


def package_modules(root: Path = PACKAGE.parent) -> dict[str, Path]:
    return {
        module_name(path, root): path
        for path in sorted((root / "pool").rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def targets(imp: Import, modules: dict[str, Path]) -> list[str]:
    """The package modules an import loads: ``from pool import etl`` loads ``pool.etl``."""
    if imp.name is not None and f"{imp.module}.{imp.name}" in modules:
        return [imp.module, f"{imp.module}.{imp.name}"]
    return [imp.module]


# --- what `import pool` loads ------------------------------------------------------------------


def loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules)))\n"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def test_import_pool_loads_no_edge_no_tensorflow_and_no_optional_dependency():
    loaded = loaded_after("import pool")
    unwanted = [
        m
        for m in loaded
        if is_edge(m) or m.partition(".")[0] in (*TENSORFLOW, *OPTIONAL) or m == "pool.model"
    ]
    assert not unwanted, f"`import pool` loaded {unwanted}"
    assert "pool.prediction_pool" in loaded  # the probe looks at the right interpreter


def test_the_edges_import_no_tensorflow_and_no_optional_dependency_until_used():
    loaded = loaded_after("import pool.etl, pool.cli")
    unwanted = [m for m in loaded if m.partition(".")[0] in (*TENSORFLOW, *OPTIONAL)]
    assert not unwanted, f"`import pool.etl, pool.cli` loaded {unwanted}"


def test_the_tests_run_against_the_installed_wheel_when_asked():
    """nox's wheel sessions set POOL_INSTALLED_WHEEL: there `pool` must not be the checkout."""
    if os.environ.get("POOL_INSTALLED_WHEEL"):
        assert PACKAGE != ROOT / "pool" and "site-packages" in PACKAGE.parts, PACKAGE
        assert (PACKAGE / "py.typed").is_file()
    else:
        assert PACKAGE.parent == ROOT, f"expected this checkout's pool, got {PACKAGE}"


# --- the import graph, read from the source -----------------------------------------------------


def test_the_core_never_imports_an_edge():
    modules = package_modules()
    assert {"pool.prediction_pool", "pool.sharding", "pool.etl.files", "pool.cli"} <= set(modules)
    wrong = [
        f"{imp.where}: {source} imports {target}"
        for source, path in modules.items()
        if not is_edge(source)
        for imp in imports_of(path, PACKAGE.parent)
        for target in targets(imp, modules)
        if is_edge(target)
    ]
    assert not wrong, "the core imports an edge:\n" + "\n".join(wrong)


def test_no_cycle_between_the_core_and_its_edges():
    """Edges import the core; were any core module to import an edge, the two would form a
    cycle. Collapse each side into one node and look for edges in both directions."""
    modules = package_modules()
    directions = set()
    for source, path in modules.items():
        for imp in imports_of(path, PACKAGE.parent):
            for target in targets(imp, modules):
                if target in modules and source != target:
                    directions.add((is_edge(source), is_edge(target)))
    assert (True, False) in directions  # the edges do use the core
    assert (False, True) not in directions


def test_only_the_model_modules_import_tensorflow():
    modules = package_modules()
    wrong = [
        f"{imp.where}: {source} imports {imp.module}"
        for source, path in modules.items()
        if source not in TENSORFLOW_MODULES
        for imp in imports_of(path, PACKAGE.parent)
        if imp.module.partition(".")[0] in TENSORFLOW
    ]
    assert not wrong, "TensorFlow imported outside pool.model:\n" + "\n".join(wrong)


# --- private names stay private -----------------------------------------------------------------


def private_uses(path: Path, root: Path, modules: dict[str, Path], strict: bool) -> list[str]:
    """Private names of another package module that ``path`` imports or reaches into.

    ``strict`` (the package itself): also any ``obj._name`` whose ``_name`` this module does not
    define itself (an attribute of another module's object, such as ``pool._settings``).
    """
    here = module_name(path, root) if path.is_relative_to(root / "pool") else None
    problems = []
    bound: dict[str, str] = {}  # local name -> package module it refers to
    for imp in imports_of(path, root):
        if not imp.module.startswith("pool"):
            continue
        for target in targets(imp, modules):
            if target != here and any(is_private(p) for p in target.split(".")):
                problems.append(f"{imp.where}: imports the private module {target}")
        if imp.name is not None and is_private(imp.name) and imp.module != here:
            problems.append(f"{imp.where}: imports {imp.module}.{imp.name}")
    tree = ast.parse(path.read_text(), str(path))
    own = private_names_defined(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                local = alias.asname or alias.name.partition(".")[0]
                if isinstance(node, ast.ImportFrom):
                    full = f"{imported_from(node, path, root)}.{alias.name}"
                    if full in modules:
                        bound[local] = full
                elif alias.name == "pool" or alias.name.startswith("pool."):
                    bound[local] = alias.name if alias.asname else "pool"
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and is_private(node.attr)):
            continue
        text = ast.unparse(node)
        base = node.value
        if isinstance(base, ast.Name) and base.id in bound and bound[base.id] != here:
            problems.append(f"{path.relative_to(root)}:{node.lineno}: uses {text}")
        elif strict and node.attr not in own:
            if text not in STDLIB_UNDERSCORE:
                problems.append(f"{path.relative_to(root)}:{node.lineno}: reaches into {text}")
    return problems


def private_names_defined(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, assignments, ``self._x = ...``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if is_private(name)}


def test_no_module_uses_another_modules_private_names():
    modules = package_modules()
    problems = [
        problem
        for path in modules.values()
        for problem in private_uses(path, PACKAGE.parent, modules, strict=True)
    ]
    assert not problems, "private names used across modules:\n" + "\n".join(problems)


def test_tests_and_benchmarks_use_only_public_names_of_the_package():
    modules = package_modules(ROOT)
    files = sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    problems = [
        problem for path in files for problem in private_uses(path, ROOT, modules, strict=False)
    ]
    assert not problems, "private names of pool used:\n" + "\n".join(problems)


def test_the_checker_finds_what_it_should(tmp_path):
    """The checks above can fail: a core module importing an edge lazily and a private name."""
    package = tmp_path / "pool"
    (package / "etl").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "etl" / "__init__.py").write_text("")
    (package / "etl" / "frames.py").write_text("def _as_list(x):\n    return [x]\n")
    (package / "sharding.py").write_text("def _cast():\n    pass\n")
    (package / "prediction_pool.py").write_text(
        "from . import sharding\n"
        "def predict(x):\n"
        "    from .etl.frames import _as_list\n"
        "    import pool.etl\n"
        "    return sharding._cast(x), x._hidden\n"
    )
    modules = package_modules(tmp_path)
    path = modules["pool.prediction_pool"]
    imported = {t for imp in imports_of(path, tmp_path) for t in targets(imp, modules)}
    assert {"pool.etl.frames", "pool.etl", "pool.sharding"} <= imported
    problems = private_uses(path, tmp_path, modules, strict=True)
    assert any("pool.etl.frames._as_list" in p for p in problems), problems
    assert any("sharding._cast" in p for p in problems), problems
    assert any("x._hidden" in p for p in problems), problems
