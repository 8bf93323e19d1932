"""Worker: the coordinator's handle to one node, whatever carries the frames.

A handle submits requests to its :class:`Session` and asks its transport to move frames.
Subclasses only say how frames move (:meth:`Worker._kick`): :class:`VirtualWorker` hands
them to an in-process :class:`Node` at once; the WebSocket client writes them from the IO
thread. Everything above — pointers, plans, training — talks to this class only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from concurrent.futures import Future
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from ..exceptions import FedwsTimeoutError, PointerError
from ..protocol.codec import PointerRef
from ..protocol.ids import new_id
from ..protocol.messages import Kind
from .federation import Federation
from .io_thread import wait
from .session import Session

if TYPE_CHECKING:
    from ..node import Node
    from ..pointers import PointerTensor

__all__ = ["Worker", "VirtualWorker", "executing_on", "as_federation"]

# Requests that look at a node's store. Before one is sent, commands pending on the other
# workers of the federation are waited for, so what the sync API shows follows program
# order even across nodes (a command to alice may create objects on bob).
_OBSERVING = frozenset({Kind.INFO, Kind.SEARCH})

# The worker whose node is running the current request, if any: pointers that arrive
# while it runs belong to that worker, not to the coordinator.
executing_on: ContextVar[Worker | None] = ContextVar("executing_on", default=None)


def as_federation(hook: Any) -> Federation | None:
    """The federation behind a worker constructor's first argument (a TorchHook or a Federation)."""
    if hook is None or isinstance(hook, Federation):
        return hook
    federation = getattr(hook, "federation", None)
    if not isinstance(federation, Federation):
        raise TypeError(f"expected a TorchHook or a Federation, got {type(hook).__name__}")
    return federation


class Worker:
    """A handle to one node. Not built directly: use VirtualWorker or WebsocketClientWorker."""

    address: str | None = None

    def __init__(self, hook: Any, id: str, *, timeout: float | None = None) -> None:
        if not isinstance(id, str) or not id:
            raise ValueError(f"worker id must be a non-empty string, got {id!r}")
        self.id = id
        self.federation: Federation | None = as_federation(hook)
        self.timeout = timeout
        self.session = Session(id)
        self.peers: dict[str, Worker] = {}
        self.is_client_worker = True  # seed attribute; fedws nodes always store objects
        if self.federation is not None:
            self.federation.register(self)

    # -- moving frames (transport-specific) ----------------------------------------------

    def _kick(self, borrowed: bool = False, *, urgent: bool = True) -> None:
        """Make sure queued requests get sent.

        ``borrowed``: wait until they are written (they hold a large tensor by reference).
        ``urgent``: someone waits on the answer; otherwise a transport may hold the
        requests for a moment so that more of them share the frame.
        """
        raise NotImplementedError

    def _kick_soon(self) -> None:
        """Like ``_kick`` but safe from ``__del__`` and other threads (may do nothing)."""

    def flush(self) -> None:
        """Send every queued request now."""
        self._kick()

    def flush_soon(self) -> None:
        """Send queued requests shortly; safe from ``__del__`` and any thread."""
        self._kick_soon()

    def queue_delete(self, obj_id: int) -> None:
        """Delete ``obj_id`` on the node with the next frame; safe from ``__del__``."""
        self.session.queue_delete(obj_id)
        self.flush_soon()

    def ack_future(self, seq: int) -> Future[Any]:
        """A future that completes once the node has run request ``seq`` (or failed it)."""
        fut = self.session.ack_future(seq)
        if not fut.done():
            self.flush()
        return fut

    def error_of(self, seq: int) -> Exception | None:
        """The remote error of request ``seq``, if it failed (and is still remembered)."""
        return self.session.error_of(seq)

    def call_timeout(self, timeout: float | None = None) -> float | None:
        """The timeout a blocking call uses: ``timeout`` if given, else the worker's."""
        return self.timeout if timeout is None else timeout

    # -- requests ------------------------------------------------------------------------

    def submit(self, kind: Kind, *fields: Any, want_value: bool = False) -> tuple[int, Future[Any] | None]:
        """Queue a request and get it moving; returns (seq, value future or None)."""
        seq, fut, borrowed = self.session.submit(kind, *fields, want_value=want_value)
        self._kick(borrowed, urgent=want_value or borrowed)
        return seq, fut

    def request(self, kind: Kind, *fields: Any, timeout: float | None = None) -> Any:
        """Send a request that returns a value and block for it."""
        if kind in _OBSERVING and self.federation is not None:
            self.federation.settle(exclude=self, timeout=self.call_timeout(timeout))
        _, fut = self.submit(kind, *fields, want_value=True)
        assert fut is not None
        return wait(fut, self.call_timeout(timeout), f"{Kind(kind).name.lower()} on worker {self.id!r}")

    async def request_async(self, kind: Kind, *fields: Any, timeout: float | None = None) -> Any:
        _, fut = self.submit(kind, *fields, want_value=True)
        assert fut is not None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.call_timeout(timeout))
        except TimeoutError:
            raise FedwsTimeoutError(
                f"{Kind(kind).name.lower()} on worker {self.id!r} did not finish within "
                f"{self.call_timeout(timeout)} s"
            ) from None

    def pointer_factory(self, ref: PointerRef) -> Any:
        """Turn a pointer that arrived in a reply into a live pointer."""
        owner = executing_on.get()
        if owner is not None:
            return owner.pointer_from_ref(ref)
        local = self.federation.local_worker if self.federation is not None else None
        if local is None:
            raise PointerError(f"received a pointer to {ref.location!r} but worker {self.id!r} has no federation")
        return local.pointer_from_ref(ref)

    # -- the user API --------------------------------------------------------------------

    def store(self, obj: Any, *, obj_id: int, tags: Iterable[str] = (), description: str | None = None) -> int:
        """Store ``obj`` on the node under ``obj_id``; returns the request's seq."""
        seq, _ = self.submit(Kind.STORE, obj_id, obj, sorted(set(tags)), description)
        return seq

    def search(self, *tags: str) -> list[PointerTensor]:
        """Pointers to the node's objects that carry every one of ``tags``.

        The pointers do not own the data: dropping them never deletes it.
        """
        return [self._search_result(d) for d in self.request(Kind.SEARCH, list(tags))]

    async def search_async(self, *tags: str) -> list[PointerTensor]:
        found = await self.request_async(Kind.SEARCH, list(tags))
        return [self._search_result(d) for d in found]

    def _search_result(self, d: list[Any]) -> PointerTensor:
        """A pointer that does not own the object: dropping it never deletes the data."""
        obj_id, _type, shape, dtype, rg = d[0], d[1], d[2], d[3], d[4]
        return self._federation().make_pointer(  # type: ignore[no-any-return]
            self, obj_id, shape=shape, dtype=dtype, requires_grad=rg, owner=self.owner, id=new_id(), owns=False
        )

    @property
    def owner(self) -> Worker:
        """Who owns the pointers this worker hands out: the federation's local worker."""
        local = self.federation.local_worker if self.federation is not None else None
        return local if local is not None else self

    def _federation(self) -> Federation:
        if self.federation is None:
            raise PointerError(f"worker {self.id!r} belongs to no federation: it cannot make pointers")
        return self.federation

    def objects_count_remote(self) -> int:
        """How many objects the node holds (after pending deletes are applied)."""
        return int(self.request(Kind.INFO, "count"))

    def list_objects_remote(self) -> list[dict[str, Any]]:
        """What the node holds: id, type, shape, dtype, tags and description of each object."""
        keys = ("id", "type", "shape", "dtype", "requires_grad", "tags", "description")
        return [dict(zip(keys, d)) for d in self.request(Kind.INFO, "list")]

    def clear_objects_remote(self) -> Worker:
        """Delete every object the node holds."""
        self.request(Kind.PING)  # a barrier: earlier commands have run
        self.submit(Kind.CLEAR)
        self.request(Kind.PING)
        return self

    def clear_objects(self) -> Worker:
        """Same as :meth:`clear_objects_remote` (the seed's name); returns the worker."""
        return self.clear_objects_remote()

    def ping(self, timeout: float | None = None) -> None:
        """Round trip to the node; also a barrier for every command sent before it."""
        self.request(Kind.PING, timeout=timeout)

    def add_worker(self, worker: Worker) -> Worker:
        """Tell this node where ``worker`` is, so pointers between them can be followed."""
        self.peers[worker.id] = worker
        return self

    def resolve_peer(self, worker_id: str) -> Worker:
        """The handle this worker uses to reach ``worker_id`` (itself included)."""
        if worker_id == self.id:
            return self
        try:
            return self.peers[worker_id]
        except KeyError:
            raise PointerError(
                f"worker {self.id!r} does not know worker {worker_id!r}; "
                f"call {self.id}.add_worker({worker_id}) first"
            ) from None

    def pointer_from_ref(self, ref: PointerRef) -> PointerTensor:
        """A pointer owned by this worker for a PointerRef that arrived here."""
        return self._federation().make_pointer(  # type: ignore[no-any-return]
            self.resolve_peer(ref.location),
            ref.id_at_location,
            shape=ref.shape,
            dtype=ref.dtype,
            requires_grad=ref.requires_grad,
            owner=self,
            id=ref.id,
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id:{self.id}>"


class VirtualWorker(Worker):
    """A node in this process, reached through the same encoded bytes as a remote one.

    It executes on send, so ``bob._objects`` shows the new state immediately.

    Args:
        hook: the TorchHook of this federation.
        id: the worker's name (``"bob"``).
        data: tensors stored at creation, with their tags (``tensor.tag("x")``).
        max_store_mb: cap on the tensor bytes this node holds.

    Example:
        >>> bob = sy.VirtualWorker(hook, id="bob")
        >>> x_ptr = torch.tensor([1, 2, 3]).send(bob)
    """

    def __init__(
        self,
        hook: Any,
        id: str,
        data: Iterable[Any] = (),
        *,
        max_store_mb: float | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(hook, id, timeout=timeout)
        from ..node import Node

        max_bytes = None if max_store_mb is None else int(max_store_mb * 2**20)
        self.node: Node = Node(id, max_store_bytes=max_bytes, pointer_factory=self._arriving_pointer)
        self._in_kick = False
        for obj in data:
            self.store(
                obj,
                obj_id=new_id(),
                tags=getattr(obj, "tags", None) or (),
                description=getattr(obj, "description", None),
            )

    def _arriving_pointer(self, ref: PointerRef) -> Any:
        return self.pointer_from_ref(ref)

    def _kick(self, borrowed: bool = False, *, urgent: bool = True) -> None:
        session = self.session
        while True:
            frame = session.take_frame()
            if frame is None:
                return
            token = executing_on.set(self)
            try:
                reply = self.node.handle(b"".join(frame))
            finally:
                executing_on.reset(token)
            session.receive(b"".join(reply), self.pointer_factory)

    @property
    def _objects(self) -> dict[int, Any]:
        """The node's live id -> object dict (pending deletes applied first)."""
        self._kick()
        return self.node.store.objects

    @_objects.setter
    def _objects(self, objects: dict[int, Any]) -> None:
        self._kick()
        self.node.store.replace(objects)

    def __repr__(self) -> str:
        return f"<VirtualWorker id:{self.id} #tensors:{len(self._objects)}>"
