"""ObjectStore: what a node holds, by id, with tags for search.

Concurrency contract
--------------------
A WebSocket node runs one handler thread per connection and answers some requests on its
event-loop thread, all against one store. So the store has one re-entrant lock that guards
``objects``, ``tags``, ``descriptions``, the per-object sizes and ``nbytes`` together:

* **Atomic**: every method that changes the store (:meth:`set`, :meth:`delete`,
  :meth:`delete_many`, :meth:`pop`, :meth:`clear`, :meth:`replace`,
  :meth:`record_failure`) runs entirely under the lock, so the cap check and the byte
  count never see a half-done change and ``nbytes`` never drifts. :meth:`get`, ``in`` and
  ``len()`` are single dict reads, atomic without it. Hold :attr:`ObjectStore.lock`
  yourself to make several calls one step (it is re-entrant).
* **Snapshots**: every method that looks at many objects (:meth:`search`, :meth:`ids`,
  :meth:`entries`) copies what it needs under the lock and returns the copy;
  the caller then works on it without the lock. An id in a snapshot may be gone a moment
  later: whoever then asks for it gets :class:`~fedws.exceptions.ObjectNotFoundError`, or
  skips it (``entries`` skips ids deleted meanwhile).
* Policy (see :mod:`fedws.node.policy`): in a node that enforces one, each object also has
  an owner (``owners``: id -> :class:`~fedws.node.policy.Caller`, compared by identity),
  and the sets ``private`` (ids of private values), ``readonly`` (ids of data the node
  serves; their storages in ``readonly_storage``), ``shared`` (ids whose owner let any
  holder of the id use them) and ``durable`` (ids whose owner keeps them past the end of
  its session; see :meth:`free_session`). They change together with the object, under the lock. An
  open node leaves them empty and pays nothing for them.
* ``objects``, ``tags`` and ``descriptions`` stay plain dicts for single-threaded
  inspection (``worker._objects`` in the seed tutorials). Code that may run beside another
  thread must not iterate or write them directly: use the methods, and
  :meth:`record_failure` to mark the results of a failed request.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from ..exceptions import ObjectNotFoundError, StoreFullError
from .limits import own
from .policy import Caller, storage_key

__all__ = ["ObjectStore", "Failure", "Entry"]


class Failure:
    """Stored in place of the results of a failed command, so later uses fail the same way."""

    __slots__ = ("error",)

    def __init__(self, error: dict[str, Any]) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"<Failure {self.error.get('type')}: {self.error.get('message')}>"


class Entry(NamedTuple):
    """One stored object with its tags and description, as copied under the lock."""

    id: int
    obj: Any
    tags: frozenset[str]
    description: str | None




_NO_TAGS: frozenset[str] = frozenset()
_MISSING: Any = object()


def _matches(terms: frozenset[str], obj_id: int, tags: frozenset[str], description: str | None) -> bool:
    """Whether every term is a tag, the id, or a piece of the description (PySyft's search)."""
    for term in terms:
        if term in tags or (description is not None and term in description):
            continue
        if term != str(obj_id):
            return False
    return True


class ObjectStore:
    """Id -> object, plus tags and descriptions; safe to share between threads.

    ``objects`` is the live dict (``worker._objects`` in the seed tutorials shows it).
    ``max_bytes`` caps the bytes held (every byte: see :func:`~fedws.node.limits.own`); a store that would exceed it
    refuses the object and keeps everything it already had. See the module docstring for
    what is atomic and what is a snapshot.
    """

    def __init__(self, worker_id: str, max_bytes: int | None = None) -> None:
        self.worker_id = worker_id
        self.max_bytes = max_bytes
        self.objects: dict[int, Any] = {}
        self.tags: dict[int, frozenset[str]] = {}
        self.descriptions: dict[int, str] = {}
        self._sizes: dict[int, int] = {}
        self.nbytes = 0
        self.lock = threading.RLock()
        self.owners: dict[int, Caller] = {}
        self.private: set[int] = set()
        self.readonly: set[int] = set()
        self.readonly_storage: set[int] = set()
        self.shared: set[int] = set()
        self.durable: set[int] = set()

    def __len__(self) -> int:
        return len(self.objects)  # one C-level read: atomic

    def __contains__(self, obj_id: object) -> bool:
        return obj_id in self.objects  # one C-level read: atomic

    # -- changes (atomic) -----------------------------------------------------------------

    def set(
        self,
        obj_id: int,
        obj: Any,
        tags: Iterable[str] = (),
        description: str | None = None,
        *,
        owner: Caller | None = None,
        private: bool = False,
    ) -> None:
        """Store ``obj`` under ``obj_id``, replacing what was there with its tags.

        ``owner`` and ``private`` are the policy's record of it (None/False in an open node).

        Raises:
            StoreFullError: the object would take the store over ``max_bytes``; nothing
                changed.
        """
        # Outside the lock (no store state). Every byte is counted, cap or not (the node's
        # memory budget needs the total); a tensor borrowing a frame is copied (limits.own).
        obj, size = own(obj)
        tag_set = frozenset(tags) if tags else _NO_TAGS
        with self.lock:
            old = self._sizes.get(obj_id, 0)
            if self.max_bytes is not None and self.nbytes - old + size > self.max_bytes:
                raise StoreFullError(
                    f"storing {size} bytes would exceed the store cap of {self.max_bytes} bytes "
                    f"({self.nbytes} held)",
                    worker=self.worker_id,
                    obj_id=obj_id,
                )
            self._put(obj_id, obj, size, old, tag_set, description, owner, private)

    def _put(
        self,
        obj_id: int,
        obj: Any,
        size: int,
        old: int,
        tags: frozenset[str],
        description: str | None,
        owner: Caller | None = None,
        private: bool = False,
    ) -> None:
        """Write one entry; the caller holds the lock and has checked the cap."""
        self.objects[obj_id] = obj
        if owner is not None:
            self.owners[obj_id] = owner
        if private:
            self.private.add(obj_id)
        elif self.private:
            self.private.discard(obj_id)
        if size:
            self._sizes[obj_id] = size
        elif old:
            del self._sizes[obj_id]
        self.nbytes += size - old
        if tags:
            self.tags[obj_id] = tags
        elif self.tags:
            self.tags.pop(obj_id, None)
        if description:
            self.descriptions[obj_id] = description
        elif self.descriptions:
            self.descriptions.pop(obj_id, None)

    def record_failure(self, obj_ids: Iterable[int], error: dict[str, Any], owner: Caller | None = None) -> None:
        """Hold a :class:`Failure` carrying ``error`` (a wire error) under each of ``obj_ids``.

        What was there is replaced (its bytes are freed); the cap never refuses a failure.
        With ``owner`` (a node enforcing a policy), ids held by anyone else are left alone.
        """
        failure = Failure(error)
        with self.lock:
            for obj_id in obj_ids:
                if owner is not None and obj_id in self.objects and self.owners.get(obj_id) is not owner:
                    continue
                self._put(obj_id, failure, 0, self._sizes.get(obj_id, 0), _NO_TAGS, None, owner)

    def pop(self, obj_id: int) -> Any:
        """Remove ``obj_id`` and return its object.

        Raises:
            ObjectNotFoundError: no object under that id.
        """
        with self.lock:
            obj = self.get(obj_id)
            self.delete(obj_id)
            return obj

    def delete(self, obj_id: int) -> None:
        """Forget ``obj_id``; a missing id is not an error (deletes may race gets)."""
        with self.lock:
            if self.objects.pop(obj_id, _MISSING) is not _MISSING:
                self.tags.pop(obj_id, None)
                self.descriptions.pop(obj_id, None)
                self.nbytes -= self._sizes.pop(obj_id, 0)
                if self.owners:
                    self.owners.pop(obj_id, None)
                    self.private.discard(obj_id)
                    self.shared.discard(obj_id)
                    self.durable.discard(obj_id)

    def delete_many(self, obj_ids: Iterable[int]) -> None:
        """Forget each of ``obj_ids`` (missing ones are ignored), under one lock."""
        with self.lock:
            for obj_id in obj_ids:
                self.delete(obj_id)

    def clear(self, owner: Caller | None = None) -> None:
        """Forget every object (with ``owner``: every object ``owner`` owns)."""
        with self.lock:
            if owner is not None:
                self.delete_many([i for i, o in self.owners.items() if o is owner])
                return
            self.owners.clear()
            self.private.clear()
            self.readonly.clear()
            self.readonly_storage.clear()
            self.shared.clear()
            self.durable.clear()
            self.objects.clear()
            self.tags.clear()
            self.descriptions.clear()
            self._sizes.clear()
            self.nbytes = 0

    def replace(self, objects: Mapping[int, Any]) -> None:
        """Replace the whole content (``worker._objects = {}`` in the seed).

        Raises:
            StoreFullError: the new content exceeds the cap; what fitted is kept.
        """
        new = dict(objects)  # a copy first: ``objects`` may be our own dict
        with self.lock:
            self.clear()
            for k, v in new.items():
                self.set(k, v)

    def serve(self, obj_id: int, obj: Any, tags: Iterable[str] = (), description: str | None = None) -> None:
        """Hold data the node serves: owned by the node, private and read-only."""
        from .policy import NODE

        with self.lock:
            self.set(obj_id, obj, tags, description, owner=NODE, private=True)
            self.readonly.add(obj_id)
            key = storage_key(obj)
            if key:
                self.readonly_storage.add(key)

    def mark_private(self, obj_ids: Iterable[int]) -> None:
        """Flag ``obj_ids`` (those still held) as private."""
        with self.lock:
            self.private.update(i for i in obj_ids if i in self.objects)

    def free_session(self, owner: Caller) -> tuple[int, int]:
        """Forget every object ``owner`` owns except the durable ones, as one step.

        Returns:
            (objects freed, bytes freed).
        """
        with self.lock:
            durable = self.durable
            ids = [i for i, o in self.owners.items() if o is owner and i not in durable]
            before = self.nbytes
            self.delete_many(ids)
            return len(ids), before - self.nbytes

    def owns_any(self, owner: Caller) -> bool:
        """Whether ``owner`` still owns an object here."""
        with self.lock:
            return any(o is owner for o in self.owners.values())

    def visible(self, owner: Caller, obj_ids: Iterable[int] | None = None) -> list[int]:
        """Snapshot of the ids ``owner`` may see: its own objects and the data the node serves."""
        with self.lock:
            ids = list(self.objects) if obj_ids is None else obj_ids
            owners, readonly = self.owners, self.readonly
            return [i for i in ids if owners.get(i) is owner or i in readonly]

    # -- reads ----------------------------------------------------------------------------

    def get(self, obj_id: int) -> Any:
        """The object under ``obj_id`` (a :class:`Failure` if the command making it failed).

        Raises:
            ObjectNotFoundError: no object under that id.
        """
        obj = self.objects.get(obj_id, _MISSING)  # one C-level read: atomic
        if obj is _MISSING:
            raise ObjectNotFoundError(
                f"worker {self.worker_id!r} has no object {obj_id} "
                "(it was deleted, already retrieved with get(), or never sent)",
                worker=self.worker_id,
                obj_id=obj_id,
            )
        return obj

    def ids(self) -> list[int]:
        """Snapshot of the ids held, in insertion order."""
        with self.lock:
            return list(self.objects)

    def search(self, terms: Iterable[str], obj_ids: Iterable[int] | None = None) -> list[int]:
        """Snapshot of the ids of objects matching every one of ``terms``, in insertion order.

        PySyft 0.2's rule: a term matches an object when it is one of its tags, its id in
        decimal, or a substring of its description. ``obj_ids`` limits the search to those
        ids (what a caller may see), so objects it may not see are never even compared.
        """
        wanted = frozenset(terms)
        with self.lock:
            objects = self.objects
            ids = list(objects) if obj_ids is None else [i for i in obj_ids if i in objects]
            if not wanted:
                return ids
            tags, descriptions = self.tags, self.descriptions
            return [i for i in ids if _matches(wanted, i, tags.get(i, _NO_TAGS), descriptions.get(i))]

    def entries(self, obj_ids: Iterable[int] | None = None) -> list[Entry]:
        """Snapshot of objects with their tags and descriptions (all, or ``obj_ids``).

        Ids no longer held (deleted since the caller learnt them) are skipped.
        """
        with self.lock:
            ids = list(self.objects) if obj_ids is None else obj_ids
            out = []
            for i in ids:
                obj = self.objects.get(i, _MISSING)
                if obj is not _MISSING:
                    out.append(Entry(i, obj, self.tags.get(i, _NO_TAGS), self.descriptions.get(i)))
            return out

