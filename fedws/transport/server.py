"""The WebSocket frame server: frames in, a handler in a worker thread, replies out.

It knows sockets and nothing else: what a frame means is the business of the handler it
is given (``fedws.node_process`` hands it a node's). Each connection gets one handler
thread, so its frames run in order while the event loop stays free: a long computation
never stops the server from answering pings or other coordinators. Frames of one
connection are handed to the thread as they arrive and replies are written in the same
order, so a coordinator can pipeline without waiting for each reply.

Before any of that, the handshake is guarded (:mod:`fedws.transport.guard`): it must finish
within ``handshake_timeout``, one address may hold only so many unfinished handshakes (its
next TCP connection is closed at once), and an address that presented too many wrong
tokens is refused with HTTP 429 for a cool-down without its token being checked.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import weakref
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from .compress import available as compress_available
from .guard import FailureLimiter, PendingHandshakes
from .handshake import (
    CHALLENGE_HEADER,
    COMPRESS_HEADER,
    MAX_FRAME_HEADER,
    NODE_ID_HEADER,
    PEER_HEADER,
    PROOF_HEADER,
    SESSION_HEADER,
    Credentials,
    new_session_key,
    peer_proof,
    session_key,
)
from .link import FrameHandler
from .memory import tune_malloc
from .serving import PENDING_FRAMES, serve_frames

__all__ = ["FrameServer", "node_name"]

log = logging.getLogger("fedws.server")



class FrameServer:
    """Serves frames on a WebSocket for one node.

    Args:
        node_id: sent in the handshake (``X-Fedws-Node``), so clients know whom they reached.
        handle: ``frame -> reply``, run in the connection's thread.
        handle_inline: ``frame -> reply`` for frames ``answer_inline`` accepts, run on the
            event loop (bounded work only: it saves the hop to the thread and back).
        answer_inline: which small frames ``handle_inline`` may answer (None: none).
        host, port: where to listen (port 0 picks a free one).
        token: the bearer token clients must present (None: any client).
        certfile, keyfile: serve ``wss://``.
        max_frame_mb: largest frame accepted; a larger one closes that connection (1009).
        handshake_timeout: seconds a client has to finish the WebSocket handshake.
        max_pending_handshakes: unfinished handshakes one address may hold; its next TCP
            connection is closed at once.
        auth_limiter: counts wrong tokens per address (default: 10 in 10 s block the
            address for 30 s).
        peer_secrets: peer node id -> the secret this node proves itself with when that
            peer links to it (see :func:`fedws.transport.handshake.peer_proof`).
        credentials: the tokens accepted, each naming a principal (overrides ``token``).
        open_session: ``(principal, session key, address) -> (handle, handle_inline)``,
            called once per connection after the handshake: the handlers of that
            connection (None: ``handle``/``handle_inline`` for every connection).
        close_session: ``(principal, session key)``, called once a connection that
            ``open_session`` opened has ended (closed or lost) and its last frame was
            answered or dropped: the composition decides when the session itself ends.
        routes: node name -> the (unstarted) server of that node, or None: this server
            listens for several nodes, each reached at ``ws://host:port/NAME`` and answering
            with its own id, tokens and handlers (``fedws.node_host``). The path is checked
            (:func:`node_name`) before any token; a bad or unknown one is refused (400/404)
            and counted with the wrong tokens of its address.
    """

    def __init__(
        self,
        node_id: str,
        handle: FrameHandler,
        *,
        handle_inline: FrameHandler | None = None,
        answer_inline: Callable[[bytes | bytearray | memoryview], bool] | None = None,
        host: str = "127.0.0.1",
        port: int = 8777,
        token: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        max_frame_mb: float = 1024.0,
        handshake_timeout: float = 10.0,
        max_pending_handshakes: int = 64,
        auth_limiter: FailureLimiter | None = None,
        peer_secrets: dict[str, bytes] | None = None,
        credentials: Credentials | None = None,
        open_session: Callable[[str, str, str | None], tuple[FrameHandler, FrameHandler | None]] | None = None,
        close_session: Callable[[str, str], None] | None = None,
        routes: Callable[[str], FrameServer | None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.handle = handle
        self.handle_inline = handle_inline
        self.answer_inline = answer_inline
        self.host, self.port = host, port
        self.token = token
        self.certfile, self.keyfile = certfile, keyfile
        self.max_frame_mb = max_frame_mb
        self.handshake_timeout = handshake_timeout
        self.pending_handshakes = PendingHandshakes(max_pending_handshakes)
        self.auth_limiter = auth_limiter if auth_limiter is not None else FailureLimiter()
        self.peer_secrets = dict(peer_secrets or {})
        self.credentials = credentials if credentials is not None else Credentials.single(token)
        self.open_session = open_session
        self.close_session = close_session
        self._principals: weakref.WeakKeyDictionary[ServerConnection, str] = weakref.WeakKeyDictionary()
        self.routes = routes
        self._targets: weakref.WeakKeyDictionary[ServerConnection, FrameServer] = weakref.WeakKeyDictionary()
        self._server: Server | None = None
        self.url: str | None = None

    # -- handshake -----------------------------------------------------------------------

    def _guarded_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse a blocked address without checking its token; count its failures."""
        address = _host_of(connection.remote_address)
        left = self.auth_limiter.blocked_for(address)
        if left > 0:
            refusal = connection.respond(
                HTTPStatus.TOO_MANY_REQUESTS, "fedws: too many wrong tokens from this address; retry later\n"
            )
            refusal.headers["Retry-After"] = str(max(1, round(left)))
            return refusal
        response = self._route(connection, request) or self._check_token(connection, request)
        if response is not None and response.status_code in _COUNTED:
            verdict = self.auth_limiter.failed(address)
            if verdict.blocked:
                log.warning(
                    "node %s: %d wrong or missing tokens from %s within %.0f s; refusing it for %.0f s",
                    self.node_id, verdict.failures, address, self.auth_limiter.window, self.auth_limiter.cooldown,
                )
            elif verdict.log:
                log.warning("node %s: refused a connection from %s with a wrong or missing token", self.node_id, address)
        return response

    def _connection_class(self) -> type[ServerConnection]:
        return guarded_connection(self.pending_handshakes, f"node {self.node_id}")

    def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        """Pick the node a connection's path names (a server of one node takes its id or none)."""
        name = node_name(request.path)
        if name is None:
            return connection.respond(HTTPStatus.BAD_REQUEST, "fedws: malformed node path (want /NODE_ID)\n")
        if self.routes is None:
            if name in ("", self.node_id):
                return None
            target = None
        else:
            target = self.routes(name)
        if target is None:
            what = "several nodes: add /NODE_ID to the URL" if not name else f"no node {name!r}"
            return connection.respond(HTTPStatus.NOT_FOUND, f"fedws: this address serves {what}\n")
        self._targets[connection] = target
        return None

    def _check_token(self, connection: ServerConnection, request: Request) -> Response | None:
        target = self._targets.get(connection, self)
        principal = target.credentials.principal_for(request.headers.get("Authorization"))
        if principal is not None:
            target._principals[connection] = principal
            return None
        return connection.respond(HTTPStatus.UNAUTHORIZED, "fedws: invalid or missing token\n")

    def _add_id_header(self, connection: ServerConnection, request: Request, response: Response) -> Response:
        target = self._targets.get(connection, self)
        response.headers[NODE_ID_HEADER] = target.node_id
        response.headers[MAX_FRAME_HEADER] = str(int(self.max_frame_mb * 2**20))
        if request.headers.get(COMPRESS_HEADER) == "zstd" and compress_available():
            response.headers[COMPRESS_HEADER] = "zstd"  # both sides can: this link compresses
        target._add_peer_proof(request, response)
        return response

    def _add_peer_proof(self, request: Request, response: Response) -> None:
        """Answer a listed peer's challenge, proving this node is who that peer listed."""
        caller, challenge = request.headers.get(PEER_HEADER), request.headers.get(CHALLENGE_HEADER)
        secret = self.peer_secrets.get(caller) if caller is not None else None
        if secret is not None and caller is not None and challenge is not None and len(challenge) <= 128:
            response.headers[PROOF_HEADER] = peer_proof(secret, self.node_id, caller, challenge)

    # -- connections ---------------------------------------------------------------------

    async def _connection(self, ws: ServerConnection) -> None:
        target = self._targets.pop(ws, self)
        if target is not self:  # one of several nodes behind this socket: its server runs it
            await target._connection(ws)
            return
        handle, inline = self.handle, self.handle_inline
        opened: tuple[str, str] | None = None
        if self.open_session is not None:
            principal = self._principals.pop(ws, None)
            if principal is None:  # cannot happen: the handshake stored it
                await ws.close(1008, "fedws: not authenticated")
                return
            request = ws.request
            key = session_key(request.headers.get(SESSION_HEADER) if request is not None else None)
            peer = ws.remote_address
            address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None
            session = key or new_session_key()
            handle, inline = self.open_session(principal, session, address)
            opened = (principal, session)
        req = ws.request
        zstd = req is not None and req.headers.get(COMPRESS_HEADER) == "zstd" and compress_available()
        try:
            await serve_frames(
                ws, handle, inline, self.answer_inline, self.node_id,
                max_inflated=int(self.max_frame_mb * 2**20) if zstd else None,
            )
        finally:
            if opened is not None and self.close_session is not None:
                try:
                    self.close_session(*opened)
                except Exception:  # never let bookkeeping break the server
                    log.exception("node %s: close_session failed", self.node_id)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> str:
        """Start listening; returns the URL (with the real port when port 0 was asked).

        Raises:
            OSError: the address cannot be bound.
        """
        tune_malloc()  # large frames: see fedws.transport.memory
        self._server, self.url = await listen(
            self._connection, self.host, self.port,
            certfile=self.certfile, keyfile=self.keyfile, max_frame_mb=self.max_frame_mb,
            process_request=self._guarded_request, process_response=self._add_id_header,
            create_connection=self._connection_class(), open_timeout=self.handshake_timeout,
        )
        return self.url

    async def aclose(self) -> None:
        """Stop listening and close every connection cleanly."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


_COUNTED = (HTTPStatus.UNAUTHORIZED, HTTPStatus.NOT_FOUND, HTTPStatus.BAD_REQUEST)
"""Refusals counted per address: wrong tokens, and guessed or malformed node paths."""
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_PATH_CHARS = 256
"""Longest request path looked at; a longer one is refused unread."""


def node_name(path: str) -> str | None:
    """The node a request path names: ``""`` for ``/``, ``"alice"`` for ``/alice`` (a query
    string is ignored); None for anything else — too long, nested, or characters other than
    letters, digits, ``.``, ``_``, ``-`` (up to 64, not starting with a dot or dash)."""
    if len(path) > MAX_PATH_CHARS:
        return None
    name = path.split("?", 1)[0].strip("/")
    if not name:
        return ""
    return name if _NODE_NAME.fullmatch(name) else None


async def listen(
    handler: Callable[[ServerConnection], Awaitable[None]],
    host: str,
    port: int,
    *,
    certfile: str | None,
    keyfile: str | None,
    max_frame_mb: float,
    process_request: Callable[[ServerConnection, Request], Response | None],
    process_response: Callable[[ServerConnection, Request, Response], Response | None],
    create_connection: type[ServerConnection],
    open_timeout: float | None,
    **options: Any,
) -> tuple[Server, str]:
    """A WebSocket listener with the settings every fedws endpoint shares (a listening node,
    a coordinator accepting dial-out nodes); returns it and its URL (the real port when 0
    was asked). Frames are bounded by ``max_frame_mb`` before anything is assembled; no
    per-message deflate (it only costs on tensor bytes).

    Raises:
        OSError: the address cannot be bound.
    """
    ssl_ctx = None
    if certfile:
        ssl_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_ctx.load_cert_chain(certfile, keyfile)
    server = await serve(
        handler, host, port,
        max_size=int(max_frame_mb * 2**20),
        compression=None,
        process_request=process_request,
        process_response=process_response,
        ssl=ssl_ctx,
        max_queue=PENDING_FRAMES,
        write_limit=2**20,
        open_timeout=open_timeout,
        create_connection=create_connection,
        **options,
    )
    bound = next(iter(server.sockets)).getsockname()[1]
    return server, f"{'wss' if ssl_ctx else 'ws'}://{host}:{bound}"


def guarded_connection(guard: PendingHandshakes, label: str) -> type[ServerConnection]:
    """A connection class that counts itself as a pending handshake of its address until
    its handshake ends; over ``guard``'s cap it is aborted at once (a listening node and
    a coordinator accepting dial-out nodes alike)."""

    class GuardedConnection(ServerConnection):
        _pending_address: str | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            address = _host_of(transport.get_extra_info("peername"))
            if guard.begin(address):
                self._pending_address = address
                return
            if guard.first_refusal(address):  # once per burst, not per connection
                log.warning("%s: %s holds %d unfinished handshakes; closing its new connections",
                            label, address, guard.per_address)
            getattr(transport, "abort", transport.close)()

        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            try:
                await super().handshake(*args, **kwargs)
            finally:
                if self._pending_address is not None:
                    guard.end(self._pending_address)
                    self._pending_address = None

    return GuardedConnection


def _host_of(address: Any) -> str:
    """The host part of a socket address (the limits are per host, not per port)."""
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address)
