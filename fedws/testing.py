"""Test helpers for code built on fedws: a mock link that records frames and replies on demand.

Like httpx's ``MockTransport``, :class:`MockLink` lets a test of the layers above the
transport (pointers, plans, training loops) see exactly which requests a worker sends and
decide what comes back, with no node and no network::

    from fedws.testing import MockLink
    from fedws.protocol.messages import Kind

    w = sy.Worker(sy.Federation(), "bob", link=MockLink)
    seq, fut = w.submit(Kind.PING, want_value=True)
    [request] = w.link.requests()            # [Kind.PING, seq]
    w.link.reply(watermark=seq, values=[[seq, "pong"]])
    assert fut.result() == "pong"
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .exceptions import ConnectionLostError, FedwsError
from .protocol import codec
from .transport.link import Chunks, Endpoint

__all__ = ["MockLink", "reply_bytes"]


def reply_bytes(watermark: int, values: Sequence[Any] = (), errors: Sequence[Any] = ()) -> bytes:
    """A node's reply ``[watermark, values, errors]`` encoded as the node would send it."""
    return codec.encode_bytes([watermark, list(values), list(errors)])


class MockLink:
    """A link that keeps the frames it is asked to send and delivers replies a test feeds.

    Args:
        endpoint: the worker's endpoint (pass the class as ``Worker(..., link=MockLink)``).
        address: what ``address`` reports.

    Attributes:
        frames: every frame sent, as bytes, oldest first.
        flushes: how many times a flush was asked for (any kind).
    """

    def __init__(self, endpoint: Endpoint, address: str | None = "mock://node") -> None:
        self.endpoint = endpoint
        self._address = address
        self.frames: list[bytes] = []
        self.flushes = 0
        self.soon = 0
        self._closed = False

    @property
    def address(self) -> str | None:
        return self._address

    @property
    def connected(self) -> bool:
        return not self._closed

    # -- the Link interface -----------------------------------------------------------------

    def flush(self, *, urgent: bool = True) -> None:
        """Take every queued frame and record it (nothing is answered until :meth:`reply`)."""
        self.flushes += 1
        if self._closed:
            return
        while (frame := self.endpoint.take_frame()) is not None:
            self.frames.append(_join(frame))

    def flush_soon(self) -> None:
        """Counted, nothing sent (as a link may do from ``__del__``)."""
        self.soon += 1

    def flush_and_wait(self, timeout: float | None) -> None:
        self.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.endpoint.link_lost(ConnectionLostError("connection to the mock node was closed"))

    async def aclose(self) -> None:
        self.close()

    # -- what a test does -----------------------------------------------------------------

    def requests(self) -> list[list[Any]]:
        """Every request sent so far, decoded (pointers stay :class:`PointerRef` values)."""
        return [codec.decode(blob) for frame in self.frames for blob in codec.iter_blobs(frame)]

    def reply(self, watermark: int, values: Sequence[Any] = (), errors: Sequence[Any] = ()) -> None:
        """Deliver the reply to the oldest unanswered frame: ``[watermark, values, errors]``."""
        self.endpoint.receive(reply_bytes(watermark, values, errors))

    def reply_raw(self, data: bytes) -> None:
        """Deliver raw bytes as the next reply (a malformed one, for instance)."""
        self.endpoint.receive(data)

    def drop(self, reason: str = "dropped by the test") -> None:
        """The link is lost: every pending call fails with ConnectionLostError at once."""
        self._closed = True
        self.endpoint.link_lost(ConnectionLostError(f"connection to the mock node lost ({reason})"))

    def lose(self, error: FedwsError) -> None:
        """The link is lost with ``error``."""
        self._closed = True
        self.endpoint.link_lost(error)

    def __repr__(self) -> str:
        return f"<MockLink {len(self.frames)} frames{' closed' if self._closed else ''}>"


def _join(frame: Chunks) -> bytes:
    return b"".join(frame)
