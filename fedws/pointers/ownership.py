"""Ownership: the remote object is deleted when the last thing holding it is collected.

A pointer (or a pointer plan) holds one :class:`Ownership`; pointers that share a remote
object (a Parameter re-pointed by ``Module.move``) share it. Its ``__del__`` runs wherever
the garbage collector happens to run — inside a frame being encoded, on the IO thread,
during interpreter shutdown — so it only queues the delete (``Worker.queue_delete`` is
safe there); the deletes go out batched with the next frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..client.worker import Worker

__all__ = ["Ownership"]


class Ownership:
    """Deletes ``obj_id`` on ``worker`` when collected, while ``active``.

    ``active`` turns False when the object is gone or belongs to someone else: ``get()``
    removed it, or the pointer was sent on and the receiving node's pointer owns it now.

    Args:
        worker: where the object lives.
        obj_id: its id there.
        active: False for pointers that never own the object (search results).
    """

    __slots__ = ("worker", "obj_id", "active", "__weakref__")

    def __init__(self, worker: Worker, obj_id: int, active: bool = True) -> None:
        self.worker = worker
        self.obj_id = obj_id
        self.active = active

    def __del__(self) -> None:
        if self.active:
            try:
                self.worker.queue_delete(self.obj_id)
            except Exception:  # interpreter shutdown; nothing useful left to do
                pass
