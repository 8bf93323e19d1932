"""The coordinator's side of dial-out: accept nodes' connections, and a link on each.

:class:`NodeAcceptor` listens on the IO loop, checks each dialing node's token, proves to
the node that it knows the token too (the trust model is in :mod:`fedws.transport.dialer`)
and hands the open connection on. :class:`AcceptedLink` is a
:class:`~fedws.transport.websocket.WebsocketLink` over such a connection: the same writer and
reader, so a worker on it behaves exactly like one that dialed the node. One IO thread
multiplexes every accepted link.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import cast

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import Server, ServerConnection
from websockets.http11 import Request, Response

from ..exceptions import FedwsConnectionError
from .dialer import COORDINATOR_HEADER
from .guard import FailureLimiter, PendingHandshakes
from .handshake import (
    CHALLENGE_HEADER,
    NODE_ID_HEADER,
    PROOF_HEADER,
    SESSION_HEADER,
    peer_proof,
    token_matches,
)
from .link import Endpoint
from .relay import RelayTap
from .server import guarded_connection, listen
from .websocket import WebsocketLink

__all__ = ["NodeAcceptor", "AcceptedLink", "MAX_NODE_ID_CHARS", "raise_fd_limit", "BACKLOG"]

log = logging.getLogger("fedws.accept")

MAX_NODE_ID_CHARS = 128

BACKLOG = 1024
"""Connections the kernel queues before the loop accepts them (asyncio's default is 100:
a few hundred nodes redialling at once after a coordinator restart would overflow it)."""


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise this process's soft limit on open files towards its hard limit; returns it.

    Every connection is a file descriptor: a coordinator with 1,000 dial-out nodes needs
    more than the common default soft limit of 1,024. The hard limit is the operator's
    (``ulimit -Hn``, systemd ``LimitNOFILE=``); this never asks beyond it.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # pragma: no cover - a sandbox may forbid it
            log.warning("could not raise the open-files limit from %d to %d", soft, target)
            return soft
        log.info("raised the open-files limit from %d to %d", soft, target)
        return target
    return soft


class AcceptedLink(WebsocketLink):
    """A link over a connection a node opened; :meth:`attach` gives it each new one.

    It cannot dial (:meth:`connect` raises): a lost link comes back when the node redials.
    """

    def __init__(self, endpoint: Endpoint, node_id: str, *, max_frame_mb: float = 1024.0) -> None:
        super().__init__(endpoint, "ws://dial-out", name=node_id, expected_id=node_id, max_frame_mb=max_frame_mb)
        self.node_id = node_id
        self._dialout_address = f"dialout://{node_id}"
        self.relay: Callable[[bytes | bytearray | memoryview], Awaitable[None]] | None = None
        """Where relay messages from the node go (:class:`~fedws.transport.relay.RelayRouter`)."""

    @property
    def address(self) -> str:
        """``dialout://ID``: the node cannot be reached at an address, it reaches us."""
        return self._dialout_address

    async def connect(self) -> str:
        raise FedwsConnectionError(
            f"worker {self.name!r} dials in to this coordinator; it reconnects by itself"
        )

    async def attach(self, ws: ServerConnection, reset: Callable[[], None]) -> None:
        """Move frames over ``ws`` from now on (on the IO loop).

        A previous connection is closed first (what was pending on it fails), then
        ``reset`` runs (the session starts afresh), then frames flow again.
        """
        if self.open:
            await self._close()
        reset()
        # Server and client connections share one interface (websockets' Connection): the
        # writer and reader use only send, recv and close.
        self._ws = cast(ClientConnection, ws if self.relay is None else RelayTap(ws, self.relay))
        self._closing = False
        self._wake = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._writer(self._ws)),
            asyncio.create_task(self._reader(self._ws)),
        ]


class NodeAcceptor:
    """Accepts dial-out nodes on a WebSocket (runs on the IO loop).

    Args:
        on_node: ``(node id, session key, connection)``, awaited once per accepted node;
            the connection stays open until it returns.
        session_for: the session key of a node id (kept across its reconnects).
        token: the token every node presents (and this side proves it knows).
        tokens: node id -> that node's own token (overrides ``token`` for that node).
        name: what this coordinator calls itself in the proof.
        host, port: where to listen (port 0: a free one, kept on restart).
        certfile, keyfile: serve ``wss://``.
        auth_limiter: wrong tokens per address (then HTTP 429 for a while). Only failures
            count: a host's hundreds of nodes presenting the right token never trip it.
        pending: connections per address not past their handshake yet; over the cap the
            connection is closed at once (a dial-out host keeps fewer in flight, see
            :data:`fedws.node_host.DIAL_CONCURRENCY`, and redials what was refused).
        connected: whether a node id has a connection now; a second one is refused
            (HTTP 409), so two hosts claiming one id cannot take turns evicting each other.
    """

    def __init__(
        self,
        on_node: Callable[[str, str, ServerConnection], Awaitable[None]],
        session_for: Callable[[str], str],
        *,
        token: str | None = None,
        tokens: Mapping[str, str] | None = None,
        name: str = "coordinator",
        host: str = "127.0.0.1",
        port: int = 0,
        certfile: str | None = None,
        keyfile: str | None = None,
        max_frame_mb: float = 1024.0,
        handshake_timeout: float = 10.0,
        ping_interval: float | None = 10.0,
        auth_limiter: FailureLimiter | None = None,
        pending: PendingHandshakes | None = None,
        connected: Callable[[str], bool] | None = None,
    ) -> None:
        if not token and not tokens:
            raise ValueError("a coordinator accepting nodes needs a token (or one per node)")
        self.on_node = on_node
        self.session_for = session_for
        self.token = token
        self.tokens = dict(tokens or {})
        self.name = name
        self.host, self.port = host, port
        self.certfile, self.keyfile = certfile, keyfile
        self.max_frame_mb = max_frame_mb
        self.handshake_timeout = handshake_timeout
        self.ping_interval = ping_interval
        self.auth_limiter = auth_limiter if auth_limiter is not None else FailureLimiter()
        self.pending = pending if pending is not None else PendingHandshakes()
        self.connected = connected
        self._server: Server | None = None
        self.url: str | None = None

    def _token_of(self, node_id: str) -> str | None:
        return self.tokens.get(node_id, self.token)

    def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        address = str(connection.remote_address[0]) if connection.remote_address else "?"
        left = self.auth_limiter.blocked_for(address)
        if left > 0:
            refusal = connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "fedws: too many wrong tokens; retry later\n")
            refusal.headers["Retry-After"] = str(max(1, round(left)))
            return refusal
        node_id = request.headers.get(NODE_ID_HEADER)
        challenge = request.headers.get(CHALLENGE_HEADER)
        if not node_id or len(node_id) > MAX_NODE_ID_CHARS or not challenge or len(challenge) > 128:
            return connection.respond(HTTPStatus.BAD_REQUEST, "fedws: a dialing node names itself and sends a challenge\n")
        expected = self._token_of(node_id)
        if expected is None or not token_matches(request.headers.get("Authorization"), expected):
            verdict = self.auth_limiter.failed(address)
            if verdict.log or verdict.blocked:
                log.warning("coordinator: refused node %r from %s: wrong or missing token", node_id[:40], address)
            return connection.respond(HTTPStatus.UNAUTHORIZED, "fedws: invalid or missing token\n")
        if self.connected is not None and self.connected(node_id):
            log.warning("coordinator: refused node %r from %s: a node of that id is connected", node_id[:40], address)
            return connection.respond(HTTPStatus.CONFLICT, "fedws: a node of this id is connected already\n")
        return None

    def _prove(self, connection: ServerConnection, request: Request, response: Response) -> Response:
        node_id = request.headers.get(NODE_ID_HEADER)
        challenge = request.headers.get(CHALLENGE_HEADER)
        token = self._token_of(node_id) if node_id else None
        if response.status_code == HTTPStatus.SWITCHING_PROTOCOLS and node_id and challenge and token:
            response.headers[COORDINATOR_HEADER] = self.name
            response.headers[PROOF_HEADER] = peer_proof(token.encode(), self.name, node_id, challenge)
            response.headers[SESSION_HEADER] = self.session_for(node_id)
        return response

    async def _connection(self, ws: ServerConnection) -> None:
        request = ws.request
        node_id = request.headers.get(NODE_ID_HEADER) if request is not None else None
        if node_id is None:  # cannot happen: the handshake checked it
            await ws.close(1008, "fedws: not authenticated")
            return
        await self.on_node(node_id, self.session_for(node_id), ws)

    async def start(self) -> str:
        """Start listening; returns the URL (the port stays the same across restarts)."""
        raise_fd_limit()
        self._server, self.url = await listen(
            self._connection, self.host, self.port,
            certfile=self.certfile, keyfile=self.keyfile, max_frame_mb=self.max_frame_mb,
            process_request=self._check, process_response=self._prove,
            create_connection=guarded_connection(self.pending, self.name),
            open_timeout=self.handshake_timeout,
            backlog=BACKLOG, ping_interval=self.ping_interval, ping_timeout=self.ping_interval,
        )
        self.port = int(self.url.rsplit(":", 1)[1])
        return self.url

    async def aclose(self) -> None:
        """Stop listening and close every node's connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
