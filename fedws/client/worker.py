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

from ..exceptions import PointerError
from ..protocol.codec import PointerRef
from ..protocol.messages import Kind
from .io_thread import wait
from .session import Session

if TYPE_CHECKING:
    from ..hook import TorchHook
    from ..node import Node
    from ..pointers import PointerTensor

__all__ = ["Worker", "VirtualWorker", "executing_on"]

# Requests that look at a node's store. Before one is sent, commands pending on the other
# workers of the federation are waited for, so what the sync API shows follows program
# order even across nodes (a command to alice may create objects on bob).
_OBSERVING = frozenset({Kind.INFO, Kind.SEARCH})

# The worker whose node is running the current request, if any: pointers that arrive
# while it runs belong to that worker, not to the coordinator.
executing_on: ContextVar[Worker | None] = ContextVar("executing_on", default=None)


class Worker:
    """A handle to one node. Not built directly: use VirtualWorker or WebsocketClientWorker."""

    address: str | None = None

    def __init__(self, hook: TorchHook | None, id: str, *, timeout: float | None = None) -> None:
        if not isinstance(id, str) or not id:
            raise ValueError(f"worker id must be a non-empty string, got {id!r}")
        self.id = id
        self.hook = hook
        self.timeout = timeout
        self.session = Session(id)
        self.peers: dict[str, Worker] = {}
        self.is_client_worker = True  # seed attribute; fedws nodes always store objects
        if hook is not None:
            hook.register_worker(self)

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

    # -- requests ------------------------------------------------------------------------

    def submit(self, kind: Kind, *fields: Any, want_value: bool = False) -> tuple[int, Future[Any] | None]:
        """Queue a request and get it moving; returns (seq, value future or None)."""
        seq, fut, borrowed = self.session.submit(kind, *fields, want_value=want_value)
        self._kick(borrowed, urgent=want_value or borrowed)
        return seq, fut

    def request(self, kind: Kind, *fields: Any, timeout: float | None = None) -> Any:
        """Send a request that returns a value and block for it."""
        if kind in _OBSERVING and self.hook is not None:
            self.hook.settle(exclude=self, timeout=self._timeout(timeout))
        _, fut = self.submit(kind, *fields, want_value=True)
        assert fut is not None
        return wait(fut, self._timeout(timeout), f"{Kind(kind).name.lower()} on worker {self.id!r}")

    async def request_async(self, kind: Kind, *fields: Any, timeout: float | None = None) -> Any:
        _, fut = self.submit(kind, *fields, want_value=True)
        assert fut is not None
        return await asyncio.wait_for(asyncio.wrap_future(fut), self._timeout(timeout))

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def pointer_factory(self, ref: PointerRef) -> Any:
        """Turn a pointer that arrived in a reply into a live pointer."""
        owner = executing_on.get()
        if owner is not None:
            return owner.pointer_from_ref(ref)
        if self.hook is None:
            raise PointerError(f"received a pointer to {ref.location!r} but no hook is set")
        return self.hook.local_worker.pointer_from_ref(ref)

    # -- the user API --------------------------------------------------------------------

    def store(self, obj: Any, *, obj_id: int, tags: Iterable[str] = (), description: str | None = None) -> int:
        """Store ``obj`` on the node under ``obj_id``; returns the request's seq."""
        seq, _ = self.submit(Kind.STORE, obj_id, obj, sorted(set(tags)), description)
        return seq

    def search(self, *tags: str) -> list[PointerTensor]:
        """Pointers to the node's objects that carry every one of ``tags``.

        The pointers do not own the data: dropping them never deletes it.
        """
        from ..pointers import pointer_from_description

        return [pointer_from_description(self, d) for d in self.request(Kind.SEARCH, list(tags))]

    async def search_async(self, *tags: str) -> list[PointerTensor]:
        from ..pointers import pointer_from_description

        found = await self.request_async(Kind.SEARCH, list(tags))
        return [pointer_from_description(self, d) for d in found]

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
        from ..pointers import make_pointer

        return make_pointer(
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
        hook: TorchHook | None,
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
            from ..protocol.ids import new_id

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
