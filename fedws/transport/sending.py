"""Writing large binary WebSocket messages straight from the tensor's memory.

The WebSocket library copies every byte of an outgoing message once or twice: a client
masks each fragment into new ``bytes`` (``apply_mask``) and ``Frame.serialize`` copies the
result again into a ``BytesIO``; a server copies once. :func:`send_message` writes a large
message's fragments itself instead:

- unmasked (server to client): our own frame header, then the fragment's memoryview, both
  handed to the transport (uvloop keeps references and ``writev``s them: no copy at all);
- masked (client to server): the payload is XORed with the repeated mask in one numpy pass
  (64-bit words) into a pooled buffer, just after the header, and that buffer is written.

The library's state machine stays in charge: like its own fragmented ``send``, we hold
``send_in_progress`` (so its ``send`` waits and its ``close`` fails the message cleanly),
open the message and end it through the protocol object (an empty first binary fragment,
an empty final continuation), and write each of our continuation frames inside
``send_context`` (checks the connection is open, flushes anything the library queued
first, drains the transport's write buffer to its limits after). Control frames (pings,
pongs, close) may go between our frames, as RFC 6455 allows; never inside one, since each
of our frames is handed to the transport in one synchronous call.

Small messages, connections with extensions, relay channels and library versions whose
internals differ go through ``ws.send`` as before (:func:`.frames.fragments`).
"""

from __future__ import annotations

import asyncio
import secrets
import struct
import sys
import threading
from typing import Any

import numpy as np
from websockets.asyncio.connection import Connection
from websockets.frames import CloseCode
from websockets.protocol import CLIENT, OPEN

from .frames import FRAGMENT, fragments

__all__ = ["send_message", "supported", "BULK_MIN_BYTES"]

BULK_MIN_BYTES = 2 * FRAGMENT
"""Messages at least this large are written by :func:`send_message` itself."""

_CONT = 0x0
_HEAD = 16
"""Bytes before a masked payload in its buffer: room for the longest header (14), and the
payload starts 8-byte aligned for the 64-bit XOR."""


def supported(ws: Any) -> bool:
    """Whether ``ws`` is a library connection whose internals this module knows."""
    if not isinstance(ws, Connection):
        return False
    protocol = getattr(ws, "protocol", None)
    return (
        protocol is not None
        and not getattr(protocol, "extensions", True)
        and hasattr(ws, "send_in_progress")
        and hasattr(ws, "send_context")
        and hasattr(ws, "send_data")
        and hasattr(ws, "transport")
        and hasattr(protocol, "expect_continuation_frame")
        and hasattr(protocol, "send_binary")
        and hasattr(protocol, "send_continuation")
    )


async def send_message(ws: Any, chunks: list[bytes | memoryview]) -> None:
    """Send the chunks of one frame (one binary message) on ``ws``.

    Raises:
        ConnectionClosed: the connection closed (before or during the message; a message
            cut short fails the connection, so the peer never sees half of it as whole).
    """
    total = 0
    for c in chunks:
        total += len(c)
    if total < BULK_MIN_BYTES or not supported(ws):
        await ws.send(fragments(chunks))
        return
    pieces = fragments(chunks)
    assert isinstance(pieces, list)
    await _send_fragmented(ws, pieces)


async def _send_fragmented(ws: Connection, pieces: list[bytes | memoryview]) -> None:
    while ws.send_in_progress is not None:  # the library's own rule for fragmented sends
        await asyncio.shield(ws.send_in_progress)
    protocol = ws.protocol
    masked = protocol.side is CLIENT
    transport: Any = ws.transport
    two_calls = type(transport).writelines is asyncio.WriteTransport.writelines  # joins: a copy
    ws.send_in_progress = ws.loop.create_future()
    try:
        async with ws.send_context():
            protocol.send_binary(b"", fin=False)
        for piece in pieces:
            async with ws.send_context():
                if protocol.state is not OPEN or not protocol.expect_continuation_frame:
                    raise RuntimeError("the connection left the fragmented message")
                ws.send_data()  # whatever the library queued goes first, whole
                if masked:
                    transport.write(_masked_frame(piece))
                elif two_calls:
                    transport.write(_header(len(piece), False))
                    transport.write(piece)
                else:
                    transport.writelines((_header(len(piece), False), piece))
        async with ws.send_context():
            protocol.send_continuation(b"", fin=True)
    except Exception:
        # Half a message was written: the connection is unusable (as in the library).
        async with ws.send_context():
            protocol.fail(CloseCode.INTERNAL_ERROR, "error in fragmented message")
        raise
    finally:
        ws.send_in_progress.set_result(None)
        ws.send_in_progress = None
    if not masked:
        await _flushed(ws)


async def _flushed(ws: Connection) -> None:
    """Wait until the transport holds no more of the message.

    Unmasked fragments are the tensors' own memory, lent to the transport: once this
    returns, nothing refers to it, and a later in-place change cannot reach the wire.
    """
    transport: Any = ws.transport
    if transport.get_write_buffer_size() == 0 or transport.is_closing():
        return
    low, high = transport.get_write_buffer_limits()
    try:
        transport.set_write_buffer_limits(high=0, low=0)  # pauses the protocol until empty
        await ws.drain()
    except Exception:  # the connection was lost: the reader reports that
        pass
    finally:
        if not transport.is_closing():
            transport.set_write_buffer_limits(high=high, low=low)


def _header(length: int, mask: bool) -> bytes:
    bit = 0x80 if mask else 0
    if length < 126:
        return struct.pack("!BB", _CONT, bit | length)
    if length < 65536:
        return struct.pack("!BBH", _CONT, bit | 126, length)
    return struct.pack("!BBQ", _CONT, bit | 127, length)


def _masked_frame(piece: bytes | memoryview) -> memoryview:
    """Header, mask and masked payload of one continuation frame, in a pooled buffer."""
    n = len(piece)
    head = _header(n, True)
    key = secrets.token_bytes(4)
    buf = _POOL.take(_HEAD + n)
    start = _HEAD - len(head) - 4
    buf[start:_HEAD] = head + key
    src = np.frombuffer(piece, dtype=np.uint8)
    dst = np.frombuffer(buf, dtype=np.uint8, count=n, offset=_HEAD)
    words = n // 8
    if words:
        np.bitwise_xor(
            src[: words * 8].view(np.uint64),
            np.frombuffer(key * 2, dtype=np.uint64)[0],
            out=dst[: words * 8].view(np.uint64),
        )
    tail = n - words * 8
    if tail:
        np.bitwise_xor(src[words * 8 :], np.frombuffer(key * 2, dtype=np.uint8)[:tail], out=dst[words * 8 :])
    return memoryview(buf)[start : _HEAD + n]


class _Buffers:
    """A few reusable buffers for masked frames.

    A buffer is reused only once nothing else refers to it: the transport keeps a view of
    what it has not written yet (uvloop writes from our memory), and that view holds a
    reference, so the reference count says when the buffer is free again.
    """

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()  # each process's IO loop, but one pool per process

    def take(self, size: int) -> bytearray:
        with self._lock:
            for b in self._free:
                # references: the list, ``b``, getrefcount's argument
                if len(b) >= size and sys.getrefcount(b) <= 3:
                    return b
            b = bytearray(max(size, _HEAD + FRAGMENT + FRAGMENT // 4))
            if len(self._free) < self._keep:
                self._free.append(b)
            else:  # all lent out: replace the smallest in the pool by the new one
                i = min(range(len(self._free)), key=lambda j: len(self._free[j]))
                if len(self._free[i]) < len(b):
                    self._free[i] = b
            return b


_POOL = _Buffers(8)
