"""The WebSocket frame server: frames in, a handler in a worker thread, replies out.

It knows sockets and nothing else: what a frame means is the business of the handler it
is given (``fedws.node_process`` hands it a node's). Each connection gets one handler
thread, so its frames run in order while the event loop stays free: a long computation
never stops the server from answering pings or other coordinators. Frames of one
connection are handed to the thread as they arrive and replies are written in the same
order, so a coordinator can pipeline without waiting for each reply.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .frames import fragments, receive
from .handshake import NODE_ID_HEADER, SESSION_HEADER, Credentials, new_session_key, session_key
from .link import FrameHandler

__all__ = ["FrameServer", "INLINE_MAX_BYTES"]

log = logging.getLogger("fedws.server")

_PENDING_FRAMES = 64  # per connection: frames handed to the thread but not answered yet
INLINE_MAX_BYTES = 1 << 16
"""Frames larger than this always go to the connection's thread."""


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
        credentials: the tokens accepted, each naming a principal (overrides ``token``).
        open_session: ``(principal, session key, address) -> (handle, handle_inline)``,
            called once per connection after the handshake: the handlers of that
            connection (None: ``handle``/``handle_inline`` for every connection).
    """

    def __init__(
        self,
        node_id: str,
        handle: FrameHandler,
        *,
        handle_inline: FrameHandler | None = None,
        answer_inline: Callable[[bytes | bytearray], bool] | None = None,
        host: str = "127.0.0.1",
        port: int = 8777,
        token: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        max_frame_mb: float = 1024.0,
        credentials: Credentials | None = None,
        open_session: Callable[[str, str, str | None], tuple[FrameHandler, FrameHandler | None]] | None = None,
    ) -> None:
        self.node_id = node_id
        self.handle = handle
        self.handle_inline = handle_inline
        self.answer_inline = answer_inline
        self.host, self.port = host, port
        self.token = token
        self.certfile, self.keyfile = certfile, keyfile
        self.max_frame_mb = max_frame_mb
        self.credentials = credentials if credentials is not None else Credentials.single(token)
        self.open_session = open_session
        self._principals: weakref.WeakKeyDictionary[ServerConnection, str] = weakref.WeakKeyDictionary()
        self._server: Server | None = None
        self.url: str | None = None

    # -- handshake -----------------------------------------------------------------------

    def _check_token(self, connection: ServerConnection, request: Request) -> Response | None:
        principal = self.credentials.principal_for(request.headers.get("Authorization"))
        if principal is not None:
            self._principals[connection] = principal
            return None
        log.warning("node %s: refused a connection with a wrong or missing token", self.node_id)
        return connection.respond(HTTPStatus.UNAUTHORIZED, "fedws: invalid or missing token\n")

    def _add_id_header(self, connection: ServerConnection, request: Request, response: Response) -> Response:
        response.headers[NODE_ID_HEADER] = self.node_id
        return response

    # -- connections ---------------------------------------------------------------------

    async def _connection(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        handle, inline = self.handle, self.handle_inline
        if self.open_session is not None:
            principal = self._principals.pop(ws, None)
            if principal is None:  # cannot happen: the handshake stored it
                await ws.close(1008, "fedws: not authenticated")
                return
            request = ws.request
            key = session_key(request.headers.get(SESSION_HEADER) if request is not None else None)
            peer = ws.remote_address
            address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None
            handle, inline = self.open_session(principal, key or new_session_key(), address)
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"fedws-{self.node_id}")
        replies: asyncio.Queue[Any] = asyncio.Queue(_PENDING_FRAMES)
        writer = asyncio.create_task(self._write_replies(ws, replies))
        may_inline = self.answer_inline
        in_thread = 0  # frames of this connection handed to its thread and not done

        def done(_: Any) -> None:
            nonlocal in_thread
            in_thread -= 1

        try:
            while True:
                message = await receive(ws)
                if isinstance(message, str):
                    await ws.close(1003, "fedws speaks binary msgpack frames")
                    break
                if (
                    inline is not None
                    and may_inline is not None
                    and not in_thread
                    and len(message) <= INLINE_MAX_BYTES
                    and may_inline(message)
                ):
                    # Bounded work, nothing of ours queued before it: answer on the loop.
                    answered = loop.create_future()
                    answered.set_result(inline(message))
                    await replies.put(answered)
                    continue
                in_thread += 1
                job = loop.run_in_executor(executor, handle, message)
                job.add_done_callback(done)
                await replies.put(job)
        except ConnectionClosed:
            pass
        finally:
            await replies.put(None)
            await asyncio.gather(writer, return_exceptions=True)
            executor.shutdown(wait=False)

    async def _write_replies(self, ws: ServerConnection, replies: asyncio.Queue[Any]) -> None:
        while True:
            pending = await replies.get()
            if pending is None:
                return
            reply = await pending
            try:
                await ws.send(fragments(reply))
            except ConnectionClosed:
                return

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> str:
        """Start listening; returns the URL (with the real port when port 0 was asked).

        Raises:
            OSError: the address cannot be bound.
        """
        ssl_ctx = None
        if self.certfile:
            ssl_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ssl_ctx.load_cert_chain(self.certfile, self.keyfile)
        self._server = await serve(
            self._connection,
            self.host,
            self.port,
            max_size=int(self.max_frame_mb * 2**20),
            compression=None,  # deflate only costs on tensor bytes
            process_request=self._check_token,
            process_response=self._add_id_header,
            ssl=ssl_ctx,
            max_queue=_PENDING_FRAMES,
            write_limit=2**20,
        )
        port = next(iter(self._server.sockets)).getsockname()[1]
        scheme = "wss" if ssl_ctx else "ws"
        self.url = f"{scheme}://{self.host}:{port}"
        return self.url

    async def aclose(self) -> None:
        """Stop listening and close every connection cleanly."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
