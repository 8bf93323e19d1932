"""VirtualWorker: a node in this process, reached through the same encoded bytes as a remote one.

It is a composition: a :class:`~fedws.client.worker.Worker` whose link is an
:class:`~fedws.transport.inproc.InprocLink` to a :class:`~fedws.node.Node` it owns. Neither
the client nor the transport layer knows the node; this module puts them together.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .client.worker import Worker, executing_on
from .datasets import dataset_tensors
from .node import Node
from .node.interpreter import in_node_torch_state
from .node.policy import Caller
from .protocol.codec import PointerRef
from .protocol.ids import new_id
from .transport.inproc import InprocLink, register_node
from .transport.link import Chunks, Endpoint

__all__ = ["VirtualWorker"]


class VirtualWorker(Worker):
    """A node in this process, reached through the same encoded bytes as a remote one.

    It executes on send, so ``bob._objects`` shows the new state immediately. Its node is
    also reachable as ``inproc://<id>`` (``sy.connect("inproc://bob")`` opens a second
    coordinator session to it).

    Args:
        hook: the TorchHook (or Federation) of this federation.
        id: the worker's name (``"bob"``).
        data: tensors stored at creation, with their tags (``tensor.tag("x")``).
        max_store_mb: cap on the bytes this node holds.
        max_memory_mb: memory budget (held bytes plus one command's output), checked
            before each command runs (default: half of physical memory, or the store cap).
        timeout: default seconds a blocking call waits.

    Example:
        >>> bob = sy.VirtualWorker(hook, id="bob")
        >>> x_ptr = torch.tensor([1, 2, 3]).send(bob)
    """

    link: InprocLink

    def __init__(
        self,
        hook: Any,
        id: str,
        data: Iterable[Any] = (),
        *,
        max_store_mb: float | None = None,
        max_memory_mb: float | None = None,
        timeout: float | None = None,
    ) -> None:
        max_bytes = None if max_store_mb is None else int(max_store_mb * 2**20)
        budget = None if max_memory_mb is None else int(max_memory_mb * 2**20)
        self.node: Node = Node(
            id, max_store_bytes=max_bytes, max_memory_bytes=budget, pointer_factory=self._arriving_pointer
        )

        def link(endpoint: Endpoint) -> InprocLink:
            return InprocLink(endpoint, self.handle_frame, f"inproc://{id}")

        super().__init__(hook, id, link=link, timeout=timeout)
        register_node(id, self.handle_frame)
        for obj in data:
            self.store(
                obj,
                obj_id=new_id(),
                tags=getattr(obj, "tags", None) or (),
                description=getattr(obj, "description", None),
            )

    def handle_frame(self, frame: bytes | bytearray | memoryview, /, caller: Caller | None = None) -> Chunks:
        """Run one frame on the node, as this worker: pointers arriving meanwhile are its own.

        ``caller``: who sent it (a node process passes each connection's); None: the local
        coordinator.
        """
        token = executing_on.set(self)
        try:
            # In the torch state a node process has, not the caller's (modes, excluded keys).
            return in_node_torch_state(self.node.handle, frame, caller)
        finally:
            executing_on.reset(token)

    def add_dataset(self, dataset: Any, key: str, tags: Iterable[str] = (), description: str | None = None) -> None:
        """Serve ``dataset`` on this node under ``key`` (PySyft's ``server.add_dataset``).

        Any local dataset of ``(data, target)`` pairs (``sy.BaseDataset``, ``TensorDataset``);
        its transform runs here, once. See :meth:`fedws.node.Node.add_dataset`.
        """
        self.flush()
        self.node.add_dataset(dataset_tensors(dataset), key, tags, description)

    def _arriving_pointer(self, ref: PointerRef) -> Any:
        return self.pointer_from_ref(ref)

    @property
    def _objects(self) -> dict[int, Any]:
        """The node's live id -> object dict (pending deletes applied first)."""
        self.flush()
        return self.node.store.objects

    @_objects.setter
    def _objects(self, objects: dict[int, Any]) -> None:
        self.flush()
        self.node.store.replace(objects)

    def __repr__(self) -> str:
        return f"<VirtualWorker id:{self.id} #tensors:{len(self._objects)}>"
