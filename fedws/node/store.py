"""ObjectStore: what a node holds, by id, with tags for search."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..exceptions import ObjectNotFoundError, StoreFullError

__all__ = ["ObjectStore", "Failure"]


class Failure:
    """Stored in place of the results of a failed command, so later uses fail the same way."""

    __slots__ = ("error",)

    def __init__(self, error: dict[str, Any]) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"<Failure {self.error.get('type')}: {self.error.get('message')}>"


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
        try:
            return obj.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return 0
    return 0


class ObjectStore:
    """Id -> object, plus tags and descriptions.

    ``objects`` is the live dict (``worker._objects`` in the seed tutorials shows it).
    ``max_bytes`` caps the bytes of tensor storage held; a store that would exceed it
    refuses the object and keeps everything it already had.
    """

    def __init__(self, worker_id: str, max_bytes: int | None = None) -> None:
        self.worker_id = worker_id
        self.max_bytes = max_bytes
        self.objects: dict[int, Any] = {}
        self.tags: dict[int, frozenset[str]] = {}
        self.descriptions: dict[int, str] = {}
        self._sizes: dict[int, int] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.objects)

    def __contains__(self, obj_id: int) -> bool:
        return obj_id in self.objects

    def set(
        self,
        obj_id: int,
        obj: Any,
        tags: Iterable[str] = (),
        description: str | None = None,
    ) -> None:
        size = _nbytes(obj) if self.max_bytes is not None else 0
        old = self._sizes.get(obj_id, 0)
        if self.max_bytes is not None and self.nbytes - old + size > self.max_bytes:
            raise StoreFullError(
                f"storing {size} bytes would exceed the store cap of {self.max_bytes} bytes "
                f"({self.nbytes} held)",
                worker=self.worker_id,
                obj_id=obj_id,
            )
        self.objects[obj_id] = obj
        if size or old:
            self._sizes[obj_id] = size
            self.nbytes += size - old
        if tags:
            self.tags[obj_id] = frozenset(tags)
        elif self.tags:
            self.tags.pop(obj_id, None)
        if description:
            self.descriptions[obj_id] = description
        elif self.descriptions:
            self.descriptions.pop(obj_id, None)

    def get(self, obj_id: int) -> Any:
        try:
            return self.objects[obj_id]
        except KeyError:
            raise ObjectNotFoundError(
                f"worker {self.worker_id!r} has no object {obj_id} "
                "(it was deleted, already retrieved with get(), or never sent)",
                worker=self.worker_id,
                obj_id=obj_id,
            ) from None

    def pop(self, obj_id: int) -> Any:
        obj = self.get(obj_id)
        self.delete(obj_id)
        return obj

    def delete(self, obj_id: int) -> None:
        """Forget ``obj_id``; a missing id is not an error (deletes may race gets)."""
        if obj_id in self.objects:
            del self.objects[obj_id]
            self.tags.pop(obj_id, None)
            self.descriptions.pop(obj_id, None)
            self.nbytes -= self._sizes.pop(obj_id, 0)

    def clear(self) -> None:
        self.objects.clear()
        self.tags.clear()
        self.descriptions.clear()
        self._sizes.clear()
        self.nbytes = 0

    def replace(self, objects: dict[int, Any]) -> None:
        """Replace the whole content (``worker._objects = {}`` in the seed)."""
        self.clear()
        for k, v in dict(objects).items():
            self.set(k, v)

    def search(self, tags: Iterable[str]) -> list[int]:
        """Ids of the objects carrying every one of ``tags``, in insertion order."""
        wanted = frozenset(tags)
        return [i for i in self.objects if wanted <= self.tags.get(i, frozenset())]
