"""Link: the one small interface for moving frames between a coordinator and a node.

A link is bound to an :class:`Endpoint` — the coordinator's bookkeeping for one node (a
:class:`fedws.client.Session` behind a worker handle). The link pulls the next frame from
it, hands it the node's replies, and tells it when the link is lost. Everything about how
bytes move (in this process, over a WebSocket, into a test's list) is the link's business;
everything about what they mean is the endpoint's.

Three implementations: :class:`fedws.transport.inproc.InprocLink` (a node in this
process, synchronously), :class:`fedws.transport.websocket.WebsocketLink` (a node in
another process) and :class:`fedws.testing.MockLink` (records frames, replies on demand).

The methods mirror what a caller needs, not how a transport works:

- ``flush()``: someone waits on an answer: send what is queued now. ``flush(urgent=False)``
  says nobody waits yet, so a link may hold the frame for about a millisecond for more
  requests to share it.
- ``flush_soon()``: safe from ``__del__`` and from any thread; may do nothing (the next
  flush carries the queued requests).
- ``flush_and_wait(timeout)``: send now and return once the frame is written, because it
  borrows a tensor's memory that the caller must not change before then.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..exceptions import FedwsError

__all__ = ["Link", "Endpoint", "Chunks", "FrameHandler"]

Chunks = list[bytes | memoryview]
"""One frame (or one reply) as the chunks that, joined, are its bytes."""


class FrameHandler(Protocol):
    """Answers one frame with one reply: what a node offers a link (``Node.handle``)."""

    def __call__(self, frame: bytes | bytearray | memoryview, /) -> Chunks: ...


class Endpoint(Protocol):
    """The side of a link that produces frames and consumes replies (a worker's session)."""

    def take_frame(self) -> Chunks | None:
        """Everything queued, as the chunks of one frame; None when nothing is queued."""
        ...

    def receive(self, reply: bytes | bytearray | memoryview, /) -> None:
        """Apply one reply; replies arrive one per frame, in the order frames were taken."""
        ...

    def link_lost(self, error: FedwsError, /) -> None:
        """The link is gone: fail everything pending with ``error``."""
        ...


@runtime_checkable
class Link(Protocol):
    """Moves the frames of one endpoint to one node and the replies back."""

    @property
    def address(self) -> str | None:
        """Where the node is (``ws://host:port``, ``inproc://bob``), or None."""
        ...

    @property
    def connected(self) -> bool:
        """Whether frames can be sent now."""
        ...

    def flush(self, *, urgent: bool = True) -> None:
        """Send the queued frames (now, or within about a millisecond if not urgent).

        An in-process link, whose node runs on the caller's threads, holds non-urgent frames
        until the next urgent flush in the process instead: wait through
        ``Worker.ack_future`` (which flushes), not the session's bare futures."""
        ...

    def flush_soon(self) -> None:
        """Send queued frames shortly. Safe from ``__del__`` and any thread; may do nothing."""
        ...

    def flush_and_wait(self, timeout: float | None) -> None:
        """Send now and return once the frames are written (they borrow tensor memory)."""
        ...

    def close(self) -> None:
        """Close the link; pending requests fail with ConnectionLostError."""
        ...

    async def aclose(self) -> None:
        """:meth:`close` for async code."""
        ...
