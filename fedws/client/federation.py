"""Federation: the workers a coordinator knows, its local worker ``me``, and ``settle``.

A federation is the registry that lets a pointer arriving in a reply name a worker
(``[PointerTensor | me:1 -> bob:2]``) and find its handle. It knows nothing of torch or of
pointer classes: whoever composes it hands in a :class:`PointerFactory` (the top-level
``TorchHook`` does), so ``client`` never imports the layers above it. Several federations can
live in one process; the default one is chosen by the top-level API, never here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, Protocol, TypeVar

from ..exceptions import FedwsError, PointerError
from ..transport.io_thread import in_io_thread, wait
from .session import Session

__all__ = ["Federation", "PointerFactory", "Member"]


class Member(Protocol):
    """What a federation needs of a worker (``fedws.Worker`` is one)."""

    id: str
    session: Session
    peers: dict[str, Any]

    def ack_future(self, seq: int) -> Future[Any]: ...


W = TypeVar("W", bound=Member)

# Builds the user-facing pointer for an object on a worker; called as
# ``factory(location, id_at_location, *, shape, dtype, requires_grad, owner, id=None, seq=0,
# owns=True, arrived=False)`` (``fedws.pointers.make_pointer`` is the one TorchHook hands in;
# ``arrived``: a pointer that came to ``owner`` in a chain or a reply).
PointerFactory = Callable[..., Any]


class Federation(Generic[W]):
    """Workers by id, the local worker, and the pointer factory of one coordinator.

    Args:
        pointer_factory: how pointers are built (None until a TorchHook completes it).

    Attributes:
        workers: every worker that joined, by id (a later worker replaces an earlier one of
            the same id).
        local_worker: the coordinator's own worker ``"me"``, owner of its pointers (set by
            whoever composes the federation).
    """

    def __init__(self, pointer_factory: PointerFactory | None = None) -> None:
        self.pointer_factory = pointer_factory
        self.workers: dict[str, W] = {}
        self.local_worker: W | None = None
        self._lock = threading.Lock()

    def register(self, worker: W) -> None:
        """Add ``worker``; the local worker can then follow pointers to it."""
        with self._lock:
            self.workers[worker.id] = worker
        local = self.local_worker
        if local is not None and local is not worker:
            local.peers[worker.id] = worker

    def unregister(self, worker: W) -> None:
        """Forget ``worker`` if it is the one registered under its id."""
        with self._lock:
            if self.workers.get(worker.id) is worker:
                del self.workers[worker.id]
        local = self.local_worker
        if local is not None and local.peers.get(worker.id) is worker:
            del local.peers[worker.id]

    @property
    def owner(self) -> W | None:
        """Who owns pointers made by the coordinator: the local worker."""
        return self.local_worker

    def make_pointer(self, location: W, id_at_location: int, **kwargs: Any) -> Any:
        """Build a pointer with the factory handed in.

        Raises:
            PointerError: no factory was given (a bare federation with no TorchHook).
        """
        factory = self.pointer_factory
        if factory is None:
            raise PointerError(
                "this federation cannot make pointers: create it through sy.TorchHook(torch, federation=...)"
            )
        return factory(location, id_at_location, **kwargs)

    def settle(self, exclude: W | None = None, timeout: float | None = None) -> None:
        """Wait until every worker (but ``exclude``) has run the commands sent to it.

        What the sync API observes then follows program order even across nodes: a command
        sent to alice may create objects on bob. Failed commands are not raised here; they
        surface where their results are used.
        """
        if in_io_thread():
            return
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            if worker is exclude or not worker.session.pending:
                continue
            fut = worker.ack_future(worker.session.last_seq)
            try:
                wait(fut, timeout, f"commands on worker {worker.id!r}")
            except FedwsError:
                pass

    def __repr__(self) -> str:
        return f"<Federation workers={sorted(self.workers)}>"
