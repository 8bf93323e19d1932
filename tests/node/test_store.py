"""ObjectStore alone: byte accounting, failures, snapshots."""

from __future__ import annotations

import pytest
import torch

from fedws.exceptions import ObjectNotFoundError, StoreFullError
from fedws.node import Failure, ObjectStore


def test_bytes_follow_set_replace_delete_and_failures() -> None:
    store = ObjectStore("bob", max_bytes=100)
    store.set(1, torch.ones(8), ["#a"], "x")  # 32 bytes
    store.set(2, torch.ones(4))  # 16
    assert store.nbytes == 48
    store.set(1, torch.ones(2))  # replaced: 8, and its tags and description are gone
    assert store.nbytes == 24 and 1 not in store.tags and 1 not in store.descriptions
    store.record_failure([2, 3], {"type": "RuntimeError", "message": "boom"})
    assert store.nbytes == 8 and isinstance(store.get(2), Failure) and isinstance(store.get(3), Failure)
    with pytest.raises(StoreFullError):
        store.set(4, torch.ones(25))  # 100 more bytes
    assert 4 not in store and store.nbytes == 8
    store.delete_many([1, 2, 99])
    assert store.ids() == [3] and store.nbytes == 0


def test_pop_get_and_replace() -> None:
    store = ObjectStore("bob", max_bytes=1000)
    store.set(1, torch.ones(2))
    assert store.pop(1).tolist() == [1.0, 1.0] and len(store) == 0 and store.nbytes == 0
    with pytest.raises(ObjectNotFoundError, match="no object 1"):
        store.pop(1)
    store.set(5, torch.ones(4))
    store.replace(store.objects)  # its own dict: the content survives
    assert store.ids() == [5] and store.nbytes == 16
    store.replace({})
    assert len(store) == 0 and store.nbytes == 0


def test_search_and_entries_are_snapshots() -> None:
    store = ObjectStore("bob")
    store.set(1, torch.ones(1), ["#a", "#b"], "one")
    store.set(2, 2, ["#a"])
    store.set(3, 3)
    assert store.search(["#a"]) == [1, 2] and store.search(["#a", "#b"]) == [1]
    assert store.search([]) == [1, 2, 3]
    found = store.search(["#a"])
    store.delete(1)
    entries = store.entries(found)  # 1 was deleted meanwhile: skipped, not a KeyError
    assert [(e.id, e.obj, sorted(e.tags), e.description) for e in entries] == [(2, 2, ["#a"], None)]
    assert [e.id for e in store.entries()] == [2, 3]
