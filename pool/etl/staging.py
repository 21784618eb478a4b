"""The staging directory ``.OUT.partial/`` next to the output: lock, manifest, commit, assembly.

Commit and resume. Chunk ``k`` holds input rows ``[k * chunk_rows, (k + 1) * chunk_rows)``. It
is written to a temporary name in the staging directory ``.OUT.partial/`` next to the output,
flushed to disk, and renamed to ``part-<k>-<rows><suffix>``: a part exists under its final name
only complete, and its name says how many rows it holds. ``manifest.json`` records what the job
is (input path, size and mtime, model, columns, formats, ``chunk_rows``). ``resume=True`` checks
the manifest against the new call, keeps the parts ``0..k-1`` present with the expected row
counts, and starts reading at row ``k * chunk_rows``: nothing committed is recomputed, nothing
uncommitted is skipped. When the input is exhausted the parts are concatenated in order into a
temporary file inside the staging directory, which is renamed over ``OUT`` (same directory, so
the rename is atomic) before the staging directory is removed. ``OUT`` therefore only ever
appears complete. A ``lock`` file holding the owner's pid keeps two jobs off one output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from .common import EtlError, fsync_path, log, return_free_memory


class Staging:
    """``.OUT.partial/`` next to the output: lock, manifest, committed parts, assembly."""

    def __init__(self, output: Path, sink: Any) -> None:
        self.output = output
        self.dir = output.parent / f".{output.name}.partial"
        self.sink = sink
        self._locked = False
        self._part = re.compile(r"part-(\d{6,})-(\d+)" + re.escape(sink.suffix))

    # lock ----------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Create the directory and take its lock; ``EtlError`` if unwritable or taken."""
        try:
            self.dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise EtlError(f"cannot write output {str(self.output)!r}: {exc.strerror}") from None
        lock = self.dir / "lock"
        me = psutil.Process()
        record = json.dumps({"pid": me.pid, "create_time": me.create_time()})
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner(lock)
                if owner is not None:
                    raise EtlError(
                        f"output {str(self.output)!r} is being written by another job (pid "
                        f"{owner}); wait for it, or remove {lock} if that job is gone"
                    ) from None
                lock.unlink(missing_ok=True)  # stale: its owner died
                continue
            except OSError as exc:
                raise EtlError(
                    f"cannot write output {str(self.output)!r}: {exc.strerror}"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(record)
            self._locked = True
            return
        raise EtlError(f"cannot lock {lock}")

    @staticmethod
    def _owner(lock: Path) -> int | None:
        """The pid of a live process holding ``lock``, else ``None``."""
        try:
            record = json.loads(lock.read_text())
            owner = psutil.Process(record["pid"])
            if abs(owner.create_time() - record["create_time"]) < 1e-3:
                return owner.pid
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            pass
        return None

    def release(self) -> None:
        """Drop the lock; remove the directory if it holds no committed work."""
        if not self._locked:
            return
        self._locked = False
        (self.dir / "lock").unlink(missing_ok=True)
        if self.dir.is_dir() and not self.parts():  # nothing to resume: leave nothing behind
            shutil.rmtree(self.dir, ignore_errors=True)

    # manifest ------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / "manifest.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("ignoring an unreadable manifest in %s", self.dir)
            return None

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        self._write_atomically(
            "manifest.json", lambda path: path.write_text(json.dumps(manifest, indent=1))
        )

    def clear(self) -> int:
        """Remove everything but the lock; return how many committed parts were dropped."""
        dropped = 0
        for entry in self.dir.iterdir():
            if entry.name == "lock":
                continue
            dropped += bool(self._part.fullmatch(entry.name))
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return dropped

    # parts ---------------------------------------------------------------------------------
    def committed(self, chunk_rows: int, total_rows: int | None) -> list[int]:
        """Row counts of the parts ``0..k-1`` that are committed; later or stray files go."""
        found: dict[int, tuple[int, Path]] = {}
        for entry in self.dir.iterdir():
            match = self._part.fullmatch(entry.name)
            if match:
                found[int(match[1])] = (int(match[2]), entry)
            elif entry.name.startswith(".tmp-"):
                entry.unlink()  # a write the previous run did not finish
        rows: list[int] = []
        while len(rows) in found:
            count = found[len(rows)][0]
            if total_rows is not None:
                expected = min(chunk_rows, total_rows - len(rows) * chunk_rows)
                if count != expected or expected <= 0:
                    break
            elif count > chunk_rows or (count < chunk_rows and len(rows) + 1 in found):
                break
            rows.append(count)
            if count < chunk_rows:  # the short last chunk: the input ended there
                break
        for index, (_, path) in found.items():
            if index >= len(rows):
                path.unlink()
        return rows

    def commit(self, index: int, rows: int, pieces: Sequence[Any], outputs: Sequence[Any]) -> None:
        name = f"part-{index:06d}-{rows}{self.sink.suffix}"
        self._write_atomically(name, lambda path: self.sink.write_part(pieces, outputs, path))
        log.debug("committed chunk %d (%d rows) of %s", index, rows, self.output)
        return_free_memory()

    def partitions(self, expected: Sequence[int | None]) -> dict[int, int]:
        """``{partition: rows}`` of the parts a cluster job's workers committed (any of them,
        not only a prefix: they run in parallel). A part whose row count differs from
        ``expected[index]`` (``None``: any count), a part beyond the plan and any ``.tmp-``
        file (a write a killed worker did not finish) are deleted."""
        found: dict[int, int] = {}
        for entry in self.dir.iterdir():
            match = self._part.fullmatch(entry.name)
            if match:
                index, rows = int(match[1]), int(match[2])
                wanted = expected[index] if index < len(expected) else -1
                if index in found or (wanted is not None and wanted != rows):
                    entry.unlink()
                else:
                    found[index] = rows
            elif entry.name.startswith(".tmp-"):
                entry.unlink()
        return found

    def publish(self, assembled: Path) -> None:
        """Rename ``assembled`` (the output, written in the staging directory by a cluster
        worker) over the output, atomically, and clean up."""
        self._commit(assembled)

    def parts(self) -> list[Path]:
        numbered = []
        for entry in self.dir.iterdir():
            match = self._part.fullmatch(entry.name)
            if match:
                numbered.append((int(match[1]), entry))
        return [path for _, path in sorted(numbered)]

    def _write_atomically(self, name: str, write: Any) -> None:
        temporary = self.dir / f".tmp-{name}"
        try:
            write(temporary)
            fsync_path(temporary)
            os.replace(temporary, self.dir / name)
        finally:
            temporary.unlink(missing_ok=True)
        fsync_path(self.dir)

    # the end -------------------------------------------------------------------------------
    def finish(self, total_rows: int) -> None:
        """Concatenate the parts into a temporary file, rename it over the output, clean up."""
        temporary = self.dir / f".tmp-output{self.sink.suffix}"
        parts = self.parts()
        return_free_memory()
        try:
            self.sink.assemble(parts, temporary, total_rows)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        self._commit(temporary)

    def _commit(self, complete: Path) -> None:
        """Rename ``complete`` (the whole output, in the staging directory) over the output,
        durably and atomically, then remove the staging directory."""
        try:
            fsync_path(complete)
            os.replace(complete, self.output)
        finally:
            complete.unlink(missing_ok=True)
        fsync_path(self.output.parent)
        self._locked = False
        shutil.rmtree(self.dir, ignore_errors=True)


def write_part(directory: Path, index: int, rows: int, suffix: str, write: Any) -> Path:
    """Write part ``index`` of ``rows`` rows with ``write(path)`` into a staging directory:
    to a temporary name of its own (two runs of one partition never share one), flushed, then
    renamed to ``part-<index>-<rows><suffix>``: the part exists under its final name complete.
    What a cluster worker does for its partition."""
    name = f"part-{index:06d}-{rows}{suffix}"
    temporary = directory / f".tmp-{uuid.uuid4().hex}-{name}"
    try:
        write(temporary)
        fsync_path(temporary)
        os.replace(temporary, directory / name)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_path(directory)
    return directory / name
