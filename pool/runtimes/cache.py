"""The conversion cache: converted models on disk, keyed by everything that changes them.

An entry is a directory ``<root>/<runtime>-<key>/`` holding the artifact's files and a
``manifest.json`` (written last) with the SHA-256 of every file, the signature, what the
conversion measured (differences to TensorFlow, timings) or why it failed. The key hashes:
the SavedModel's content (every file under its directory), the signature name, the runtime,
the versions of the runtime, its converter and TensorFlow, the precision, the CPU's
instruction-set flags and :data:`FORMAT`.

Entries are built in a temporary directory next to them and renamed into place, under a file
lock per entry, so two pools converting the same model convert it once and a reader never
sees half an entry. An entry whose manifest is missing, unreadable, of another format or whose
files do not match their hashes is rebuilt, never loaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
#: Bump when the layout of an entry or the conversion itself changes: older entries are rebuilt.
FORMAT = 1
#: Distributions whose versions change a runtime's artifact or its numbers.
VERSIONED = {
    "tensorflow": ("tensorflow",),
    "openvino": ("openvino", "tensorflow"),
    "onnxruntime": ("onnxruntime", "tf2onnx", "onnx", "tensorflow"),
}


def cache_root() -> Path:
    """``$POOL_RUNTIME_CACHE``, else ``~/.cache/pool/runtimes``."""
    env = os.environ.get("POOL_RUNTIME_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pool" / "runtimes"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_digest(directory: str) -> str:
    """SHA-256 over every file of a SavedModel directory (relative path and content)."""
    digest = hashlib.sha256()
    root = Path(directory)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(file_digest(path).encode())
    return digest.hexdigest()


def cpu_flags() -> str:
    """The CPU's instruction-set flags (``/proc/cpuinfo``), else the machine's architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def versions(runtime: str) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in VERSIONED[runtime]:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def key_fields(model: str, signature: str, runtime: str, precision: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": model_digest(model),
        "signature": signature,
        "runtime": runtime,
        "versions": versions(runtime),
        "precision": precision,
        "cpu": hashlib.sha256(cpu_flags().encode()).hexdigest(),
    }


def entry_name(prefix: str, fields: dict[str, Any]) -> str:
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return f"{prefix}-{key[:32]}"


def read_manifest(directory: str | Path) -> dict[str, Any]:
    with open(Path(directory) / MANIFEST) as f:
        return json.load(f)


def valid_manifest(directory: Path) -> dict[str, Any] | None:
    """The entry's manifest if the entry is whole (every file matches its hash), else ``None``."""
    try:
        manifest = read_manifest(directory)
        if manifest.get("format") != FORMAT:
            return None
        for name, digest in manifest["files"].items():
            if file_digest(directory / name) != digest:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest


def write_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file of ``directory`` into the manifest and write it (last)."""
    files = {
        str(p.relative_to(directory)): file_digest(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {**manifest, "format": FORMAT, "files": files}
    with open(directory / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    return manifest


@contextlib.contextmanager
def locked(root: Path, name: str) -> Iterator[None]:
    """Hold the lock of entry ``name`` (a ``flock`` on ``<root>/.<name>.lock``)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def staging(root: Path, name: str) -> Path:
    """A fresh temporary directory beside the entry (same filesystem, so rename is atomic)."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))


def commit(staged: Path, target: Path) -> None:
    """Move a finished entry into place, replacing a broken one (call with the lock held)."""
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        os.rename(target, trash / "entry")
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(staged, target)


def pack_entry(directory: str | Path) -> dict[str, bytes]:
    """Every file of a whole entry (its manifest included), by relative path: what a worker
    without the client's cache installs with :func:`install_entry`."""
    root = Path(directory)
    if valid_manifest(root) is None:
        raise FileNotFoundError(f"the runtime cache entry {root} is not whole")
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def install_entry(files: dict[str, bytes], root: Path, name: str) -> Path:
    """Install an entry packed by :func:`pack_entry` as ``<root>/<name>`` (unless a whole one
    is there already), under the entry's lock; every file must match the manifest's hash."""
    target = root / name
    if valid_manifest(target) is not None:
        return target
    with locked(root, name):
        if valid_manifest(target) is not None:
            return target
        staged = staging(root, name)
        try:
            for relative, data in files.items():
                path = (staged / relative).resolve()
                if not path.is_relative_to(staged.resolve()):
                    raise ValueError(f"refusing to install {relative!r} outside {staged}")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            if valid_manifest(staged) is None:
                raise ValueError(
                    f"the artifact received for {name} does not match its manifest's hashes"
                )
            commit(staged, target)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    return target
