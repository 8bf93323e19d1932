"""Ownership: the remote object is deleted when the last thing holding it is collected.

A pointer (or a pointer plan) holds one :class:`Ownership`; pointers that share a remote
object (a Parameter re-pointed by ``Module.move``) share it.

Ownership is unique per holder: one Ownership per (holder, location, remote id). A pointer
that was sent on (``x_ptr.send(alice)``) gave its ownership away; if the pointer comes back
(``p.get()``) while ``x_ptr`` still lives, the returning pointer takes that same Ownership up
again (:func:`claim`), so the object is deleted once both are gone, not when either is. Its ``__del__`` runs wherever
the garbage collector happens to run — inside a frame being encoded, on the IO thread,
during interpreter shutdown — so it only queues the delete (``Worker.queue_delete`` is
safe there); the deletes go out batched with the next frame.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..client.worker import Worker

__all__ = ["Ownership", "remember", "claim"]


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


# (holder, location, remote id) -> the Ownership of a pointer that was sent on. Only sent
# pointers are remembered (a pointer can come back only after it was sent), so the ops on the
# hot path never touch this table.
_given_away: weakref.WeakValueDictionary[tuple[Any, Any, int], Ownership] = weakref.WeakValueDictionary()
_lock = threading.Lock()


def remember(holder: Any, ownership: Ownership) -> None:
    """``holder`` sent a pointer with ``ownership`` on: remember it while the pointer lives."""
    with _lock:
        _given_away[(holder, ownership.worker, ownership.obj_id)] = ownership


def claim(holder: Any, worker: Worker, obj_id: int) -> Ownership:
    """The Ownership a pointer to ``obj_id`` on ``worker`` arriving at ``holder`` takes.

    If ``holder`` still has the pointer it once sent on, the arriving pointer shares that
    pointer's Ownership (and makes it own again): two live pointers, one owner.
    """
    with _lock:
        found = _given_away.get((holder, worker, obj_id))
    if found is None:
        return Ownership(worker, obj_id)
    found.active = True
    return found
