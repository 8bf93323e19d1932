"""PrivateGridNetwork: search many workers at once (PySyft's Part 05 "Virtual Grid").

A grid is only a list of workers: in-process, WebSocket nodes, or both. ``grid.search``
asks every worker the same query and answers per worker. The queries go out together
(each worker's search is its own request) so a grid of slow nodes costs about one round
trip, not one per node. Each node applies its own policy: a private node answers with
what the caller may see there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from .client.worker import Worker, search_terms
from .protocol.messages import Kind
from .transport.io_thread import wait

__all__ = ["PrivateGridNetwork"]


class PrivateGridNetwork:
    """A set of workers searched together.

    Args:
        *workers: the workers of the grid (any transport).

    Example:
        >>> grid = sy.PrivateGridNetwork(bob, alice)
        >>> grid.search("#boston", "#data")
        {'bob': [[PointerTensor | me:... -> bob:...]], 'alice': [...]}
    """

    def __init__(self, *workers: Worker) -> None:
        for w in workers:
            if not isinstance(w, Worker):
                raise TypeError(f"a grid holds workers, got {type(w).__name__}")
        self.workers: list[Worker] = list(workers)

    def search(self, *query: Any, timeout: float | None = None) -> dict[str, list[Any]]:
        """Worker id -> the pointers its search found, for the workers that found something.

        ``query`` is as in :meth:`Worker.search`: terms (tags, ids, words of a description)
        that must all match. Every worker's search is sent before any answer is awaited.

        Raises:
            RemoteError: a worker refused the query (too many terms, a term too long).
            FedwsTimeoutError: a worker did not answer within ``timeout`` seconds.
        """
        terms = search_terms(query)
        if self.workers:
            federation = self.workers[0].federation
            if federation is not None:  # what the sync API shows follows program order
                federation.settle(timeout=self.workers[0].call_timeout(timeout))
        pending = [(w, w.submit(Kind.SEARCH, terms, want_value=True)[1]) for w in self.workers]
        results: dict[str, list[Any]] = {}
        for w, fut in pending:
            assert fut is not None
            found = wait(fut, w.call_timeout(timeout), f"search on worker {w.id!r}")
            pointers = [w._search_result(d) for d in found]
            if pointers:
                results[w.id] = pointers
        return results

    async def search_async(self, *query: Any) -> dict[str, list[Any]]:
        """``await grid.search_async(...)``: the async form of :meth:`search`."""
        found = await asyncio.gather(*(w.search_async(*query) for w in self.workers))
        return {w.id: ptrs for w, ptrs in zip(self.workers, found) if ptrs}

    def __iter__(self) -> Iterator[Worker]:
        return iter(self.workers)

    def __len__(self) -> int:
        return len(self.workers)

    def __repr__(self) -> str:
        return f"<PrivateGridNetwork {[w.id for w in self.workers]}>"
