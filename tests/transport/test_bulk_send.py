"""Large binary messages written from the tensor's memory (fedws/transport/sending.py).

Real WebSocket connections on 127.0.0.1: the library's server and client with fedws's
``send_message``/``receive`` on both ends (both directions: the client masks, the server
does not), and a real node process (uvloop on both sides, the transport holding our
buffers by reference). Exact bytes for every dtype, non-contiguous tensors, odd sizes and
fragment boundaries; pings and a close arriving during a large send; a connection lost
mid-send fails cleanly with nothing delivered; small messages, relay channels and unknown
connections take the library's own ``send``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import torch
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

import fedws as sy
from fedws.launch import NodeProcess, start_node
from fedws.protocol import codec
from fedws.transport import sending
from fedws.transport.frames import FRAGMENT, receive
from fedws.transport.sending import BULK_MIN_BYTES, send_message, supported

MAX = 64 << 20

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64]


class _Server:
    """Echoes every message back through ``send_message``; remembers what arrived whole."""

    def __init__(self) -> None:
        self.received: list[int] = []

    async def handler(self, ws: ServerConnection) -> None:
        try:
            while True:
                message = await receive(ws)
                assert not isinstance(message, str)
                self.received.append(len(message))
                await send_message(ws, [memoryview(message)])
        except ConnectionClosed:
            pass


@pytest.fixture
async def server() -> AsyncIterator[tuple[_Server, str]]:
    s = _Server()
    async with serve(s.handler, "127.0.0.1", 0, compression=None, max_size=MAX) as srv:
        yield s, f"ws://127.0.0.1:{srv.sockets[0].getsockname()[1]}"


async def _client(url: str) -> ClientConnection:
    ws = await connect(url, compression=None, max_size=MAX, write_limit=1 << 20)
    assert supported(ws)
    return ws


async def _round_trip(ws: ClientConnection, chunks: list[bytes | memoryview]) -> bytes:
    await send_message(ws, chunks)
    got = await receive(ws)
    assert not isinstance(got, str)
    return bytes(got)


@pytest.mark.asyncio
async def test_exact_bytes_both_directions_at_every_fragment_boundary(server: tuple[_Server, str]) -> None:
    _, url = server
    ws = await _client(url)
    try:
        g = torch.Generator().manual_seed(1)
        for n in (BULK_MIN_BYTES - 1, BULK_MIN_BYTES, BULK_MIN_BYTES + 1, 3 * FRAGMENT + 7, 5 * FRAGMENT - 3):
            body = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes()
            for chunks in ([body], [b"head", memoryview(body), b"tail"], [b"x" * 1000, memoryview(body)[3:]]):
                assert await _round_trip(ws, list(chunks)) == b"".join(bytes(c) for c in chunks)
    finally:
        await ws.close()


@pytest.mark.asyncio
async def test_every_dtype_and_non_contiguous_tensors_come_back_exact(server: tuple[_Server, str]) -> None:
    _, url = server
    ws = await _client(url)
    try:
        g = torch.Generator().manual_seed(0)
        for dtype in DTYPES:
            t = (torch.randn(BULK_MIN_BYTES // 2 + 3, generator=g) * 100).to(dtype)  # ≥ 2 MiB for every dtype
            [back] = codec.decode(await _round_trip(ws, codec.encode([t])))
            assert back.dtype == dtype and torch.equal(back, t)
        base = torch.randn(1500, 1100, generator=g)
        for t in (base.t(), base[::2, 1::1], base[:, 5:]):
            [back] = codec.decode(await _round_trip(ws, codec.encode([t])))
            assert torch.equal(back, t)
    finally:
        await ws.close()


@pytest.mark.asyncio
async def test_pings_during_a_large_send_are_answered_and_the_message_is_whole(server: tuple[_Server, str]) -> None:
    _, url = server
    ws = await _client(url)
    try:
        body = torch.randn(4 << 20).numpy().tobytes()  # 16 MiB: many fragments, flow control waits
        sending_task = asyncio.create_task(send_message(ws, [body]))
        await asyncio.sleep(0)
        pongs = [await ws.ping() for _ in range(3)]  # go out between our frames
        await sending_task
        assert bytes(await receive(ws)) == body
        await asyncio.wait_for(asyncio.gather(*pongs), 10)
        assert all(p.done() for p in pongs)
    finally:
        await ws.close()


@pytest.mark.asyncio
async def test_a_close_during_a_large_send_fails_it_cleanly(server: tuple[_Server, str]) -> None:
    srv, url = server
    ws = await _client(url)
    body = bytes(32 << 20)
    sending_task = asyncio.create_task(send_message(ws, [body]))
    await asyncio.sleep(0)
    await ws.close()  # the library fails a fragmented message in progress (1011)
    with pytest.raises(ConnectionClosed):
        await sending_task
    assert ws.close_code in (1006, 1011)  # failed by the library: its close frame, no handshake
    assert srv.received == []  # nothing arrived as a whole message
    ws2 = await _client(url)  # the server serves the next connection
    try:
        assert await _round_trip(ws2, [body[: 3 << 20]]) == body[: 3 << 20]
    finally:
        await ws2.close()


@pytest.mark.asyncio
async def test_a_connection_lost_mid_send_raises_connection_closed_and_delivers_nothing(
    server: tuple[_Server, str],
) -> None:
    srv, url = server
    ws = await _client(url)
    body = bytes(32 << 20)
    sending_task = asyncio.create_task(send_message(ws, [body]))
    await asyncio.sleep(0)
    ws.transport.abort()
    with pytest.raises(ConnectionClosed):
        await sending_task
    assert ws.send_in_progress is None  # released for the library
    await asyncio.sleep(0.05)  # let the server see the loss (nothing to await on its side)
    assert srv.received == []


@pytest.mark.asyncio
async def test_a_send_waits_for_a_fragmented_send_in_progress(server: tuple[_Server, str]) -> None:
    _, url = server
    ws = await _client(url)
    try:
        a, b = bytes(range(256)) * (12 << 12), b"\x07" * (5 << 20)
        await asyncio.gather(send_message(ws, [a]), send_message(ws, [b]), ws.send(b"small"))
        got = {bytes(await receive(ws)) for _ in range(3)}
        assert got == {a, b, b"small"}
    finally:
        await ws.close()


class _Channel:
    """Neither a library connection nor one of its subclasses (a relay channel, say)."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send(self, message: Any) -> None:
        self.sent.append(message)


@pytest.mark.asyncio
async def test_small_messages_and_unknown_connections_take_the_librarys_send() -> None:
    ch = _Channel()
    assert not supported(ch)
    body = bytes(BULK_MIN_BYTES * 2)
    await send_message(ch, [b"a", memoryview(body)])
    assert len(ch.sent) == 1 and isinstance(ch.sent[0], list)  # fragments(), as before
    assert b"".join(bytes(p) for p in ch.sent[0]) == b"a" + body
    await send_message(ch, [b"small"])
    assert ch.sent[1] == b"small"


def test_masked_buffers_are_reused_only_when_nothing_refers_to_them() -> None:
    pool = sending._Buffers(2)
    a = pool.take(100)
    lent = memoryview(a)[10:20]  # what a transport keeps of a frame it has not written
    b = pool.take(100)
    assert b is not a
    del lent
    assert pool.take(100) in (a, b)


# -- a real node: uvloop on both sides, the transport writes from our memory -----------------


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    n = start_node(id="bulk-send", port=0, extra_args=["--threads", "1"])
    try:
        yield n
    finally:
        n.stop()


def test_a_real_node_gets_and_returns_large_tensors_exactly(node: NodeProcess) -> None:
    w = sy.connect(node.url, hook=sy.TorchHook(torch, federation=sy.Federation()), timeout=30.0)
    try:
        g = torch.Generator().manual_seed(2)
        tensors = [(torch.randn(3 * FRAGMENT // 4 + 5, generator=g) * 50).to(d) for d in DTYPES]
        tensors.append(torch.randn(1400, 1300, generator=g)[:, 3:].t())  # non-contiguous, ~7 MiB
        ptrs = [t.send(w) for t in tensors]  # pipelined: masked buffers in flight together
        for t, p in zip(tensors, ptrs):
            back = p.get()
            assert back.dtype == t.dtype and torch.equal(back, t)
    finally:
        w.close()
