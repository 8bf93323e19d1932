"""RemoteResult: something a request made on a worker, that can be awaited.

Shared by pointers and pointer plans, so ``await``, ``wait()`` and ``future()`` mean the
same everywhere: the node has run the request, or its error is raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Self

from ..transport.io_thread import wait

if TYPE_CHECKING:
    from ..client.worker import Worker

__all__ = ["RemoteResult"]


class RemoteResult:
    """The result of request ``seq`` on ``location``.

    Attributes:
        location: the worker the request went to.
        seq: the request that last changed the remote object (an in-place op moves it on),
            so waiting means "everything sent to this object so far has run".
    """

    location: Worker
    seq: int

    def future(self) -> Future[Any]:
        """A future that completes (with None) once the node has run the request.

        It fails with the remote error if the request failed.
        """
        return self.location.ack_future(self.seq)

    def wait(self, timeout: float | None = None) -> Self:
        """Block until the node has run the request; raise its error if it failed."""
        wait(self.future(), self.location.call_timeout(timeout), f"waiting for {self!r}")
        return self

    def __await__(self) -> Generator[Any, None, Self]:
        return self._await_made().__await__()

    async def _await_made(self) -> Self:
        await asyncio.wrap_future(self.future())
        return self
