"""The node process (``fedws worker``): config + Node + peer links + socket server.

This is the composition root of a worker node. The :class:`~fedws.node.Node` answers
frames; a federation of its own holds the links the node opens to its peers (one
:class:`WebsocketClientWorker` per ``ADD_PEER``); the
:class:`~fedws.transport.server.FrameServer` moves frames and knows nothing of either.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import torch

from .client.federation import Federation
from .client.websocket_worker import WebsocketClientWorker
from .hook import TorchHook
from .node.audit import open_audit_log
from .node.policy import Policy
from .node_config import NodeConfig, load_tensor
from .protocol.codec import peek_kinds
from .protocol.ids import new_id
from .protocol.messages import Kind
from .transport.handshake import DEFAULT_PRINCIPAL, Credentials, token_digest
from .transport.link import Chunks, FrameHandler
from .transport.server import FrameServer
from .virtual import VirtualWorker

__all__ = ["NodeServer", "serve", "bounded"]

log = logging.getLogger("fedws.server")

# Requests whose cost does not depend on what the caller asks the node to compute. A frame
# of only these may be answered on the event loop; torch commands and plans never are, so a
# long computation cannot hold up pings or other coordinators.
_BOUNDED_KINDS = frozenset({Kind.PING, Kind.INFO, Kind.SEARCH, Kind.GET, Kind.DELETE})


def bounded(frame: bytes | bytearray) -> bool:
    """Whether every request of ``frame`` is bounded work (safe to answer on the loop)."""
    kinds = peek_kinds(frame)
    return kinds is not None and all(k in _BOUNDED_KINDS for k in kinds)


class NodeServer:
    """A worker node listening on a WebSocket.

    Args:
        config: id, address, limits and data to serve.
        peer_timeout: how long a node waits on another node (move, remote_get).
    """

    def __init__(self, config: NodeConfig, *, peer_timeout: float = 60.0) -> None:
        self.config = config
        self.hook = TorchHook(torch, federation=Federation())
        self.worker = VirtualWorker(self.hook, id=config.id, max_store_mb=config.max_store_mb)
        node = self.worker.node
        node.add_peer = self._add_peer
        node.policy = Policy(config.policy, frozenset(config.approved_plans), config.dp)
        if config.audit_log:
            self._audit_handler = open_audit_log(config.audit_log)
        self.peer_timeout = peer_timeout
        self._stopped = asyncio.Event()
        self.server = FrameServer(
            config.id,
            self._handle,
            handle_inline=self.worker.handle_frame,
            answer_inline=bounded,
            host=config.host,
            port=config.port,
            token=config.token,
            certfile=config.certfile,
            keyfile=config.keyfile,
            max_frame_mb=config.max_frame_mb,
            credentials=self.credentials(config),
            open_session=self._open_session,
        )
        for entry in config.data:
            tensor = load_tensor(entry)
            node.serve(new_id(), tensor, entry.tags, entry.description)

    @staticmethod
    def credentials(config: NodeConfig) -> Credentials:
        """The tokens the node accepts: ``[[tokens]]`` entries, plus ``token`` as ``"default"``."""
        digests = [(t.principal, t.sha256) for t in config.tokens]
        if config.token:
            digests.append((DEFAULT_PRINCIPAL, token_digest(config.token)))
        return Credentials(digests, open=not digests)

    def _open_session(
        self, principal: str, session: str, address: str | None
    ) -> tuple[FrameHandler, FrameHandler | None]:
        """The frame handlers of one connection: every frame runs as its caller."""
        node = self.worker.node
        caller = node.caller(principal, session, address)
        node.audit.connected(caller)
        handle_frame = self.worker.handle_frame

        def handle(frame: bytes | bytearray | memoryview) -> Chunks:
            reply = handle_frame(frame, caller)
            self._wait_for_peers()
            return reply

        def handle_inline(frame: bytes | bytearray | memoryview) -> Chunks:
            return handle_frame(frame, caller)

        return handle, handle_inline

    @property
    def url(self) -> str | None:
        return self.server.url

    # -- peers ---------------------------------------------------------------------------

    def _add_peer(self, worker_id: str, address: str | None) -> None:
        """Open a link to another node (the coordinator said where it is)."""
        if not address:
            raise ValueError(f"no address given for worker {worker_id!r}")
        old = self.worker.peers.get(worker_id)
        if isinstance(old, WebsocketClientWorker) and old.address == address and old.connected:
            return
        peer = WebsocketClientWorker(
            self.hook, url=address, id=worker_id, token=self.config.token, timeout=self.peer_timeout
        )
        self.worker.peers[worker_id] = peer

    def _handle(self, frame: bytes | bytearray | memoryview) -> Chunks:
        reply = self.worker.handle_frame(frame)
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

    # -- serving -------------------------------------------------------------------------

    async def start(self) -> str:
        """Start listening; returns the URL (with the real port when port 0 was asked)."""
        return await self.server.start()

    def stop(self) -> None:
        self._stopped.set()

    def install_signal_handlers(self) -> None:
        """SIGINT and SIGTERM stop the node cleanly (main thread of a running loop only)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._stopped.set)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass

    async def serve_until_stopped(self) -> None:
        """Run until :meth:`stop`, SIGINT or SIGTERM, then close connections cleanly."""
        self.install_signal_handlers()
        await self._stopped.wait()
        await self.server.aclose()
        for peer in list(self.worker.peers.values()):
            peer.close()


def serve(server: NodeServer, *, ready: Callable[[str], None] | None = None) -> None:
    """Run ``server`` until SIGINT/SIGTERM; ``ready(url)`` is called once it listens.

    The signal handlers are installed before ``ready`` runs, so a SIGTERM sent right after
    the ready line stops the node cleanly (exit code 0).

    Raises:
        OSError: the address cannot be bound.
    """

    async def main() -> None:
        server.install_signal_handlers()
        url = await server.start()
        if ready is not None:
            ready(url)
        await server.serve_until_stopped()

    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main())
    else:
        uvloop.run(main())
