"""WebsocketClientWorker: a worker handle on a :class:`~fedws.transport.websocket.WebsocketLink`.

The handle adds to :class:`Worker` only what a network node needs: it learns the node's id
from the handshake, reconnects to the same node (whose objects are still there), and tells
a node where its peers are (``add_worker``), so data moves node to node.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from typing import Any

from ..protocol.messages import Kind
from ..transport.io_thread import wait
from ..transport.link import Endpoint
from ..transport.websocket import WebsocketLink, check_websocket_url
from .worker import Worker, as_federation

__all__ = ["WebsocketClientWorker"]


class WebsocketClientWorker(Worker):
    """A worker node reached over ``ws://`` or ``wss://``.

    Args:
        hook: the federation's TorchHook (or a Federation; None: a handle in no federation).
        host, port: where the node listens (or give ``url``).
        id: the node's id; checked against what the node says it is.
        token: the node's shared token (``--token``/``FEDWS_TOKEN`` on the node).
        timeout: default seconds a blocking call waits (``get(timeout=...)`` overrides).
        connect_timeout: seconds to wait for the connection.
        ssl: an ``ssl.SSLContext`` for ``wss://`` (e.g. trusting a self-signed cert).
        max_frame_mb: largest reply accepted.
        compress: offer zstd compression of large frames (None: ``FEDWS_COMPRESS=zstd``;
            used only if the node agrees; needs ``fedws[compress]``).
        ping_interval: keepalive pings, seconds (None: none).
        connect: False to build the handle without connecting (``connect_async`` does so).
        peer_name, peer_secret: for a node linking to a listed peer: its own id and the
            secret the peer must prove it shares (see :class:`WebsocketLink`).

    Example:
        >>> alice = sy.WebsocketClientWorker(hook, host="127.0.0.1", port=8777, id="alice")
        >>> x = torch.ones(3).send(alice)
    """

    link: WebsocketLink

    def __init__(
        self,
        hook: Any = None,
        host: str = "127.0.0.1",
        port: int = 8777,
        id: str | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        secure: bool = False,
        timeout: float | None = 60.0,
        connect_timeout: float = 10.0,
        ssl: ssl_module.SSLContext | None = None,
        max_frame_mb: float = 1024.0,
        ping_interval: float | None = 10.0,
        connect: bool = True,
        peer_name: str | None = None,
        peer_secret: bytes | None = None,
        compress: bool | None = None,
    ) -> None:
        if url is None:
            url = f"{'wss' if secure or ssl else 'ws'}://{host}:{port}"
        check_websocket_url(url)

        def link(endpoint: Endpoint) -> WebsocketLink:
            return WebsocketLink(
                endpoint,
                url,
                expected_id=id,
                token=token,
                connect_timeout=connect_timeout,
                ssl=ssl,
                max_frame_mb=max_frame_mb,
                ping_interval=ping_interval,
                peer_name=peer_name,
                peer_secret=peer_secret,
                compress=compress,
            )

        super().__init__(None, id or url, link=link, timeout=timeout)
        self.federation = as_federation(hook)  # joined once connected, under the node's id
        if connect:
            self.link.io.run(self._connect(), None, f"connect to {url}")

    @property
    def address(self) -> str:
        """The node's ``ws://`` or ``wss://`` URL."""
        return self.link.address

    @property
    def token(self) -> str | None:
        return self.link.token

    @property
    def connect_timeout(self) -> float:
        return self.link.connect_timeout

    # -- connection ----------------------------------------------------------------------

    async def _connect(self) -> None:
        node_id = await self.link.connect()
        if self.id != node_id:
            self.id = node_id
            self.session.worker_id = node_id
        if self.federation is not None:
            self.federation.register(self)

    def reconnect(self) -> WebsocketClientWorker:
        """Open a new link to the same node; its stored objects are reachable again."""
        self.close()
        self.session.reset()
        self.link.io.run(self._connect(), None, f"reconnect to {self.address}")
        return self

    async def reconnect_async(self) -> WebsocketClientWorker:
        await self.aclose()
        self.session.reset()
        await asyncio.wrap_future(self.link.io.submit(self._connect()))
        return self

    async def connect_async(self) -> WebsocketClientWorker:
        """Connect a handle built with ``connect=False`` without blocking the caller's loop."""
        await asyncio.wrap_future(self.link.io.submit(self._connect()))
        return self

    def __enter__(self) -> WebsocketClientWorker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> WebsocketClientWorker:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # -- node-to-node --------------------------------------------------------------------

    def add_worker(self, worker: Worker) -> WebsocketClientWorker:
        """Tell this node where node ``worker`` is; it connects there itself.

        A node links only to the peers its operator listed (``[[peers]]`` in its config),
        under the id and URL listed there.

        Raises:
            OpNotAllowedError: the node's operator did not list that peer (at that URL).
            RemoteError: the node could not reach its peer or the peer could not prove who it is.
        """
        address = worker.address
        if address is None or not address.startswith(("ws://", "wss://")):
            raise ValueError(f"worker {worker.id!r} has no network address to give a node")
        seq, _ = self.submit(Kind.ADD_PEER, worker.id, address)
        # surface a refusal or a failure to connect now, not at the first move
        wait(self.ack_future(seq), self.timeout, f"add_worker({worker.id!r}) on worker {self.id!r}")
        self.peers[worker.id] = worker
        return self

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<WebsocketClientWorker id:{self.id} {self.address} {state}>"
