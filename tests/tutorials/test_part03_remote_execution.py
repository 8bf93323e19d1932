"""PySyft 0.2 tutorial "Part 03 - Advanced Remote Execution Tools", cell by cell.

The cells are the tutorial's, with ``import fedws as sy``. On VirtualWorkers nothing else is
needed: workers of one hook know each other (the tutorial never calls ``add_worker``). On real
nodes the nodes are told of each other first: a node links only to the peers it was given
(its config's ``[[peers]]``, or ``add_worker`` on an ``--insecure-dev`` node).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from conftest import stored_count

import fedws as sy


def objects(worker: sy.Worker) -> list[str]:
    """What ``worker._objects`` shows, as type names (asked of the node on any transport)."""
    return sorted(d["type"] for d in worker.list_objects_remote())


def test_part03_cells(hook: sy.TorchHook, transport: str, make_worker: Callable[..., sy.Worker]) -> None:
    # Section 3.1 - Pointers to Pointers
    bob = make_worker("bob")  # sy.VirtualWorker(hook, id='bob')
    alice = make_worker("alice")  # sy.VirtualWorker(hook, id='alice')
    if transport == "websocket":  # the operator's peer list; VirtualWorkers need none
        bob.add_worker(alice)
        alice.add_worker(bob)

    x = torch.tensor([1, 2, 3, 4])
    x_ptr = x.send(bob)
    assert "-> bob:" in repr(x_ptr)
    pointer_to_x_ptr = x_ptr.send(alice)
    assert "-> alice:" in repr(pointer_to_x_ptr)
    # Bob still has the actual data; Alice has x_ptr (pointing at bob)
    assert objects(bob) == ["Tensor"]
    assert objects(alice) == ["PointerTensor"]
    if transport == "virtual":
        (inner,) = alice._objects.values()  # type: ignore[attr-defined]
        assert inner.location is bob and inner.id_at_location == x_ptr.id_at_location

    # and we can use .get() to get x_ptr back from Alice
    x_ptr = pointer_to_x_ptr.get()
    assert "-> bob:" in repr(x_ptr)
    # and then we can use x_ptr to get x back from Bob!
    x = x_ptr.get()
    assert x.tolist() == [1, 2, 3, 4]

    # Arithmetic on Pointer -> Pointer -> Data Object
    assert stored_count(bob) == 0 and stored_count(alice) == 0
    p2p2x = torch.tensor([1, 2, 3, 4, 5]).send(bob).send(alice)
    y = p2p2x + p2p2x
    assert objects(bob) == ["Tensor", "Tensor"]
    assert objects(alice) == ["PointerTensor", "PointerTensor"]
    assert y.get().get().tolist() == [2, 4, 6, 8, 10]
    assert objects(bob) == ["Tensor"]
    assert objects(alice) == ["PointerTensor"]
    assert p2p2x.get().get().tolist() == [1, 2, 3, 4, 5]
    assert stored_count(bob) == 0 and stored_count(alice) == 0

    # Section 3.2 - Pointer Chain Operations
    x = torch.tensor([1, 2, 3, 4, 5]).send(bob)
    assert (stored_count(bob), stored_count(alice)) == (1, 0)
    x = x.move(alice)
    assert (stored_count(bob), stored_count(alice)) == (0, 1)
    assert "-> alice:" in repr(x)
    assert x.location is alice and x.get().tolist() == [1, 2, 3, 4, 5]
