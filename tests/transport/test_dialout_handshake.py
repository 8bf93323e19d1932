"""Dial-out handshake both ways (in this process): the coordinator checks the node's token,
the node checks the coordinator's proof before it answers anything, and the backoff."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from fedws.exceptions import AuthenticationError
from fedws.transport.accept import NodeAcceptor
from fedws.transport.dialer import COORDINATOR_HEADER, Backoff, DialOut
from fedws.transport.handshake import PROOF_HEADER, SESSION_HEADER, new_session_key
from fedws.transport.link import Chunks

TOKEN = "shared-token"


class Node:
    """A node's session bookkeeping: which principal opened which sessions."""

    def __init__(self) -> None:
        self.opened: list[tuple[str, str]] = []
        self.closed: list[tuple[str, str]] = []

    def open_session(self, principal: str, session: str, address: str | None):  # type: ignore[no-untyped-def]
        self.opened.append((principal, session))

        def echo(frame: bytes | bytearray | memoryview) -> Chunks:
            return [bytes(frame)]

        return echo, None

    def close_session(self, principal: str, session: str) -> None:
        self.closed.append((principal, session))


def dialer(node: Node, url: str, token: str = TOKEN) -> DialOut:
    return DialOut("alice", url, token, principal="lab", open_session=node.open_session,
                   close_session=node.close_session, backoff=Backoff(0.01, 0.05), connect_timeout=5.0)


async def test_an_accepted_node_answers_frames_and_redials_into_the_same_session() -> None:
    seen: list[tuple[str, str]] = []
    sessions: dict[str, str] = {}

    async def on_node(node_id: str, session: str, ws: ServerConnection) -> None:
        seen.append((node_id, session))
        await ws.send(b"ping")
        assert await ws.recv() == b"ping"
        await ws.close()  # the link drops: the node redials

    acceptor = NodeAcceptor(on_node, lambda n: sessions.setdefault(n, new_session_key()), token=TOKEN)
    url = await acceptor.start()
    node = Node()
    d = dialer(node, url)
    running = asyncio.create_task(d.run())
    try:
        while len(node.closed) < 2:
            await asyncio.sleep(0.01)
    finally:
        await d.stop()
        await running
        await acceptor.aclose()
    assert seen[0] == seen[1] == ("alice", sessions["alice"])
    assert node.opened[:2] == [("lab", sessions["alice"])] * 2  # the principal the node's token names


async def test_the_coordinator_refuses_a_wrong_token() -> None:
    async def on_node(node_id: str, session: str, ws: ServerConnection) -> None:
        raise AssertionError("a node with a wrong token was accepted")

    acceptor = NodeAcceptor(on_node, lambda n: new_session_key(), token=TOKEN)
    url = await acceptor.start()
    node = Node()
    try:
        with pytest.raises(AuthenticationError, match="refused this node's token"):
            await dialer(node, url, token="wrong").run()
    finally:
        await acceptor.aclose()
    assert node.opened == []


async def test_the_node_refuses_a_coordinator_that_cannot_prove_the_token() -> None:
    """An impostor at the coordinator's address accepts anything but cannot answer the challenge."""
    frames: list[bytes] = []

    def impostor(connection: ServerConnection, request: Request, response: Response) -> Response:
        response.headers[COORDINATOR_HEADER] = "coordinator"
        response.headers[SESSION_HEADER] = new_session_key()
        response.headers[PROOF_HEADER] = "0" * 64
        return response

    async def handler(ws: ServerConnection) -> None:
        await ws.send(b"a command")
        async for message in ws:
            frames.append(message if isinstance(message, bytes) else message.encode())

    async with serve(handler, "127.0.0.1", 0, process_response=impostor) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        node = Node()
        with pytest.raises(AuthenticationError, match="could not prove"):
            await dialer(node, f"ws://127.0.0.1:{port}").run()
    assert node.opened == [] and frames == []  # no session, no frame answered


def test_backoff_grows_to_its_cap_with_jitter_and_resets() -> None:
    b = Backoff(0.5, 4.0)
    delays = [b.next_delay() for _ in range(8)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(2.0 <= d <= 4.0 for d in delays[4:])
    assert len(set(delays)) > 1
    b.reset()
    assert b.next_delay() <= 0.5
