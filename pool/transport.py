"""How a batch travels between the parent and a worker: one socket pair and one shared arena.

Each worker has a duplex ``multiprocessing`` connection (a Unix socket pair) and, where the OS
allows it, an **arena**: an anonymous shared-memory file (``memfd_create``) that both processes
map. The arena has two regions, one per batch a worker may hold (running + queued); in each,
the parent writes the batch's numeric inputs and the worker writes the outputs::

    parent: np.concatenate(shards, out=arena view)      one copy, straight into shared memory
      ──Batch{name: ArenaRef(offset, shape, dtype)}──▶  a few hundred bytes on the socket
    worker: np.ndarray(buffer=arena) ──▶ TensorFlow     no copy (64-byte aligned, writable)
    worker: outputs ──copy──▶ arena                     one copy
      ◀──BatchDone{name: ArenaRef}──
    parent: each shard's rows ──copy──▶ its own array   one copy, which is also the split

Why ``memfd_create``: the file has no name, so nothing is ever left in ``/dev/shm`` — not after
a crash, not after SIGKILL of a worker or of the parent — and it is not limited by the size of a
container's ``/dev/shm``. Its pages are reserved up front with ``posix_fallocate``, so a full
memory shows up as an error when the arena is made (and the pipe takes over), never as SIGBUS
on first write. The file descriptor reaches the worker over the socket (``SCM_RIGHTS``).

Anything that does not fit (string inputs, an output larger than its region, a platform
without ``memfd_create``, an arena that could not be allocated) goes on the socket instead,
pickled with protocol 5 so that large NumPy buffers are written out of band, without the
extra copies of the default pickling.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import pickle
import struct
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from .messages import ArenaRef, NewArena

log = logging.getLogger("pool")

#: Inputs and outputs start on 64-byte boundaries: TensorFlow then wraps them without a copy.
ALIGN = 64
#: Batches a worker holds at once: one running, one queued behind it.
REGIONS = 2
#: User-space copies of a shard's data on the way to the model and back (kernel copies aside).
#: Arena: into the arena (inputs); from the tensor into the arena, then out to the caller's
#: array (outputs; the tensor is read in place, not copied to NumPy first).
#: Socket: received into a buffer, made writable, copied by TensorFlow as it is not 64-byte
#: aligned (inputs); received, made writable, split out (outputs); plus two kernel copies each.
COPIES_VIA_ARENA = 1 + 2
COPIES_VIA_SOCKET = 3 + 3
_COUNT = struct.Struct("<I")


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# --- the socket: framed messages, large buffers out of band ------------------------------
def send(conn: Connection, message: Any) -> None:
    """Send ``message``; NumPy buffers above a few KiB travel as separate frames, uncopied."""
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    conn.send_bytes(_COUNT.pack(len(buffers)) + payload)
    for buffer in buffers:
        conn.send_bytes(buffer.raw())


def recv(conn: Connection) -> Any:
    """Receive one message sent by :func:`send` (raises ``EOFError`` when the peer is gone)."""
    head = conn.recv_bytes()
    (count,) = _COUNT.unpack_from(head)
    buffers = [bytearray(conn.recv_bytes()) for _ in range(count)]  # writable, like a copy
    return pickle.loads(memoryview(head)[_COUNT.size :], buffers=buffers)


# --- the arena ---------------------------------------------------------------------------
class Arena:
    """A shared-memory file mapped in this process; ``None`` from :func:`create` if unavailable."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._map = mmap.mmap(fd, size)
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)  # views are cheap slices of it

    @property
    def region_size(self) -> int:
        return self.size // REGIONS // ALIGN * ALIGN

    def region(self, index: int) -> tuple[int, int]:
        """``(start, end)`` of region ``index``."""
        start = index * self.region_size
        return start, start + self.region_size

    def view(self, ref: ArenaRef) -> np.ndarray:
        dtype = np.dtype(ref.dtype)
        stop = ref.offset + dtype.itemsize * math.prod(ref.shape)
        return self._bytes[ref.offset : stop].view(dtype).reshape(ref.shape)

    def put(self, arrays: list[np.ndarray], start: int, end: int) -> tuple[ArenaRef, int] | None:
        """Concatenate ``arrays`` (same dtype and trailing shape) into ``[start, end)``; return
        the reference and where the next array may start, or ``None`` if they do not fit."""
        first = arrays[0]
        rows = sum(len(a) for a in arrays)
        shape = (rows, *first.shape[1:])
        nbytes = first.dtype.itemsize * math.prod(shape)
        offset = align(start)
        if offset + nbytes > end:
            return None
        ref = ArenaRef(offset, shape, first.dtype.str)
        out = self.view(ref)
        if len(arrays) == 1:
            out[...] = first
        else:
            np.concatenate(arrays, axis=0, out=out)
        return ref, offset + nbytes

    def close(self) -> None:
        self._bytes = np.empty(0, np.uint8)
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere; the GC unmaps it later
            log.debug("arena still has views; leaving the unmap to the garbage collector")
        try:
            os.close(self.fd)
        except OSError:
            pass


def create(size: int) -> Arena | None:
    """A new arena of ``size`` bytes with its pages reserved, or ``None`` (then use the socket).

    ``None`` where the OS has no ``memfd_create`` (macOS, Windows) or when the memory cannot be
    reserved (``ENOSPC``/``ENOMEM``): that is logged once per pool, and nothing is left over."""
    if not hasattr(os, "memfd_create"):
        return None
    try:
        fd = os.memfd_create("pool-arena", os.MFD_CLOEXEC)
    except OSError as exc:
        log.warning("no shared memory for the batch arena (%s); using the socket", exc)
        return None
    try:
        os.posix_fallocate(fd, 0, size)  # reserve now: ENOSPC here, never SIGBUS later
        return Arena(fd, size)
    except (OSError, ValueError) as exc:
        os.close(fd)
        log.warning(
            "could not reserve %d bytes of shared memory for the batch arena (%s); batches go "
            "through the socket instead",
            size,
            exc,
        )
        return None


def send_arena(conn: Connection, arena: Arena, pid: int) -> None:
    """Hand ``arena`` to the worker at the other end of ``conn`` (its descriptor, over the
    socket); the worker maps it and closes the one it had."""
    send(conn, NewArena(arena.size))
    reduction.send_handle(conn, arena.fd, pid)


def receive_arena(conn: Connection, message: NewArena) -> Arena:
    """The worker's side of :func:`send_arena`."""
    return Arena(reduction.recv_handle(conn), message.size)
