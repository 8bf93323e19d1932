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
import ssl
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .client.federation import Federation
from .client.relay import RelayPeer
from .client.websocket_worker import WebsocketClientWorker
from .exceptions import OpNotAllowedError
from .hook import TorchHook
from .node.audit import open_audit_log
from .node.inline import cheap_frame
from .node.policy import Caller, Policy
from .node_config import NodeConfig, PeerEntry, load_tensor, same_url
from .protocol.ids import new_id
from .transport.dialer import DialOut
from .transport.fair_pool import FairPool
from .transport.handshake import DEFAULT_PRINCIPAL, Credentials, token_digest
from .transport.link import Chunks, FrameHandler
from .transport.memory import limit_message_pool
from .transport.relay import RelayMux
from .transport.server import FrameServer
from .virtual import VirtualWorker

__all__ = ["NodeServer", "serve", "dial"]

log = logging.getLogger("fedws.server")

PEER_REFUSED = "this node links only to the peers its operator listed ([[peers]] in its config)"
"""The one answer to an ADD_PEER the config does not allow: the same text, at once, with no
connection attempt, whatever is (or is not) at the address — so a node is no port scanner."""


class Stoppable:
    """What a serving process shares: ``stop()``, SIGINT and SIGTERM set one event that
    ``serve_until_stopped`` waits on (a node, or a host of many)."""

    _stopped: asyncio.Event

    def stop(self) -> None:
        self._stopped.set()

    def install_signal_handlers(self) -> None:
        """SIGINT and SIGTERM stop cleanly (main thread of a running loop only)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._stopped.set)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass


class NodeServer(Stoppable):
    """A worker node listening on a WebSocket.

    Args:
        config: id, address, limits, data to serve and the peers it may link to.
        peer_timeout: how long a node waits to reach or hear from another node (move,
            remote_get); default ``config.peer_timeout``.
    """

    def __init__(self, config: NodeConfig, *, peer_timeout: float | None = None) -> None:
        self.config = config
        self.hook = TorchHook(torch, federation=Federation())
        self.worker = VirtualWorker(
            self.hook, id=config.id, max_store_mb=config.max_store_mb, max_memory_mb=config.max_memory_mb
        )
        if config.max_memory_mb is not None:
            limit_message_pool(int(config.max_memory_mb * 2**20) // 4)  # idle pooled pages are not in its budget
        node = self.worker.node
        node.add_peer = self._add_peer
        node.policy = Policy(config.policy, frozenset(config.approved_plans), config.dp, roles=roles(config))
        if config.audit_log:
            self._audit_handler = open_audit_log(config.audit_log, node=config.id)
        self.peer_timeout = config.peer_timeout if peer_timeout is None else peer_timeout
        self.listed_peers: dict[str, PeerEntry] = {p.id: p for p in config.peers}
        if config.open_peers:
            log.warning(
                "node %s: DEVELOPMENT MODE (open_peers): coordinators may make this node "
                "connect to any address", config.id,
            )
        self._stopped = asyncio.Event()
        self.relay: RelayMux | None = None  # set by dial_out: links to peers through the coordinator
        self.session_grace = config.session_grace_s
        # Sessions: open connections per (principal, session key), and the timers of the
        # sessions whose last connection closed (a reconnect within the grace cancels it).
        self._connections: dict[tuple[str, str], int] = {}
        self._ending: dict[tuple[str, str], asyncio.TimerHandle] = {}
        node.connections = self.connections
        self.server = FrameServer(
            config.id,
            self._handle,
            handle_inline=self.worker.handle_frame,
            answer_inline=self._cheap,
            host=config.host,
            port=config.port,
            token=config.token,
            certfile=config.certfile,
            keyfile=config.keyfile,
            max_frame_mb=config.max_frame_mb,
            peer_secrets={p.id: secret for p in config.peers if (secret := p.secret()) is not None},
            credentials=self.credentials(config),
            open_session=self._open_session,
            close_session=self._close_session,
        )
        for entry in config.data:
            tensor = load_tensor(entry)
            node.serve(new_id(), tensor, entry.tags, entry.description)

    def add_dataset(self, dataset: Any, key: str, tags: Iterable[str] = (), description: str | None = None) -> None:
        """Serve ``dataset`` under ``key``, as PySyft's ``server.add_dataset(dataset, key="mnist")``."""
        self.worker.add_dataset(dataset, key, tags, description)

    def connections(self) -> dict[str, int]:
        """Principal -> open connections (for ``INFO "status"``)."""
        out: dict[str, int] = {}
        for (principal, _), n in list(self._connections.items()):
            out[principal] = out.get(principal, 0) + n
        return out

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
        key = (principal, session)
        ending = self._ending.pop(key, None)
        if ending is not None:  # a reconnect within the grace period: the session goes on
            ending.cancel()
        self._connections[key] = self._connections.get(key, 0) + 1
        caller = node.caller(principal, session, address)
        node.audit.connected(caller)
        log.info("node %s: %s connected from %s (session %s)", self.config.id, principal, address or "?",
                 session[:8], extra={"event": "connect", "principal": principal, "address": address})
        handle_frame = self.worker.handle_frame

        def handle(frame: bytes | bytearray | memoryview) -> Chunks:
            sent_before = {pid: p.session.last_seq for pid, p in list(self.worker.peers.items())}
            reply = handle_frame(frame, caller)
            self._wait_for_peers(sent_before)
            return reply

        def handle_inline(frame: bytes | bytearray | memoryview) -> Chunks:
            return handle_frame(frame, caller)

        return handle, handle_inline

    def _close_session(self, principal: str, session: str) -> None:
        """One connection of a session ended; the last one starts the grace period.

        Runs on the event loop (as :meth:`_open_session` does), so the count, the timers and
        the end of a session never race a reconnect.
        """
        key = (principal, session)
        log.debug("node %s: %s disconnected (session %s)", self.config.id, principal, session[:8])
        left = self._connections.get(key, 0) - 1
        if left > 0:
            self._connections[key] = left
            return
        self._connections.pop(key, None)
        caller = self.worker.node.caller(principal, session)
        self.worker.node.streams.drop_caller(caller)  # a chunked transfer broken off stores nothing
        loop = asyncio.get_running_loop()
        self._ending[key] = loop.call_later(self.session_grace, self._end_session, key, caller)

    def _end_session(self, key: tuple[str, str], caller: Caller) -> None:
        """The grace period is over and nobody reconnected: free the session's objects."""
        self._ending.pop(key, None)
        if key in self._connections:  # reconnected (the reconnect also cancels the timer)
            return
        self.worker.node.end_session(caller)

    @property
    def url(self) -> str | None:
        return self.server.url

    # -- peers ---------------------------------------------------------------------------

    def _add_peer(self, worker_id: str, address: str | None) -> None:
        """Open a link to a peer the operator listed (a coordinator asked for it).

        The link goes to the listed URL, presents the credential listed for that peer
        (never this node's own token) and checks the peer is who it is listed as. Anything
        else is refused with :data:`PEER_REFUSED`, before any connection attempt; in the
        development mode (``open_peers``) an unlisted address is linked with no credential.

        Raises:
            OpNotAllowedError: the peer is not listed (at that URL).
        """
        entry = self.listed_peers.get(worker_id)
        if entry is not None and address == f"dialout://{worker_id}" and self.relay is not None:
            self._add_relayed_peer(entry)
            return
        if entry is not None and (not address or same_url(address, entry.url)):
            url, token, secret, tls = entry.url, entry.credential(), entry.secret(), _tls(entry)
        elif self.config.open_peers and address:
            url, token, secret, tls = address, None, None, None
        else:
            raise OpNotAllowedError(PEER_REFUSED)
        old = self.worker.peers.get(worker_id)
        if isinstance(old, WebsocketClientWorker) and same_url(old.address, url) and old.connected:
            return
        peer = WebsocketClientWorker(
            self.hook,
            url=url,
            id=worker_id,
            token=token,
            timeout=self.peer_timeout,
            connect_timeout=self.peer_timeout,
            ssl=tls,
            peer_name=self.config.id,
            peer_secret=secret,
        )
        self.worker.peers[worker_id] = peer

    def _add_relayed_peer(self, entry: PeerEntry) -> None:
        """Link to a listed peer that dials out too, through the coordinator's relay."""
        old = self.worker.peers.get(entry.id)
        if isinstance(old, RelayPeer) and old.connected:
            return
        token = entry.credential()
        if token is None:
            raise OpNotAllowedError(f"relaying to {entry.id!r} needs the token it issued to this node ([[peers]] token)")
        assert self.relay is not None
        self.worker.peers[entry.id] = RelayPeer(
            self.hook, self.relay, self.config.id, entry.id, token=token, secret=entry.secret(),
            timeout=self.peer_timeout, max_frame_mb=self.config.max_frame_mb,
        )

    def _relay_secret(self, peer_id: str) -> bytes | None:
        """The secret of a listed peer's link (None: none); an unlisted peer is refused."""
        entry = self.listed_peers.get(peer_id)
        if entry is None:
            raise PermissionError(peer_id)
        return entry.secret()

    def _cheap(self, frame: bytes | bytearray | memoryview) -> bool:
        """Whether ``frame`` is cheap enough to answer on the event loop (see fedws.node.inline)."""
        return cheap_frame(frame, self.worker.node.store)

    def _handle(self, frame: bytes | bytearray | memoryview) -> Chunks:
        sent_before = {pid: p.session.last_seq for pid, p in list(self.worker.peers.items())}
        reply = self.worker.handle_frame(frame)
        self._wait_for_peers(sent_before)
        return reply

    def _wait_for_peers(self, sent_before: dict[str, int]) -> None:
        """Answer a frame only once the commands it sent on to other nodes have run there.

        So when a coordinator's ``await ptr`` returns for an op on a pointer chain, the data
        at the end of the chain exists too (causal order across nodes). Only the peers this
        frame sent commands to are waited on, for at most ``peer_timeout``, in this
        connection's thread: a peer that never answers holds up the coordinator that used
        it, not everyone.
        """
        for peer_id, peer in list(self.worker.peers.items()):
            session = peer.session
            last = session.last_seq
            if last <= sent_before.get(peer_id, 0) or last <= session.acked:
                continue
            fut = session.ack_future(last)
            peer.flush()
            try:
                fut.result(self.peer_timeout)
            except Exception:  # the peer's error surfaces where its result is used
                log.debug("node %s: peer %s reported an error or did not answer", self.config.id, peer.id)

    # -- dialing out (a node behind a firewall) ------------------------------------------

    def dial_out(
        self,
        url: str,
        token: str,
        *,
        ssl: ssl.SSLContext | None = None,
        on_connected: Callable[[str, str], None] | None = None,
        pool: FairPool | None = None,
        gate: asyncio.Semaphore | None = None,
    ) -> DialOut:
        """This node dialing the coordinator at ``url`` instead of listening (run its ``run()``).

        The coordinator must prove it knows ``token``; it then acts as the principal
        ``token`` names in this node's credentials (trust model: :mod:`fedws.transport.dialer`).

        Raises:
            ValueError: ``token`` is none of the tokens this node accepts.
        """
        principal = self.credentials(self.config).principal_for(f"Bearer {token}")
        if principal is None or not token:
            raise ValueError("the token to dial with is none of the tokens this node accepts ([[tokens]] / --token)")
        digests = [(t.principal, bytes.fromhex(t.sha256)) for t in self.config.tokens]
        if self.config.token:
            digests.append((DEFAULT_PRINCIPAL, bytes.fromhex(token_digest(self.config.token))))
        dialing = bytes.fromhex(token_digest(token))  # the coordinator's own: never a relayed peer's
        self.relay = RelayMux(
            self.config.id, open_session=self._open_session, close_session=self._close_session,
            listed_secret=self._relay_secret, digests=[d for d in digests if d[1] != dialing], answer_inline=self._cheap,
        )
        return DialOut(
            self.config.id, url, token, principal=principal, open_session=self._open_session,
            close_session=self._close_session, answer_inline=self._cheap, ssl=ssl,
            max_frame_mb=self.config.max_frame_mb, on_connected=on_connected, relay=self.relay,
            pool=pool, gate=gate,
        )

    # -- serving -------------------------------------------------------------------------

    async def start(self) -> str:
        """Start listening; returns the URL (with the real port when port 0 was asked)."""
        return await self.server.start()

    async def serve_until_stopped(self) -> None:
        """Run until :meth:`stop`, SIGINT or SIGTERM, then close connections cleanly."""
        self.install_signal_handlers()
        await self._stopped.wait()
        log.info("node %s: stopping (up %.0f s, %d connection(s) open)", self.config.id,
                 self.worker.node.started.uptime(), sum(self._connections.values()))
        await self.server.aclose()
        for peer in list(self.worker.peers.values()):
            peer.close()
        log.info("node %s: stopped", self.config.id, extra={"event": "stop"})


def _tls(entry: PeerEntry) -> ssl.SSLContext | None:
    """The TLS context for a ``wss://`` peer: its pinned certificate, else the system CAs."""
    if entry.cafile is None:
        return None
    return ssl.create_default_context(cafile=str(entry.cafile))


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


def dial(server: NodeServer, url: str, token: str, *, cafile: str | None = None,
         ready: Callable[[str], None] | None = None) -> None:
    """Run ``server`` as a dial-out node of the coordinator at ``url`` until SIGINT/SIGTERM.

    ``ready(url)`` is called after every accepted handshake (the first one: the node is up).

    Raises:
        AuthenticationError: the coordinator refused the token or could not prove it.
    """
    tls = ssl.create_default_context(cafile=cafile) if cafile else None
    dialer = server.dial_out(url, token, ssl=tls, on_connected=lambda _name, u: ready(u) if ready else None)

    async def main() -> None:
        server.install_signal_handlers()
        running = asyncio.create_task(dialer.run())
        stopped = asyncio.create_task(server._stopped.wait())
        await asyncio.wait({running, stopped}, return_when=asyncio.FIRST_COMPLETED)
        await dialer.stop()
        stopped.cancel()
        try:
            await running
        finally:
            for peer in list(server.worker.peers.values()):
                peer.close()

    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main())
    else:
        uvloop.run(main())


def roles(config: NodeConfig) -> dict[str, frozenset[str]]:
    """Principal -> what the operator granted it (principals without ``may``: everything).

    A principal named by several tokens gets what any of them grants.
    """
    out: dict[str, frozenset[str]] = {}
    unrestricted = {t.principal for t in config.tokens if t.may is None}
    for t in config.tokens:
        if t.may is not None and t.principal not in unrestricted:
            out[t.principal] = out.get(t.principal, frozenset()) | t.may
    return out
