"""Memory for large frames: glibc malloc tuning, and receive buffers nobody zero-fills.

A large tensor crosses the WebSocket library as thousands of short-lived buffers of about
1 MiB (socket reads, fragment payloads, unmasked copies). With glibc's defaults each of
them sits on the edge of the mmap threshold, and every free at the top of the heap gives
memory back to the kernel (trim) that the next fragment faults in again: measured on the
development machine, that halved bulk throughput. :func:`tune_malloc` keeps such buffers
on the heap and the heap from shrinking between fragments (Linux with glibc only; a no-op
elsewhere, or when ``FEDWS_MALLOC_TUNING=0`` or the user set glibc's own ``MALLOC_*_``
variables).

:func:`frame_buffer` gives the writable buffer an incoming frame is assembled into (when
:mod:`.assembly` cannot read it in place). The codec hands large tensors out as views of it,
so it cannot simply be reused; but a fresh buffer costs more than the copy into it
(``bytearray(n)`` zero-fills it, and every page of a new mapping faults: 35-50 ms per 64 MiB
here, against 6 ms to fill memory already mapped). Frames of :data:`MAPPED_MIN_BYTES` and more
therefore come from :data:`message_pool`, whose mappings are handed out again only once
nothing refers to them (no tensor, view or memoryview of the last frame in them is alive).
A reused buffer still holds the last frame's bytes, but the caller overwrites every byte it
is given before anyone reads it.
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


def _idle(maps: list[mmap.mmap], i: int) -> bool:
    """Whether ``maps[i]`` is referred to by nothing but the list (and this call's argument)."""
    return sys.getrefcount(maps[i]) == 2


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


def frame_buffer(size: int) -> bytearray | memoryview:
    """A writable buffer of ``size`` bytes whose contents are undefined until written.

    The caller bounds ``size`` (the WebSocket library refuses a message above the link's
    ``max_size`` before any of it is assembled) and writes every byte before reading any.
    Large ones are mappings of :data:`message_pool`, cut to exactly ``size`` (a tensor kept
    as a view pins its whole mapping, and a node's memory budget counts frame bytes).
    """
    if size < MAPPED_MIN_BYTES:
        return bytearray(size)
    try:
        m = message_pool.take(size)
        if len(m) != size:
            m.resize(size)  # private and idle: mremap, no copy
    except (OSError, ValueError, MemoryError) as exc:
        raise MemoryError(f"cannot map a {size}-byte frame: {exc}") from None
    message_pool.give_back(m)  # handed out again only once no view of this frame is left
    return memoryview(m)


def limit_message_pool(budget: int) -> None:
    """Keep at most ``budget`` bytes in the message pool (a node with a memory cap: idle
    pooled pages are resident but in no object's account, so they must stay small)."""
    message_pool.budget = min(message_pool.budget, max(0, budget))
    message_pool.release_idle()
