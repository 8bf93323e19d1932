"""Reading large binary WebSocket messages straight into one buffer.

The WebSocket library copies every byte of a large message three or four times on its way
in: the socket read is appended to its stream buffer, each fragment's payload is sliced
out of it, the server unmasks it into a new buffer, and the fragments are joined (and
``recv_streaming`` turns each into ``bytes``). :func:`install` replaces, on one
connection, the library's frame parser (a generator, sans-I/O) by :func:`_parse`, which
writes the payload of a binary message's fragments from the socket reads directly into one
anonymous mapping, unmasking each piece of socket data on the way (one pass over data
still in cache). The finished message is queued on the connection's :class:`Assembly`
and the library is handed a one-frame placeholder message (:data:`ASSEMBLED`), so
ordering, flow control and closing stay the library's; :func:`.frames.receive` swaps
the placeholder for the buffer.

Bounds are the library's: a fragment's declared length is checked against what is left of
the connection's ``max_size`` before anything is read or allocated; the mapping grows (by
``mremap``, no copy) at most to ``max_size``; a data frame where a continuation is due, a
continuation with no message, reserved bits, a bad opcode or a wrong mask bit fail the
connection with the library's close codes. Only binary messages of at least
:data:`DIRECT_MIN_BYTES` (or fragmented ones) take this path; text, control and small
frames are parsed exactly as before.
"""

from __future__ import annotations

import mmap
import struct
from collections import deque
from collections.abc import Generator
from typing import Any

from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.frames import CTRL_OPCODES, CloseCode, Frame, Opcode
from websockets.protocol import SERVER
from websockets.streams import StreamReader

from .memory import message_pool

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the C extension is missing
    from websockets.utils import apply_mask

__all__ = ["install", "Assembly", "ASSEMBLED", "DIRECT_MIN_BYTES"]

DIRECT_MIN_BYTES = 1 << 16
"""Unfragmented binary frames at least this large are read into a mapping of their own."""

ASSEMBLED = b"\x00fedws: message assembled out of band\x00"
"""Placeholder the library delivers for a message in :attr:`Assembly.ready` (by identity:
a peer's bytes are always new objects)."""

_PAGE = mmap.PAGESIZE


class Assembly:
    """Per-connection state: the messages assembled and not yet taken, in order."""

    def __init__(self) -> None:
        self.ready: deque[memoryview] = deque()


class _DirectReader(StreamReader):
    """The library's stream reader, which can write incoming data straight to a target."""

    dest: mmap.mmap | None
    pos: int
    end: int
    mask: bytes | None
    offset: int  # position of ``pos`` in the current fragment's payload (mask phase)

    def feed_data(self, data: bytes | bytearray) -> None:
        if self.eof:
            raise EOFError("stream ended")
        if self.dest is not None and not self.buffer:
            n = min(len(data), self.end - self.pos)
            view = memoryview(data)
            self._write(view[:n])
            if n == len(data):
                return
            data = view[n:]  # type: ignore[assignment]
        self.buffer += data

    def _write(self, chunk: Any) -> None:
        assert self.dest is not None
        n = len(chunk)
        if self.mask is not None:
            k = self.offset % 4
            chunk = apply_mask(chunk, self.mask[k:] + self.mask[:k])
        self.dest[self.pos : self.pos + n] = chunk
        self.pos += n
        self.offset += n
        if self.pos == self.end:
            self.dest = None


def install(ws: Any) -> Assembly | None:
    """Switch connection ``ws`` to :func:`_parse`; its :class:`Assembly`, or None if not now.

    Safe only between frames: the library's parser must be waiting for the next frame with
    nothing buffered (true right after the handshake and whenever the link is idle); else
    this returns None and the caller tries again at its next message. Connections with
    extensions (compression) are left alone.
    """
    state = getattr(ws, "_fedws_assembly", None)
    if state is not None:
        return state  # type: ignore[no-any-return]
    protocol = getattr(ws, "protocol", None)
    if (
        protocol is None
        or protocol.extensions
        or protocol.max_fragment_size is not None
        or type(protocol.reader) is not StreamReader
    ):
        return None
    if _innermost(protocol.parser) != "at_eof":
        return None
    if protocol.reader.buffer or protocol.reader.eof:
        return None
    reader: Any = protocol.reader
    reader.__class__ = _DirectReader
    reader.dest = None
    reader.pos = reader.end = reader.offset = 0
    reader.mask = None
    state = Assembly()
    protocol.parser = _parse(protocol, state)
    next(protocol.parser)
    ws._fedws_assembly = state
    return state


def _innermost(gen: Any) -> str | None:
    """Name of the generator function ``gen`` is suspended in, following ``yield from``."""
    for _ in range(8):
        inner = getattr(gen, "gi_yieldfrom", None)
        if inner is None:
            code = getattr(gen, "gi_code", None)
            return None if code is None else str(code.co_name)
        gen = inner
    return None


def _parse(protocol: Any, state: Assembly) -> Generator[None, None, None]:
    """The library's ``Protocol.parse`` loop, with binary payloads read in place."""
    reader: _DirectReader = protocol.reader
    buf: mmap.mmap | None = None  # the binary message being assembled
    size = 0
    try:
        while True:
            if (yield from reader.at_eof()):
                raise EOFError("unexpected end of stream")
            head = yield from reader.read_exact(2)
            head1, head2 = head[0], head[1]
            fin = bool(head1 & 0x80)
            if head1 & 0x70:
                raise ProtocolError("reserved bits must be 0")
            try:
                opcode = Opcode(head1 & 0x0F)
            except ValueError as exc:
                raise ProtocolError("invalid opcode") from exc
            masked = protocol.side is SERVER
            if bool(head2 & 0x80) != masked:
                raise ProtocolError("incorrect masking")
            length = head2 & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", (yield from reader.read_exact(2)))
            elif length == 127:
                (length,) = struct.unpack("!Q", (yield from reader.read_exact(8)))
            limit = protocol.max_message_size
            if limit is not None:
                used = size if buf is not None else (protocol.current_size or 0)
                if length > limit - used:
                    raise PayloadTooBig(length, limit - used)
            mask = bytes((yield from reader.read_exact(4))) if masked else None

            direct = buf is not None and opcode is Opcode.CONT
            if not direct and opcode is Opcode.BINARY and protocol.current_size is None:
                direct = not fin or length >= DIRECT_MIN_BYTES
            if buf is not None and opcode in (Opcode.TEXT, Opcode.BINARY):
                raise ProtocolError("expected a continuation frame")
            if buf is not None and opcode is Opcode.CLOSE:
                raise ProtocolError("incomplete fragmented message")

            if not direct:
                data: Any = yield from reader.read_exact(length)
                if mask is not None:
                    data = apply_mask(data, mask)
                frame = Frame(opcode, data, fin)
                if opcode in CTRL_OPCODES:
                    frame.check()
                protocol.recv_frame(frame)
                continue

            if buf is None:
                buf = message_pool.take(max(length, _PAGE) if fin else max(2 * length, 1 << 20, _PAGE))
                size = 0
            elif size + length > len(buf):
                grown = max(size + length, 2 * len(buf))
                if limit is not None:
                    grown = min(grown, max(limit, size + length))
                buf.resize(grown)  # mremap: the pages written so far are not copied
            yield from _read_into(reader, buf, size, length, mask)
            size += length
            if fin:
                if size == 0:
                    buf.close()
                    protocol.recv_frame(Frame(Opcode.BINARY, b""))
                else:
                    if len(buf) > -(-size // _PAGE) * _PAGE:
                        buf.resize(size)  # give back what doubling reserved
                    state.ready.append(memoryview(buf)[:size])
                    message_pool.give_back(buf)
                    protocol.recv_frame(Frame(Opcode.BINARY, ASSEMBLED))
                buf, size = None, 0
    except ProtocolError as exc:
        protocol.fail(CloseCode.PROTOCOL_ERROR, str(exc))
        protocol.parser_exc = exc
    except EOFError as exc:
        protocol.fail(CloseCode.ABNORMAL_CLOSURE, str(exc))
        protocol.parser_exc = exc
    except UnicodeDecodeError as exc:
        protocol.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
        protocol.parser_exc = exc
    except PayloadTooBig as exc:
        exc.set_current_size(size if buf is not None else protocol.current_size)
        protocol.fail(CloseCode.MESSAGE_TOO_BIG, str(exc))
        protocol.parser_exc = exc
    except (OSError, MemoryError, ValueError) as exc:  # no memory for the message
        protocol.fail(CloseCode.MESSAGE_TOO_BIG, "no memory for this message")
        protocol.parser_exc = exc
    except Exception as exc:
        protocol.logger.error("parser failed", exc_info=True)
        protocol.fail(CloseCode.INTERNAL_ERROR)
        protocol.parser_exc = exc
    finally:
        reader.dest = None  # also when the library drops this parser (close, failure)
    yield
    raise AssertionError("parse() shouldn't step after error")


def _read_into(
    reader: _DirectReader, buf: mmap.mmap, start: int, length: int, mask: bytes | None
) -> Generator[None, None, None]:
    """Fill ``buf[start:start + length]`` from the stream, unmasking with ``mask``."""
    reader.dest, reader.pos, reader.end, reader.mask, reader.offset = buf, start, start + length, mask, 0
    if length == 0:
        reader.dest = None
        return
    have = min(len(reader.buffer), length)
    if have:
        with memoryview(reader.buffer) as view:
            reader._write(view[:have])
        del reader.buffer[:have]
    while reader.dest is not None:
        if reader.eof:
            raise EOFError(f"stream ends after {reader.pos - start} bytes, expected {length} bytes")
        yield
