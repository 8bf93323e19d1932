"""Splitting outgoing frames into WebSocket fragments, and assembling incoming ones.

Small frames go out as one ``bytes`` (one write). Large ones go as fragments of about
1 MiB, borrowed from the tensor's memory: no join of a 64 MiB buffer, and the kernel is fed
pieces that fit its socket buffers.
"""

from __future__ import annotations

from typing import Any

from ..protocol.codec import VIEW_MIN_BYTES
from .assembly import ASSEMBLED, install
from .memory import frame_buffer

__all__ = ["fragments", "receive", "stream_sizes", "FRAGMENT", "CHUNK_BYTES"]

FRAGMENT = 1 << 20
CHUNK_BYTES = 4 << 20
"""Largest chunk of a streamed tensor (a node holds a bounded number of frames per
connection in hand, so this bounds what a stream keeps queued there)."""


def stream_sizes(own_max: int, peer_max: str | None) -> tuple[int, int]:
    """(tensor bytes above which a tensor goes in chunks, bytes per chunk) for a link.

    ``peer_max`` is the frame limit the node announced in the handshake (absent from older
    nodes, or garbage: then only our own limit counts). A chunk leaves room for the
    command around it in a frame.
    """
    limit = own_max
    if peer_max is not None and peer_max.isdigit() and len(peer_max) < 20:
        limit = min(limit, int(peer_max))
    above = max(limit // 2, 1)
    return above, max(min(CHUNK_BYTES, limit // 4), 1)


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


async def receive(ws: Any) -> bytes | bytearray | memoryview | str:
    """One whole message from ``ws``; raises ``ConnectionClosed`` when the link ends.

    Large binary messages are read by :mod:`.assembly` straight from the socket into one
    mapping of their own (installed on the connection at its first message), so the codec
    can hand out their tensors as views with no copy in between. Where that parser could
    not be installed, fragments are assembled here into one writable buffer (one copy).
    """
    state = install(ws)
    parts: list[Any] = []
    size = 0
    async for fragment in ws.recv_streaming():
        parts.append(fragment)
        size += len(fragment)
    if not parts:
        return b""
    if parts[0] is ASSEMBLED and state is not None:
        return state.ready.popleft()
    if isinstance(parts[0], str):
        return "".join(parts)
    if len(parts) == 1 and size < VIEW_MIN_BYTES:
        small: bytes = parts[0]  # small: the codec copies small tensors anyway
        return small
    buf = frame_buffer(size)
    pos = 0
    for part in parts:
        end = pos + len(part)
        buf[pos:end] = part
        pos = end
    return buf
