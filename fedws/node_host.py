"""Many logical nodes in one process: ``fedws worker --nodes N`` or ``[[node]]`` tables.

A simulation of 1,000 nodes should take a handful of processes, not 1,000 (each process
imports torch: ~1 s and ~200 MB). A :class:`NodeHost` keeps one :class:`NodeServer` per
logical node — its own object store, policy (callers, roles, private flags), audit records,
tokens and id, exactly as in a process of its own — and one socket for all of them: the
handshake's path picks the node (``ws://host:port/alice``), and from then on the connection
is that node's (:class:`~fedws.transport.server.FrameServer` ``routes``). Nothing a node
holds is reachable from another node's connection: each connection runs one node's frame
handler, which knows one node's store.

Costs per node stay small because nothing per node is eager beyond plain objects: no
thread, no socket, no task. An idle node is a few tens of KB (``bench/bench_node_memory.py``).
The process has one event loop; compute runs in the handler thread of each connection
(made on its first heavy frame), so one busy node occupies only its own connections'
threads and the OS scheduler shares the cores between nodes that have work — a node with
a long plan cannot hold up the pings, gets or other nodes' plans of its neighbours.

The ``NodeServer`` stays the unit: a host is a set of them, and with ``--connect`` each
dials the coordinator on its own (:meth:`NodeHost.dial_out`): one
:class:`~fedws.transport.dialer.DialOut` per node, all on the host's one event loop. A host
of hundreds of dial-out nodes

- spreads its nodes' first dials over ``spread`` seconds (jittered) and keeps at most
  :data:`DIAL_CONCURRENCY` handshakes in flight, so 250 nodes starting at once neither
  stampede the coordinator nor trip its per-address limit on pending handshakes (several
  hosts behind one address — one machine, one NAT — stay under it together);
- runs every node's frames on one bounded :class:`~fedws.transport.fair_pool.FairPool`
  (a node's frames in order, nodes taking turns) instead of a thread per connection.

Tokens of a dial-out host: each node dials with its own config's token — the ``token`` of
its ``[[node]]`` table, else the host's ``--token-file`` (``--nodes N``: one token for all N,
the host is one operator's trust domain). The coordinator checks it per node id
(``sy.serve(token=T)`` for one shared token, ``tokens={id: t}`` for per-node ones) and proves
it knows it to each node; a node id already connected there is refused (HTTP 409) — two
hosts with the same ids need different ``--id-prefix``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl as ssl_module
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from .node.audit import open_audit_log
from .node_config import NodeConfig
from .node_process import NodeServer, Stoppable
from .transport.dialer import DialOut
from .transport.fair_pool import FairPool
from .transport.link import Chunks
from .transport.server import FrameServer, node_name

__all__ = ["NodeHost", "node_configs", "serve_host", "dial_host", "MAX_NODES", "DIAL_CONCURRENCY"]

log = logging.getLogger("fedws.server")

MAX_NODES = 100_000
"""Most logical nodes one host accepts (a typo of ``--nodes`` should not eat the machine)."""

DIAL_CONCURRENCY = 16
"""Handshakes one dial-out host has in flight at most (a coordinator refuses more than 64
pending from one address; four hosts on one machine stay under it together)."""


def node_configs(base: NodeConfig, n: int, prefix: str = "node-") -> list[NodeConfig]:
    """``n`` copies of ``base`` with ids ``{prefix}0 .. {prefix}{n-1}`` (``--nodes N``).

    Each node serves the data ``base`` lists (its own copy, loaded once per node) and
    accepts ``base``'s tokens; its audit records go to ``base.audit_log`` (one file for the
    host, each line names its node).

    Raises:
        ValueError: ``n`` out of range, or the prefix makes ids that are not path names.
    """
    if not 1 <= n <= MAX_NODES:
        raise ValueError(f"--nodes takes 1 to {MAX_NODES}, got {n}")
    configs = [replace(base, id=f"{prefix}{i}", audit_log=None) for i in range(n)]
    check_ids(configs)
    return configs


def check_ids(configs: Sequence[NodeConfig]) -> None:
    """Every node id is distinct and usable as a URL path (letters, digits, ``. _ -``).

    Raises:
        ValueError: naming the offending id.
    """
    seen: set[str] = set()
    for cfg in configs:
        if node_name("/" + cfg.id) != cfg.id:
            raise ValueError(
                f"node id {cfg.id!r} cannot be a URL path: use up to 64 letters, digits, '.', '_' or '-'"
            )
        if cfg.id in seen:
            raise ValueError(f"node id {cfg.id!r} is given twice")
        seen.add(cfg.id)


class NodeHost(Stoppable):
    """Several logical nodes behind one socket, each reached at ``URL/ID``.

    Args:
        configs: one per node (ids distinct); each node's store, policy, tokens, peers,
            data, limits and audit log come from its own config.
        host, port, certfile, keyfile, max_frame_mb: the socket (default: the first
            config's); per-node values of these are not used.
        audit_log: one audit file for every node of the host (each line names its node),
            for nodes whose config names none.
    """

    def __init__(
        self,
        configs: Sequence[NodeConfig],
        *,
        host: str | None = None,
        port: int | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        max_frame_mb: float | None = None,
        audit_log: str | None = None,
    ) -> None:
        if not configs:
            raise ValueError("a node host needs at least one node")
        check_ids(configs)
        first = configs[0]
        if audit_log:
            self._audit_handler = open_audit_log(audit_log)
        self.nodes: dict[str, NodeServer] = {cfg.id: NodeServer(cfg) for cfg in configs}
        self.server = FrameServer(
            f"host-of-{len(configs)}",
            _no_node,
            host=host or first.host,
            port=first.port if port is None else port,
            certfile=certfile or first.certfile,
            keyfile=keyfile or first.keyfile,
            max_frame_mb=max(c.max_frame_mb for c in configs) if max_frame_mb is None else max_frame_mb,
            routes=self._route,
        )
        self._stopped = asyncio.Event()
        self.pool: FairPool | None = None  # dial-out hosts only (dial_out makes it)

    def _route(self, name: str) -> FrameServer | None:
        if not name and len(self.nodes) == 1:  # a host of one node keeps its bare URL
            return next(iter(self.nodes.values())).server
        node = self.nodes.get(name)
        return node.server if node is not None else None

    @property
    def url(self) -> str | None:
        """The socket's URL; each node is at ``url + "/" + id``."""
        return self.server.url

    def node_url(self, node_id: str) -> str:
        """Where ``node_id`` is reached (``ws://host:port/node_id``).

        Raises:
            KeyError: no such node here.
            RuntimeError: the host does not listen yet.
        """
        if node_id not in self.nodes:
            raise KeyError(node_id)
        if self.url is None:
            raise RuntimeError("the node host does not listen yet: await start() first")
        return f"{self.url}/{node_id}"

    def add_dataset(self, node_id: str, dataset: object, key: str, tags: Iterable[str] = ()) -> None:
        """Serve ``dataset`` on one node (as ``NodeServer.add_dataset``)."""
        self.nodes[node_id].add_dataset(dataset, key, tags)

    async def start(self) -> str:
        """Start listening; returns the socket's URL (nodes at ``URL/ID``)."""
        url = await self.server.start()
        for node in self.nodes.values():
            node.server.url = f"{url}/{node.config.id}"
        return url

    def dial_out(
        self,
        url: str,
        *,
        ssl: ssl_module.SSLContext | None = None,
        spread: float | None = None,
        threads: int | None = None,
        on_connected: Callable[[str, str, str], None] | None = None,
    ) -> list[DialOut]:
        """Every node dialing the coordinator at ``url`` with its own config's token.

        Run the returned dialers' ``run()`` on one loop (:func:`dial_host` does). Frames of
        all nodes share one :class:`FairPool` of ``threads`` threads.

        Args:
            spread: seconds over which the nodes' first dials are spread (default: 10 ms
                per node, at most 5 s).
            on_connected: ``(node id, coordinator name, url)`` after each accepted handshake.

        Raises:
            ValueError: a node has no token (or one it does not accept itself).
        """
        missing = [cfg.id for cfg in (n.config for n in self.nodes.values()) if not cfg.token]
        if missing:
            raise ValueError(f"dial-out nodes need the token shared with the coordinator; none for {missing[:3]}")
        self.pool = FairPool(threads, name="fedws-host")
        gate = asyncio.Semaphore(DIAL_CONCURRENCY)
        spread = min(5.0, 0.01 * len(self.nodes)) if spread is None else spread
        dialers = []
        for node_id, node in self.nodes.items():
            def connected(name: str, where: str, node_id: str = node_id) -> None:
                if on_connected is not None:
                    on_connected(node_id, name, where)

            token = node.config.token
            assert token is not None
            dialer = node.dial_out(url, token, ssl=ssl, on_connected=connected, pool=self.pool, gate=gate)
            dialer.start_delay = random.uniform(0, spread)
            dialers.append(dialer)
        return dialers

    async def serve_until_stopped(self) -> None:
        """Run until :meth:`stop`, SIGINT or SIGTERM, then close every connection."""
        self.install_signal_handlers()
        await self._stopped.wait()
        log.info("node host: stopping %d nodes", len(self.nodes))
        await self.server.aclose()
        for node in self.nodes.values():
            for peer in list(node.worker.peers.values()):
                peer.close()
        log.info("node host: stopped", extra={"event": "stop"})


def _no_node(frame: bytes | bytearray | memoryview) -> Chunks:  # pragma: no cover - routes always pick one
    raise RuntimeError("a node host answers frames only through one of its nodes")


def serve_host(host: NodeHost, *, ready: Callable[[str], None] | None = None) -> None:
    """Run ``host`` until SIGINT/SIGTERM; ``ready(url)`` once it listens (as ``serve``).

    Raises:
        OSError: the address cannot be bound.
    """

    async def main() -> None:
        host.install_signal_handlers()  # before ready: a SIGTERM right after it stops cleanly
        url = await host.start()
        if ready is not None:
            ready(url)
        await host.serve_until_stopped()

    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main())
    else:
        uvloop.run(main())


def dial_host(
    host: NodeHost,
    url: str,
    *,
    cafile: str | None = None,
    spread: float | None = None,
    threads: int | None = None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Run every node of ``host`` as a dial-out node of the coordinator at ``url``, until
    SIGINT/SIGTERM; ``ready(n)`` once all ``n`` nodes were accepted the first time.

    Raises:
        AuthenticationError: the coordinator refused a node's token or could not prove it.
        ValueError: a node has no token.
    """
    from .transport.accept import raise_fd_limit

    raise_fd_limit()
    tls = ssl_module.create_default_context(cafile=cafile) if cafile else None
    up: set[str] = set()
    total = len(host.nodes)

    def connected(node_id: str, _name: str, _url: str) -> None:
        if node_id not in up:
            up.add(node_id)
            if len(up) == total and ready is not None:
                ready(total)

    dialers = host.dial_out(url, ssl=tls, spread=spread, threads=threads, on_connected=connected)

    async def main() -> None:
        host.install_signal_handlers()
        running = [asyncio.create_task(d.run()) for d in dialers]
        stopped = asyncio.create_task(host._stopped.wait())
        await asyncio.wait({*running, stopped}, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*(d.stop() for d in dialers), return_exceptions=True)
        stopped.cancel()
        results = await asyncio.gather(*running, return_exceptions=True)
        for node in host.nodes.values():
            for peer in list(node.worker.peers.values()):
                peer.close()
        if host.pool is not None:
            host.pool.shutdown()
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result

    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main())
    else:
        uvloop.run(main())
