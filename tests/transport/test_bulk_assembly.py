"""Large binary messages read straight into one mapping (fedws/transport/assembly.py).

Real WebSocket connections on 127.0.0.1 (server and client of the websockets library, with
fedws's ``receive`` on both ends): exact bytes for every dtype, non-contiguous tensors,
odd sizes and fragment boundaries that cut elements, hostile frames refused with the
library's close codes and the server still serving.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import pytest
import torch
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from fedws.protocol import codec
from fedws.transport.frames import fragments, receive

MAX = 16 << 20


async def _echo(ws: ServerConnection) -> None:
    try:
        while True:
            message = await receive(ws)
            await ws.send(fragments([memoryview(message)]) if not isinstance(message, str) else message)
    except ConnectionClosed:
        pass


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with serve(_echo, "127.0.0.1", 0, compression=None, max_size=MAX) as server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _client(url: str) -> ClientConnection:
    return await connect(url, compression=None, max_size=MAX)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64]


@pytest.mark.asyncio
async def test_every_dtype_and_odd_shapes_come_back_exact(url: str) -> None:
    ws = await _client(url)
    try:
        g = torch.Generator().manual_seed(0)
        for dtype in DTYPES:
            for n in (1, 16_385, 300_001, (1 << 20) + 3):  # single frames and fragmented, odd sizes
                t = (torch.randn(n, generator=g) * 100).to(dtype)
                back = codec.decode(await _round_trip(ws, codec.encode([t])))
                assert back[0].dtype == dtype and torch.equal(back[0], t)
        base = torch.randn(700, 900, generator=g)
        for t in (base.t(), base[::3, 1::2], base[:, 5]):  # non-contiguous
            [back] = codec.decode(await _round_trip(ws, codec.encode([t])))
            assert torch.equal(back, t)
    finally:
        await ws.close()


async def _round_trip(ws: ClientConnection, chunks: list[bytes | memoryview]) -> memoryview | bytes:
    await ws.send(fragments(chunks))
    got = await receive(ws)
    assert not isinstance(got, str)
    return memoryview(got)


@pytest.mark.asyncio
async def test_fragments_not_aligned_to_elements(url: str) -> None:
    ws = await _client(url)
    try:
        data = torch.randn(1_000_003, generator=torch.Generator().manual_seed(1)).numpy().tobytes()
        for step in (1, 7, 4097, 65_537, 999_999):  # fragment sizes that cut float32 elements
            pieces = [data[i : i + step] for i in range(0, min(len(data), step * 40), step)]
            await ws.send(pieces)
            got = await receive(ws)
            assert bytes(got) == b"".join(pieces)
        await ws.send(b"small")
        assert bytes(await receive(ws)) == b"small"
        await ws.send("text too")
        assert await receive(ws) == "text too"
    finally:
        await ws.close()


def _frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes = b"\x01\x02\x03\x04", length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


async def _raw_attack(url: str, frames: bytes) -> int | None:
    """Send raw frames after a proper handshake; the close code the server answers with."""
    ws = await _client(url)
    big = b"x" * 70_000
    await ws.send(big)  # the server's parser is switched by now
    assert bytes(await receive(ws)) == big
    transport = ws.transport
    transport.write(frames)
    try:
        await asyncio.wait_for(ws.wait_closed(), 10)
    finally:
        transport.abort()
    return ws.close_code


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("frames", "code"),
    [
        (_frame(0x2, b"", length=MAX + 1), 1009),  # declared over max_size: refused before reading
        (_frame(0x2, b"a" * 1000, fin=False) + _frame(0x0, b"", fin=False, length=MAX), 1009),  # the sum is over
        (_frame(0x2, b"a" * 1000, fin=False) + _frame(0x2, b"b"), 1002),  # a new message mid-message
        (_frame(0x0, b"c" * 70_000), 1002),  # a continuation with no message
        (_frame(0x2, b"a" * 1000, fin=False) + _frame(0x8, b"\x03\xe8"), 1002),  # close mid-message
        (bytes([0x82 | 0x40, 0x80 | 5]) + b"\x00" * 9, 1002),  # reserved bit
        (bytes([0x82, 5]) + b"abcde", 1002),  # unmasked from a client
        (_frame(0x2, b"a" * 200, fin=False) + _frame(0x9, b"p" * 126), 1002),  # control frame too long
    ],
)
async def test_hostile_frames_are_refused_and_the_server_keeps_serving(url: str, frames: bytes, code: int) -> None:
    assert await _raw_attack(url, frames) == code
    ws = await _client(url)
    try:
        t = torch.arange(300_000, dtype=torch.int32)
        [back] = codec.decode(await _round_trip(ws, codec.encode([t])))
        assert torch.equal(back, t)
    finally:
        await ws.close()


@pytest.mark.asyncio
async def test_ping_between_fragments_is_answered_and_the_message_is_whole(url: str) -> None:
    ws = await _client(url)
    try:
        first = b"a" * 100_000
        rest = b"b" * 50_001
        ws.transport.write(_frame(0x2, first, fin=False) + _frame(0x9, b"hi") + _frame(0x0, rest))
        got = await receive(ws)
        assert bytes(got) == first + rest
    finally:
        await ws.close()
