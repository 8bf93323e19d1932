"""PySyft 0.2 tutorial "Part 01 - The Basic Tools of Private Deep Learning", cell by cell.

The cells are the tutorial's, with ``import fedws as sy``; ``bob`` comes from the
``make_worker`` fixture (a VirtualWorker, or a real node), and ``hook`` is the test's own.
``bob._objects`` is read where bob is in-process; on a real node the same question is asked
of the node (``stored_count``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from conftest import stored_count

import fedws as sy


def test_part01_cells(hook: sy.TorchHook, transport: str, make_worker: Callable[..., sy.Worker]) -> None:
    # Part 0: Setup
    assert torch.tensor([1, 2, 3, 4, 5]).tolist() == [1, 2, 3, 4, 5]
    x = torch.tensor([1, 2, 3, 4, 5])
    y = x + x
    assert y.tolist() == [2, 4, 6, 8, 10]

    # Section 1.1 - Sending Tensors to Bob's Machine
    bob = make_worker("bob")  # sy.VirtualWorker(hook, id="bob")
    x = torch.tensor([1, 2, 3, 4, 5])
    y = torch.tensor([1, 1, 1, 1, 1])
    x_ptr = x.send(bob)
    y_ptr = y.send(bob)
    assert "-> bob:" in repr(x_ptr)
    if transport == "virtual":
        assert len(bob._objects) == 2  # type: ignore[attr-defined]
    assert stored_count(bob) == 2
    z = x_ptr + x_ptr
    assert "-> bob:" in repr(z)
    assert stored_count(bob) == 3
    assert x_ptr.location is bob
    assert bob == x_ptr.location
    assert isinstance(x_ptr.id_at_location, int)
    me = sy.local_worker
    assert me is hook.local_worker and me.id == "me"
    assert me == x_ptr.owner
    assert x_ptr.get().tolist() == [1, 2, 3, 4, 5]
    assert y_ptr.get().tolist() == [1, 1, 1, 1, 1]
    assert z.get().tolist() == [2, 4, 6, 8, 10]
    assert stored_count(bob) == 0  # Bob no longer has the tensors

    # Section 1.2 - Using Tensor Pointers
    x = torch.tensor([1, 2, 3, 4, 5]).send(bob)
    y = torch.tensor([1, 1, 1, 1, 1]).send(bob)
    z = x + y
    assert "-> bob:" in repr(z)
    assert z.get().tolist() == [2, 3, 4, 5, 6]
    z = torch.add(x, y)
    assert z.get().tolist() == [2, 3, 4, 5, 6]

    # Variables (including backpropagation!)
    x = torch.tensor([1, 2, 3, 4, 5.0], requires_grad=True).send(bob)
    y = torch.tensor([1, 1, 1, 1, 1.0], requires_grad=True).send(bob)
    z = (x + y).sum()
    z.backward()
    x = x.get()
    assert x.tolist() == [1, 2, 3, 4, 5.0]
    assert x.grad is not None and x.grad.tolist() == [1.0] * 5
