"""Memory for large frames: glibc malloc tuning, and receive buffers nobody zero-fills.

A large tensor crosses the WebSocket library as thousands of short-lived buffers of about
1 MiB (socket reads, fragment payloads, unmasked copies). With glibc's defaults each of
them sits on the edge of the mmap threshold, and every free at the top of the heap gives
memory back to the kernel (trim) that the next fragment faults in again: measured on the
development machine, that halved bulk throughput. :func:`tune_malloc` keeps such buffers
on the heap and the heap from shrinking between fragments (Linux with glibc only; a no-op
elsewhere, or when ``FEDWS_MALLOC_TUNING=0`` or the user set glibc's own ``MALLOC_*_``
variables).

:func:`frame_buffer` gives the writable buffer an incoming frame is assembled into. The
codec hands large tensors out as views of it, so it cannot simply be reused; but a fresh
buffer costs more than the copy into it (``bytearray(n)`` zero-fills it, and every page of
a new mapping faults: 35-50 ms per 64 MiB here, against 6 ms to fill memory already
mapped). Frames of :data:`MAPPED_MIN_BYTES` and more therefore come from a small pool of
anonymous mappings, and a mapping is handed out again only once nothing refers to it any
more (no tensor, view or memoryview of the last frame in it is alive). The pool holds at
most ``FEDWS_FRAME_POOL_MB`` MiB of mappings (default 0, off: with it on, tests/e2e/test_memory_attacks.py::test_the_store_cap_counts_non_tensor_values_plans_and_frames_kept_alive wedges a memory-limited node; opt in with e.g. 256); beyond that a frame gets a mapping of its own, freed with its last tensor. A reused buffer still holds the
last frame's bytes, but the caller overwrites every byte it is given before anyone reads it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading

__all__ = [
    "tune_malloc",
    "frame_buffer",
    "FramePool",
    "MMAP_THRESHOLD",
    "TRIM_THRESHOLD",
    "MAPPED_MIN_BYTES",
    "MessagePool",
    "message_pool",
    "limit_message_pool",
]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""Allocations below this come from the heap (glibc's largest allowed value on 64-bit)."""
TRIM_THRESHOLD = 128 << 20
"""Free memory the heap keeps at its top instead of returning it to the kernel."""
MAPPED_MIN_BYTES = 1 << 20
"""Frames at least this large are assembled in an anonymous mapping (smaller: a bytearray)."""

_lock = threading.Lock()
_tuned: bool | None = None


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds for this process, once; True if they are set.

    Called where a process starts moving frames (the IO thread, the node's server). It only
    changes when freed memory goes back to the kernel, never what a frame may allocate:
    every size bound of the codec and the server is checked as before.
    """
    global _tuned
    with _lock:
        if _tuned is None:
            _tuned = _apply()
        return _tuned


def _apply() -> bool:
    if not sys.platform.startswith("linux") or os.environ.get("FEDWS_MALLOC_TUNING", "1") == "0":
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False  # the user tuned glibc already
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has mallopt as a stub)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


class FramePool:
    """Anonymous mappings for large frames, reused once nothing refers to them.

    Whether a mapping is free is read from its reference count: the pool's list is its only
    holder once every memoryview (and so every tensor) of the frame in it is gone. Nothing
    but those views can take a new reference to it, so a mapping seen free stays free.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._maps: list[mmap.mmap] = []
        self._lock = threading.Lock()

    @property
    def pooled_bytes(self) -> int:
        return sum(len(m) for m in self._maps)

    def release_idle(self) -> None:
        """Unmap every mapping nothing refers to (memory is short)."""
        with self._lock:
            maps = self._maps
            i = 0
            while i < len(maps):
                if _idle(maps, i):
                    maps.pop(i)
                else:
                    i += 1

    def take(self, size: int) -> memoryview:
        """A writable view of exactly ``size`` bytes (contents undefined)."""
        capacity = -(-size // _GRAIN) * _GRAIN
        with self._lock:
            maps = self._maps
            for i in range(len(maps)):
                # Exactly this capacity: a tensor kept as a view pins its whole mapping, and
                # the node's memory budget counts the frame's bytes, not a larger mapping's.
                if len(maps[i]) == capacity and _idle(maps, i):
                    return memoryview(maps[i])[:size]
            if capacity <= self.budget:
                pooled = sum(len(m) for m in maps)
                i = 0
                while pooled + capacity > self.budget and i < len(maps):
                    if _idle(maps, i):  # idle but the wrong size: make room
                        pooled -= len(maps.pop(i))
                    else:
                        i += 1
                if pooled + capacity <= self.budget:
                    maps.append(mmap.mmap(-1, capacity))
                    return memoryview(maps[-1])[:size]
        return memoryview(mmap.mmap(-1, size))  # over budget: this frame's own, unpooled


def _idle(maps: list[mmap.mmap], i: int) -> bool:
    """Whether ``maps[i]`` is referred to by nothing but the list (and this call's argument)."""
    return sys.getrefcount(maps[i]) == 2


_GRAIN = 1 << 20
_pool = FramePool(max(0, int(float(os.environ.get("FEDWS_FRAME_POOL_MB", "0")) * 2**20)))


def frame_buffer(size: int) -> bytearray | memoryview:
    """A writable buffer of ``size`` bytes whose contents are undefined until written.

    The caller bounds ``size`` (the WebSocket library refuses a message above the link's
    ``max_size`` before any of it is assembled) and writes every byte before reading any.
    """
    if size < MAPPED_MIN_BYTES:
        return bytearray(size)
    try:
        return _pool.take(size)
    except (OSError, MemoryError):  # address space or memory limit: give idle mappings back
        _pool.release_idle()
        try:
            return memoryview(mmap.mmap(-1, size))
        except OSError as exc:
            raise MemoryError(f"cannot map a {size}-byte frame: {exc}") from None


class MessagePool:
    """Private anonymous mappings that large incoming messages are read into, kept for reuse.

    A fresh mapping costs a page fault per 4 KiB page the first time it is written (35-50 ms
    per 64 MiB here, several times the copy itself); a mapping reused for the next message
    of the same size costs none. :mod:`.assembly` takes a mapping when a message starts,
    grows it (``mremap``: no copy) or shrinks it to the message's size, and gives it back
    when the message is complete; the message's tensors are views of it, and it is handed
    out again only once its reference count says nothing refers to it. At most ``budget``
    bytes of mappings are kept; a mapping that does not fit is not kept (it is unmapped with
    its last view). On an allocation failure every idle mapping is unmapped before the one
    retry, so a memory-limited process never fails for memory the pool holds idle.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._maps: list[mmap.mmap] = []
        self._lock = threading.Lock()

    @property
    def pooled_bytes(self) -> int:
        return sum(len(m) for m in self._maps)

    def take(self, size: int) -> mmap.mmap:
        """A private mapping of at least ``size`` bytes, out of the pool (contents undefined).

        The idle mapping closest in size is resized to ``size`` if it is smaller, so a run of
        messages of one size reuses the same pages.
        """
        with self._lock:
            best = -1
            for i in range(len(self._maps)):  # by index: a loop variable would be a reference
                if _idle(self._maps, i) and (
                    best < 0 or abs(len(self._maps[i]) - size) < abs(len(self._maps[best]) - size)
                ):
                    best = i
            if best >= 0:
                m = self._maps.pop(best)
                if len(m) < size:
                    try:
                        m.resize(size)
                    except (OSError, ValueError):
                        m.close()
                        self._release_idle_locked()
                        return _private(size)
                return m
        try:
            return _private(size)
        except OSError:
            self.release_idle()
            return _private(size)

    def give_back(self, m: mmap.mmap) -> None:
        """Keep ``m`` for a later message if it fits the budget (its views may still live)."""
        with self._lock:
            if sum(len(x) for x in self._maps) + len(m) <= self.budget:
                self._maps.append(m)

    def release_idle(self) -> None:
        """Unmap every mapping nothing refers to (memory is short)."""
        with self._lock:
            self._release_idle_locked()

    def _release_idle_locked(self) -> None:
        maps = self._maps
        i = 0
        while i < len(maps):
            if _idle(maps, i):
                maps.pop(i).close()
            else:
                i += 1


def _private(size: int) -> mmap.mmap:
    """Private anonymous memory: only a private mapping may grow by ``mremap`` (a shared
    one is backed by a fixed-size object, and touching the grown part raises SIGBUS)."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


message_pool = MessagePool(
    max(0, int(float(os.environ.get("FEDWS_MESSAGE_POOL_MB", "512")) * 2**20))
)
"""The process's pool for :mod:`.assembly` (``FEDWS_MESSAGE_POOL_MB``, default 512; 0: off)."""


def limit_message_pool(budget: int) -> None:
    """Keep at most ``budget`` bytes in the message pool (a node with a memory cap: idle
    pooled pages are resident but in no object's account, so they must stay small)."""
    message_pool.budget = min(message_pool.budget, max(0, budget))
    message_pool.release_idle()
