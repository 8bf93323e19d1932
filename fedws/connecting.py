"""``sy.connect(url)``: a worker handle, its link picked by the URL's scheme.

``ws://`` and ``wss://`` reach a node in another process (:class:`WebsocketClientWorker`);
``inproc://NAME`` opens a second coordinator session to a node living in this process (a
:class:`fedws.VirtualWorker` named NAME). Without ``hook``/``federation`` the handle joins
the process's default federation, handed in here explicitly: no constructor reads it.
"""

from __future__ import annotations

import ssl as ssl_module
from collections.abc import Mapping
from urllib.parse import urlsplit

from .client.federation import Federation
from .client.listener import NodeListener
from .client.websocket_worker import WebsocketClientWorker
from .client.worker import Worker, as_federation
from .exceptions import FedwsConnectionError
from .hook import TorchHook, default_federation
from .transport.inproc import InprocLink, inproc_name, lookup_node
from .transport.link import Endpoint

__all__ = ["connect", "connect_async", "SCHEMES", "serve", "serve_async"]

SCHEMES = ("ws", "wss", "inproc")
"""URL schemes :func:`connect` understands."""


def _federation(hook: TorchHook | Federation[Worker] | None, federation: Federation[Worker] | None) -> Federation[Worker]:
    if federation is not None:
        if hook is not None and as_federation(hook) is not federation:
            raise ValueError("give hook or federation, not two different ones")
        return federation
    chosen = as_federation(hook)
    return chosen if chosen is not None else default_federation()


def _scheme(url: str) -> str:
    if not isinstance(url, str):
        raise TypeError(f"url must be a string, got {type(url).__name__}")
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ValueError(f"cannot connect to {url!r}: expected ws://host:port, wss://host:port or inproc://NAME")
    return scheme


def _inproc(url: str, federation: Federation[Worker], id: str | None, timeout: float | None) -> Worker:
    name = inproc_name(url)
    handler = lookup_node(name)

    def link(endpoint: Endpoint) -> InprocLink:
        return InprocLink(endpoint, handler, f"inproc://{name}")

    if id is not None and id != name:
        raise FedwsConnectionError(f"the node at {url} is {name!r}, not {id!r}")
    return Worker(federation, name, link=link, timeout=timeout)


def connect(
    url: str,
    token: str | None = None,
    *,
    hook: TorchHook | Federation[Worker] | None = None,
    federation: Federation[Worker] | None = None,
    id: str | None = None,
    timeout: float | None = 60.0,
    connect_timeout: float = 10.0,
    ssl: ssl_module.SSLContext | None = None,
    max_frame_mb: float = 1024.0,
    ping_interval: float | None = 10.0,
) -> Worker:
    """Connect to a node (blocking) and return its handle. Usable as a context manager.

    Args:
        url: ``ws://host:port``, ``wss://host:port`` or ``inproc://NAME``.
        token: the node's shared token.
        hook: the TorchHook (or Federation) the handle joins.
        federation: the Federation the handle joins (default: the process's default one).
        id: the node's expected id; a node that names itself otherwise is refused.
        timeout: default seconds a blocking call waits.
        connect_timeout, ssl, max_frame_mb, ping_interval: see :class:`WebsocketClientWorker`.

    Raises:
        ValueError: a malformed URL or an unknown scheme.
        AuthenticationError: the node refused the token.
        FedwsConnectionError: nothing answered, not a fedws node, or no such in-process node.

    Example:
        >>> with sy.connect("ws://127.0.0.1:8777") as alice:
        ...     print(torch.ones(2).send(alice).get())
    """
    scheme = _scheme(url)
    fed = _federation(hook, federation)
    if scheme == "inproc":
        return _inproc(url, fed, id, timeout)
    return WebsocketClientWorker(
        fed,
        id=id,
        url=url,
        token=token,
        timeout=timeout,
        connect_timeout=connect_timeout,
        ssl=ssl,
        max_frame_mb=max_frame_mb,
        ping_interval=ping_interval,
    )


async def connect_async(
    url: str,
    token: str | None = None,
    *,
    hook: TorchHook | Federation[Worker] | None = None,
    federation: Federation[Worker] | None = None,
    id: str | None = None,
    timeout: float | None = 60.0,
    connect_timeout: float = 10.0,
    ssl: ssl_module.SSLContext | None = None,
    max_frame_mb: float = 1024.0,
    ping_interval: float | None = 10.0,
) -> Worker:
    """``await sy.connect_async(url)``: :func:`connect` without blocking the caller's loop."""
    scheme = _scheme(url)
    fed = _federation(hook, federation)
    if scheme == "inproc":
        return _inproc(url, fed, id, timeout)
    worker = WebsocketClientWorker(
        fed,
        id=id,
        url=url,
        token=token,
        timeout=timeout,
        connect_timeout=connect_timeout,
        ssl=ssl,
        max_frame_mb=max_frame_mb,
        ping_interval=ping_interval,
        connect=False,
    )
    return await worker.connect_async()


def _listener(
    host: str, port: int, token: str | None, tokens: Mapping[str, str] | None,
    hook: TorchHook | Federation[Worker] | None, federation: Federation[Worker] | None,
    name: str, certfile: str | None, keyfile: str | None, timeout: float | None,
) -> NodeListener:
    return NodeListener(
        _federation(hook, federation), host, port, token=token, tokens=tokens, name=name,
        certfile=certfile, keyfile=keyfile, timeout=timeout,
    )


def serve(
    host: str = "127.0.0.1",
    port: int = 8778,
    *,
    token: str | None = None,
    tokens: Mapping[str, str] | None = None,
    hook: TorchHook | Federation[Worker] | None = None,
    federation: Federation[Worker] | None = None,
    name: str = "coordinator",
    certfile: str | None = None,
    keyfile: str | None = None,
    timeout: float | None = 60.0,
) -> NodeListener:
    """Listen for nodes that dial out (``fedws worker --connect URL --token-file F``).

    The nodes' workers join the federation (default: the process's default one) as they
    connect; ``listener.wait_for_nodes(n, timeout)`` returns them. Each node checks that
    this coordinator knows its token before it answers anything, and then treats it as the
    principal that token names in its own config (see :mod:`fedws.transport.dialer`).

    Args:
        host, port: where to listen (port 0 picks a free one: ``listener.url``).
        token: the token the nodes present; tokens: node id -> its own token.
        hook, federation: the federation the workers join.
        name: what this coordinator calls itself to the nodes.
        certfile, keyfile: listen on ``wss://``.
        timeout: default seconds a blocking call on the workers waits.

    Raises:
        ValueError: no token.
        OSError: the address cannot be bound.

    Example:
        >>> listener = sy.serve("0.0.0.0", 8778, token=token)
        >>> alice, bob = listener.wait_for_nodes(2, timeout=60)
    """
    return _listener(host, port, token, tokens, hook, federation, name, certfile, keyfile, timeout).start()


async def serve_async(
    host: str = "127.0.0.1",
    port: int = 8778,
    *,
    token: str | None = None,
    tokens: Mapping[str, str] | None = None,
    hook: TorchHook | Federation[Worker] | None = None,
    federation: Federation[Worker] | None = None,
    name: str = "coordinator",
    certfile: str | None = None,
    keyfile: str | None = None,
    timeout: float | None = 60.0,
) -> NodeListener:
    """``await sy.serve_async(...)``: :func:`serve` without blocking the caller's loop."""
    listener = _listener(host, port, token, tokens, hook, federation, name, certfile, keyfile, timeout)
    return await listener.start_async()
