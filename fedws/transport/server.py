"""The WebSocket node server: frames in, ``Node.handle`` in a worker thread, replies out.

Each connection gets one handler thread, so its commands run in order while the event loop
stays free: a long plan never stops the node from answering pings or other coordinators.
Frames of one connection are handed to the thread as they arrive and replies are written in
the same order, so a coordinator can pipeline without waiting for each reply.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import ssl
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any

import torch
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ..client.federation import Federation
from ..client.worker import VirtualWorker, executing_on
from ..protocol.codec import peek_kinds
from ..protocol.ids import new_id
from ..protocol.messages import Kind
from .config import NodeConfig, load_tensor
from .frames import fragments, receive

__all__ = ["NodeServer", "NODE_ID_HEADER"]

log = logging.getLogger("fedws.server")

NODE_ID_HEADER = "X-Fedws-Node"
_PENDING_FRAMES = 64  # per connection: frames handed to the thread but not answered yet
# Requests whose cost does not depend on what the caller asks the node to compute. A frame
# of only these may be answered on the event loop; torch commands and plans never are, so a
# long computation cannot hold up pings or other coordinators.
_BOUNDED_KINDS = frozenset({Kind.PING, Kind.INFO, Kind.SEARCH, Kind.GET, Kind.DELETE})
_INLINE_MAX_BYTES = 1 << 16


def _bounded(frame: bytes | bytearray) -> bool:
    kinds = peek_kinds(frame)
    return kinds is not None and all(k in _BOUNDED_KINDS for k in kinds)


class NodeServer:
    """A worker node listening on a WebSocket.

    Args:
        config: id, address, limits and data to serve.
        peer_timeout: how long a node waits on another node (move, remote_get).
    """

    def __init__(self, config: NodeConfig, *, peer_timeout: float = 60.0) -> None:
        from ..hook import TorchHook

        self.config = config
        self.hook = TorchHook(torch, federation=Federation())
        self.worker = VirtualWorker(self.hook, id=config.id, max_store_mb=config.max_store_mb)
        self.worker.node.add_peer = self._add_peer
        self.peer_timeout = peer_timeout
        self._server: Server | None = None
        self._stopped = asyncio.Event()
        self.url: str | None = None
        for entry in config.data:
            tensor = load_tensor(entry)
            self.worker.node.store.set(new_id(), tensor, entry.tags, entry.description)

    # -- peers ---------------------------------------------------------------------------

    def _add_peer(self, worker_id: str, address: str | None) -> None:
        """Open a link to another node (the coordinator said where it is)."""
        from .client import WebsocketClientWorker

        if not address:
            raise ValueError(f"no address given for worker {worker_id!r}")
        old = self.worker.peers.get(worker_id)
        if isinstance(old, WebsocketClientWorker) and old.address == address and old.connected:
            return
        peer = WebsocketClientWorker(
            self.hook, url=address, id=worker_id, token=self.config.token, timeout=self.peer_timeout
        )
        self.worker.peers[worker_id] = peer

    # -- serving -------------------------------------------------------------------------

    def _check_token(self, connection: ServerConnection, request: Request) -> Response | None:
        token = self.config.token
        if token is None:
            return None
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            log.warning("node %s: refused a connection with a wrong or missing token", self.config.id)
            return connection.respond(HTTPStatus.UNAUTHORIZED, "fedws: invalid or missing token\n")
        return None

    def _add_id_header(self, connection: ServerConnection, request: Request, response: Response) -> Response:
        response.headers[NODE_ID_HEADER] = self.config.id
        return response

    def _handle(self, frame: bytes | bytearray) -> list[bytes | memoryview]:
        token = executing_on.set(self.worker)
        try:
            reply = self.worker.node.handle(frame)
        finally:
            executing_on.reset(token)
        self._wait_for_peers()
        return reply

    def _wait_for_peers(self) -> None:
        """Answer a frame only once the commands it sent on to other nodes have run there.

        So when a coordinator's ``await ptr`` returns for an op on a pointer chain, the data
        at the end of the chain exists too (causal order across nodes).
        """
        for peer in list(self.worker.peers.values()):
            session = peer.session
            if session.pending:
                fut = session.ack_future(session.last_seq)
                peer.flush()
                try:
                    fut.result(self.peer_timeout)
                except Exception:  # the peer's error surfaces where its result is used
                    log.debug("node %s: peer %s reported an error", self.config.id, peer.id)

    def _handle_inline(self, frame: bytes | bytearray) -> list[bytes | memoryview]:
        token = executing_on.set(self.worker)
        try:
            return self.worker.node.handle(frame)
        finally:
            executing_on.reset(token)

    async def _connection(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"fedws-{self.config.id}")
        replies: asyncio.Queue[Any] = asyncio.Queue(_PENDING_FRAMES)
        writer = asyncio.create_task(self._write_replies(ws, replies))
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
                if not in_thread and len(message) <= _INLINE_MAX_BYTES and _bounded(message):
                    # Bounded work, nothing of ours queued before it: answer on the loop and
                    # save the hop to the thread and back (about 0.2 ms here).
                    answered = loop.create_future()
                    answered.set_result(self._handle_inline(message))
                    await replies.put(answered)
                    continue
                in_thread += 1
                job = loop.run_in_executor(executor, self._handle, message)
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

    async def start(self) -> str:
        """Start listening; returns the URL (with the real port when port 0 was asked)."""
        cfg = self.config
        ssl_ctx = None
        if cfg.certfile:
            ssl_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ssl_ctx.load_cert_chain(cfg.certfile, cfg.keyfile)
        self._server = await serve(
            self._connection,
            cfg.host,
            cfg.port,
            max_size=int(cfg.max_frame_mb * 2**20),
            compression=None,  # deflate only costs on tensor bytes
            process_request=self._check_token,
            process_response=self._add_id_header,
            ssl=ssl_ctx,
            max_queue=_PENDING_FRAMES,
            write_limit=2**20,
        )
        port = next(iter(self._server.sockets)).getsockname()[1]
        scheme = "wss" if ssl_ctx else "ws"
        self.url = f"{scheme}://{cfg.host}:{port}"
        return self.url

    def stop(self) -> None:
        self._stopped.set()

    async def serve_until_stopped(self) -> None:
        """Run until :meth:`stop`, SIGINT or SIGTERM, then close connections cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._stopped.set)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
        await self._stopped.wait()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for peer in list(self.worker.peers.values()):
            close = getattr(peer, "close", None)
            if close is not None:
                close()

