"""NodeListener: a coordinator that nodes dial (nodes behind firewalls or NAT).

``sy.serve(host, port, token=...)`` starts one; ``listener.wait_for_nodes(n, timeout)``
returns the workers that dialed in. Each is a :class:`Worker` on an
:class:`~fedws.transport.accept.AcceptedLink`: pointers, plans and FedAvg use it exactly as a
worker from ``sy.connect(url)``. When a node's connection drops, its worker stays in the
federation (pending calls fail with ConnectionLostError); the node redials with backoff and
the same worker, under the same session key, carries on with the node's objects, if it came
back within the node's session grace. Who proves what to whom is in
:mod:`fedws.transport.dialer`.

Node to node: a dial-out node cannot be reached at an address, so ``alice.add_worker(bob)``
between two dial-out nodes makes alice's link to bob run through this coordinator, which
forwards the bytes without decoding them (:class:`~fedws.transport.relay.RelayRouter`; who
proves what to whom is in :mod:`fedws.transport.relay`). A dial-out node may also link to a
listening peer directly (``ws://``), as any node does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ..exceptions import FedwsTimeoutError, PointerError
from ..protocol.messages import Kind
from ..transport.accept import AcceptedLink, NodeAcceptor
from ..transport.handshake import new_session_key
from ..transport.io_thread import IOThread, wait
from ..transport.link import Endpoint
from ..transport.relay import RelayRouter
from .federation import Federation
from .worker import Worker

__all__ = ["NodeListener", "DialedWorker"]


class DialedWorker(Worker):
    """A worker whose node dialed this coordinator (``address`` is ``dialout://ID``)."""

    link: AcceptedLink

    def add_worker(self, worker: Worker) -> Worker:
        """Tell this node where ``worker`` is: a dial-out node (``dialout://ID``) is reached
        through this coordinator's relay, a listening one at its URL. The node links only to
        peers its operator listed (``[[peers]]``).

        Raises:
            OpNotAllowedError: the node's operator did not list that peer.
            RemoteError: the peer could not be reached, refused, or could not prove who it is.
        """
        address = worker.address
        if address is None or not address.startswith(("ws://", "wss://", "dialout://")):
            raise PointerError(f"worker {worker.id!r} has no address a node could reach it at")
        seq, _ = self.submit(Kind.ADD_PEER, worker.id, address)
        wait(self.ack_future(seq), self.timeout, f"add_worker({worker.id!r}) on worker {self.id!r}")
        self.peers[worker.id] = worker
        return self

    def reconnect(self) -> DialedWorker:
        """Nothing to do here: the node redials by itself (kept for API parity)."""
        return self


class NodeListener:
    """Accepts dial-out nodes into ``federation``; one IO thread carries every link.

    Args:
        federation: the federation the nodes' workers join.
        host, port: where to listen (port 0 picks a free one, kept across :meth:`start`).
        token: the token nodes present (``--token-file`` on the node).
        tokens: node id -> that node's own token (overrides ``token`` for it).
        name: the coordinator's name in its proof to the nodes.
        certfile, keyfile: listen on ``wss://``.
        timeout: default seconds a blocking call on the workers waits.
    """

    def __init__(
        self,
        federation: Federation[Worker],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        tokens: Mapping[str, str] | None = None,
        name: str = "coordinator",
        certfile: str | None = None,
        keyfile: str | None = None,
        timeout: float | None = 60.0,
        max_frame_mb: float = 1024.0,
    ) -> None:
        self.federation = federation
        self.timeout = timeout
        self.max_frame_mb = max_frame_mb
        self.io = IOThread.get()
        self.acceptor = NodeAcceptor(
            self._on_node, self._session_for, token=token, tokens=tokens, name=name, host=host, port=port,
            certfile=certfile, keyfile=keyfile, max_frame_mb=max_frame_mb, connected=self._is_connected,
        )
        self.nodes: dict[str, DialedWorker] = {}
        self.relay = RelayRouter(self._relay_send)
        self._sessions: dict[str, str] = {}
        self._changed: asyncio.Condition | None = None  # made on the IO loop

    @property
    def url(self) -> str | None:
        """Where nodes dial (``ws://host:port``), once started."""
        return self.acceptor.url

    def _session_for(self, node_id: str) -> str:
        key = self._sessions.get(node_id)
        if key is None:
            key = self._sessions[node_id] = new_session_key()
        return key

    def _is_connected(self, node_id: str) -> bool:
        worker = self.nodes.get(node_id)
        return worker is not None and worker.connected

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _on_node(self, node_id: str, session: str, ws: ServerConnection) -> None:
        worker = self.nodes.get(node_id)
        if worker is None:
            max_mb = self.max_frame_mb

            router = self.relay

            def link(endpoint: Endpoint) -> AcceptedLink:
                accepted = AcceptedLink(endpoint, node_id, max_frame_mb=max_mb)
                accepted.relay = lambda message: router.handle(node_id, message)
                return accepted

            worker = DialedWorker(self.federation, node_id, link=link, timeout=self.timeout)
            self.nodes[node_id] = worker
        elif self.federation.workers.get(node_id) is not worker:
            self.federation.register(worker)
        await self.relay.node_gone(node_id)  # channels over an earlier connection are gone
        await worker.link.attach(ws, worker.session.reset)
        changed = self._condition()
        async with changed:
            changed.notify_all()
        await ws.wait_closed()
        if worker.link._ws is None or getattr(worker.link._ws, "_ws", None) is ws:
            await self.relay.node_gone(node_id)
        async with changed:
            changed.notify_all()

    async def _relay_send(self, node_id: str, data: Any) -> bool:
        """Write a relay message on ``node_id``'s connection (False: it is not connected)."""
        worker = self.nodes.get(node_id)
        ws = worker.link._ws if worker is not None and worker.connected else None
        if ws is None:
            return False
        try:
            await ws.send(data)
        except ConnectionClosed:
            return False
        return True

    def connected(self) -> list[DialedWorker]:
        """The workers whose node is connected now, by id."""
        return [w for _, w in sorted(self.nodes.items()) if w.connected]

    # -- lifecycle -----------------------------------------------------------------------

    async def _start(self) -> str:
        return await self.acceptor.start()

    def start(self) -> NodeListener:
        """Listen (again, on the same port after :meth:`close`); nodes redial on their own."""
        self.io.run(self._start(), 30.0, "start listening for nodes")
        return self

    async def start_async(self) -> NodeListener:
        await asyncio.wrap_future(self.io.submit(self._start()))
        return self

    def close(self) -> None:
        """Stop listening and close every node's connection (their workers stay)."""
        self.io.run(self.acceptor.aclose(), 30.0, "close the node listener")

    async def aclose(self) -> None:
        await asyncio.wrap_future(self.io.submit(self.acceptor.aclose()))

    def __enter__(self) -> NodeListener:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> NodeListener:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # -- waiting for nodes ---------------------------------------------------------------

    async def _wait(self, n: int, timeout: float | None) -> list[DialedWorker]:
        changed = self._condition()

        async def enough() -> None:
            async with changed:
                await changed.wait_for(lambda: len(self.connected()) >= n)

        try:
            await asyncio.wait_for(enough(), timeout)
        except TimeoutError:
            raise FedwsTimeoutError(
                f"{len(self.connected())} of {n} nodes dialed in to {self.url} within {timeout} s"
            ) from None
        return self.connected()

    def wait_for_nodes(self, n: int, timeout: float | None = None) -> list[DialedWorker]:
        """Block until ``n`` nodes are connected; returns the connected workers (by id).

        Works in Jupyter: the wait runs on the fedws IO thread, not the caller's loop.

        Raises:
            FedwsTimeoutError: fewer than ``n`` nodes connected within ``timeout`` seconds.
        """
        return self.io.run(self._wait(n, timeout), None, f"wait for {n} nodes")

    async def wait_for_nodes_async(self, n: int, timeout: float | None = None) -> list[DialedWorker]:
        """``await listener.wait_for_nodes_async(n, timeout)``: :meth:`wait_for_nodes` for async code."""
        return await asyncio.wrap_future(self.io.submit(self._wait(n, timeout)))

    def __repr__(self) -> str:
        return f"<NodeListener {self.url} nodes={[w.id for w in self.connected()]}>"

