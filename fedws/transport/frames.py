"""Splitting outgoing frames into WebSocket fragments.

Small frames go out as one ``bytes`` (one write). Large ones go as fragments of about
1 MiB, borrowed from the tensor's memory: no join of a 64 MiB buffer, and the kernel is fed
pieces that fit its socket buffers.
"""

from __future__ import annotations

__all__ = ["fragments", "FRAGMENT"]

FRAGMENT = 1 << 20


def fragments(chunks: list[bytes | memoryview]) -> bytes | list[bytes | memoryview]:
    """What to pass to ``websocket.send`` for the chunks of one frame."""
    total = 0
    for c in chunks:
        total += len(c)
    if total <= FRAGMENT:
        return b"".join(chunks)
    out: list[bytes | memoryview] = []
    small: list[bytes | memoryview] = []
    small_len = 0
    for c in chunks:
        n = len(c)
        if n < FRAGMENT // 4:
            small.append(c)
            small_len += n
            if small_len >= FRAGMENT:
                out.append(b"".join(small))
                small, small_len = [], 0
            continue
        if small:
            out.append(b"".join(small))
            small, small_len = [], 0
        mv = memoryview(c).cast("B")
        for start in range(0, n, FRAGMENT):
            out.append(mv[start : start + FRAGMENT])
    if small:
        out.append(b"".join(small))
    return out
