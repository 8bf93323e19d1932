"""``sy.connect`` raises only FedwsError subclasses, whatever answers at the address.

Each server here is a raw TCP socket on 127.0.0.1 misbehaving one way; none may let a
websockets, asyncio or OS exception through to the user (they used to: ``InvalidMessage``,
``ConnectionClosedError``).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import fedws as sy

Behaviour = Callable[[socket.socket], None]


def _close_at_once(c: socket.socket) -> None:
    c.close()


def _garbage_http(c: socket.socket) -> None:
    c.recv(65536)
    c.sendall(b"HELLO garbage\r\n\xff\xfe\x00\r\n\r\n")
    c.close()


def _plain_http(c: socket.socket) -> None:
    c.recv(65536)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    c.close()


def _bad_upgrade(c: socket.socket) -> None:
    c.recv(65536)
    c.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: nonsense\r\n\r\n"
    )
    c.close()


def _never_answer(c: socket.socket) -> None:
    pass  # keeps the connection open and says nothing


class RawServer:
    """A TCP listener on 127.0.0.1 treating every connection with ``behaviour``."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"ws://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.behaviour = behaviour
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(c)
            try:
                self.behaviour(c)
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close alone does not)
        except OSError:
            pass
        self.sock.close()
        for c in self.held:
            c.close()
        self.thread.join(5)


@pytest.fixture
def raw_server(request: pytest.FixtureRequest) -> Iterator[RawServer]:
    server = RawServer(request.param)
    yield server
    server.close()


@pytest.mark.parametrize(
    ("raw_server", "message"),
    [
        (_close_at_once, "handshake failed"),
        (_garbage_http, "handshake failed"),
        (_plain_http, "HTTP 200"),
        (_bad_upgrade, "handshake failed"),
    ],
    indirect=["raw_server"],
    ids=["closes-at-once", "garbage-http", "plain-http", "bad-upgrade"],
)
def test_a_server_that_is_not_a_node_gives_a_connection_error(
    hook: sy.TorchHook, raw_server: RawServer, message: str
) -> None:
    with pytest.raises(sy.FedwsConnectionError, match=message) as info:
        sy.connect(raw_server.url, hook=hook, connect_timeout=5)
    assert raw_server.url in str(info.value)


@pytest.mark.parametrize("raw_server", [_never_answer], indirect=True)
def test_a_server_that_never_answers_times_out_clearly(hook: sy.TorchHook, raw_server: RawServer) -> None:
    start = time.monotonic()
    with pytest.raises(sy.FedwsConnectionError, match="within 0.5 s"):
        sy.connect(raw_server.url, hook=hook, connect_timeout=0.5)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("raw_server", [_close_at_once, _garbage_http, _never_answer], indirect=True)
async def test_connect_async_raises_the_same(hook: sy.TorchHook, raw_server: RawServer) -> None:
    with pytest.raises(sy.FedwsConnectionError):
        await sy.connect_async(raw_server.url, hook=hook, connect_timeout=0.5)


@pytest.mark.parametrize("raw_server", [_garbage_http], indirect=True)
def test_wss_to_a_plain_server_is_a_connection_error(hook: sy.TorchHook, raw_server: RawServer) -> None:
    with pytest.raises(sy.FedwsConnectionError):
        sy.connect(raw_server.url.replace("ws://", "wss://"), hook=hook, connect_timeout=5)


def test_a_websocket_server_that_is_not_a_node_is_named(hook: sy.TorchHook) -> None:
    """A real WebSocket server without the node header: refused, and the link closed."""
    import asyncio

    from websockets.asyncio.server import serve

    from fedws.transport.io_thread import IOThread

    io = IOThread.get()

    async def start() -> object:
        return await serve(lambda ws: ws.wait_closed(), "127.0.0.1", 0)

    server = io.run(start(), 10, "start a plain websocket server")
    try:
        port = next(iter(server.sockets)).getsockname()[1]  # type: ignore[attr-defined]
        with pytest.raises(sy.FedwsConnectionError, match="not a fedws node"):
            sy.connect(f"ws://127.0.0.1:{port}", hook=hook, connect_timeout=5)
    finally:
        server.close()  # type: ignore[attr-defined]
        io.run(asyncio.wait_for(server.wait_closed(), 10), 10, "stop it")  # type: ignore[attr-defined]
