"""The in-process link: frames handed to a node in this process, synchronously.

A :class:`fedws.VirtualWorker` is a worker handle on this link: every request is encoded,
handed to the node's frame handler as bytes and answered before ``flush`` returns, exactly
as a remote node would answer it. A request nobody waits on yet (``flush(urgent=False)``)
is held, like the WebSocket link holds it for a millisecond, so the requests of a burst
share one frame; any urgent flush, of any in-process link, first runs every held frame in
the order they were held, so nothing can observe a node before what was sent to it earlier
(the in-process node has no thread of its own to run them "a millisecond later"). The registry lets ``connect("inproc://bob")`` open a
second handle (a second coordinator session) to a node already living in this process.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ..exceptions import ConnectionLostError, FedwsConnectionError, FedwsError
from .link import Endpoint, FrameHandler

__all__ = ["InprocLink", "register_node", "unregister_node", "lookup_node", "inproc_name", "run_held"]

_registry: dict[str, Callable[[], FrameHandler | None]] = {}
_registry_lock = threading.Lock()
# Links holding frames nobody waits on yet, oldest first (an ordered set); see flush().
_held: dict[InprocLink, None] = {}
_held_lock = threading.Lock()
# Links whose node is running a frame on this thread: a nested flush must not run their
# next frame inside the current one (replies must come back in the order frames left).
_running = threading.local()


def run_held() -> None:
    """Run every held in-process frame now, oldest link first (what an urgent flush does)."""
    while _held:
        with _held_lock:
            busy: set[InprocLink] = getattr(_running, "links", set())
            link = next((k for k in _held if k not in busy), None)
            if link is None:
                return
            del _held[link]
        link._run()


def register_node(name: str, handler: FrameHandler) -> None:
    """Make ``handler`` reachable as ``inproc://name`` (held weakly; the latest one wins)."""
    ref: Callable[[], Any]
    if hasattr(handler, "__self__") and hasattr(handler, "__func__"):
        ref = weakref.WeakMethod(handler)
    else:
        ref = weakref.ref(handler)
    with _registry_lock:
        _registry[name] = ref


def unregister_node(name: str, handler: FrameHandler) -> None:
    """Forget ``inproc://name`` if ``handler`` is still what it reaches."""
    with _registry_lock:
        ref = _registry.get(name)
        if ref is not None and ref() in (handler, None):
            del _registry[name]


def lookup_node(name: str) -> FrameHandler:
    """The frame handler registered as ``inproc://name``.

    Raises:
        FedwsConnectionError: no live node of that name in this process.
    """
    with _registry_lock:
        ref = _registry.get(name)
    handler = ref() if ref is not None else None
    if handler is None:
        with _registry_lock:
            known = sorted(n for n, r in _registry.items() if r() is not None)
        raise FedwsConnectionError(
            f"no in-process node named {name!r} (known: {', '.join(known) or 'none'}); "
            "create one with sy.VirtualWorker(hook, id=...) first"
        )
    return handler


def inproc_name(url: str) -> str:
    """The node name of an ``inproc://NAME`` URL.

    Raises:
        ValueError: not an inproc URL, or no name in it.
    """
    parts = urlsplit(url)
    name = parts.netloc or parts.path.lstrip("/")
    if parts.scheme != "inproc" or not name:
        raise ValueError(f"not an in-process URL: {url!r} (expected inproc://NAME)")
    return name


class InprocLink:
    """A link to a node in this process: ``flush`` runs the node on the caller's thread.

    Frames of one link run one at a time, in order (a re-entrant lock: a node may follow a
    pointer back through its own link), so replies come back in the order frames left.

    Args:
        endpoint: the session side (takes frames, receives replies).
        handler: the node's ``frame -> reply`` function.
        address: the link's name, ``inproc://NAME``.
    """

    def __init__(self, endpoint: Endpoint, handler: FrameHandler, address: str | None = None) -> None:
        self.endpoint = endpoint
        self.handler = handler
        self._address = address
        self._lock = threading.RLock()
        self._closed = False

    @property
    def address(self) -> str | None:
        return self._address

    @property
    def connected(self) -> bool:
        return not self._closed

    def flush(self, *, urgent: bool = True) -> None:
        """Run the queued requests through the node: now, or with the next urgent flush.

        ``urgent=False`` (nobody waits on an answer yet) holds them, so a burst of commands
        shares one frame. An urgent flush runs every held frame of every in-process link
        first, in the order they were held, then this link's: whatever waits (a value, an
        ack, ``_objects``, another node fetching from this one) sees everything sent before.
        """
        if self._closed:
            return
        if not urgent:
            with _held_lock:
                _held[self] = None
            return
        run_held()
        self._run()

    def _run(self) -> None:
        if self._closed:
            return
        endpoint, handler = self.endpoint, self.handler
        with self._lock:
            busy: set[InprocLink] | None = getattr(_running, "links", None)
            if busy is None:
                busy = _running.links = set()
            nested = self in busy
            busy.add(self)
            try:
                while (frame := endpoint.take_frame()) is not None:
                    reply = handler(b"".join(frame))
                    endpoint.receive(b"".join(reply))
            finally:
                if not nested:
                    busy.discard(self)

    def flush_soon(self) -> None:
        """Nothing: it may run inside ``__del__``; the next flush carries the requests."""

    def flush_and_wait(self, timeout: float | None) -> None:
        """Same as :meth:`flush`: when it returns the node has read the frame."""
        self.flush()

    def close(self) -> None:
        """Stop delivering frames; pending requests fail with ConnectionLostError."""
        if self._closed:
            return
        with _held_lock:
            held = self in _held
            _held.pop(self, None)
        if held:  # what was sent before close reaches the node, as it always did
            self._run()
        self._closed = True
        self.endpoint.link_lost(self._lost(f"connection to {self._address or 'the node'} was closed"))

    async def aclose(self) -> None:
        self.close()

    @staticmethod
    def _lost(message: str) -> FedwsError:
        return ConnectionLostError(message)

    def __repr__(self) -> str:
        return f"<InprocLink {self._address or ''}{' closed' if self._closed else ''}>"
