"""Remote objects are freed: dropped pointers, training loops, chains; search never frees."""

from __future__ import annotations

import torch
from conftest import stored_count as _stored_count
from torch import nn, optim

import fedws as sy


def stored_count(worker: sy.Worker) -> int:
    worker.ping()  # see test_count_applies_deletes_queued_before_it
    return _stored_count(worker)


def test_count_applies_deletes_queued_before_it(make_worker) -> None:
    bob = make_worker("bob")
    x = torch.ones(2).send(bob)
    y = x + 1
    del y  # queued delete, then an INFO count: the count must see the delete
    assert _stored_count(bob) == 1


def test_thousand_cycles_leave_the_store_empty(make_worker) -> None:
    bob = make_worker("bob")
    for i in range(1000):
        x = torch.tensor([float(i), 1.0]).send(bob)
        y = (x * 2 + 1).sum()
        del x, y
    assert stored_count(bob) == 0


def test_get_removes_and_dropping_a_gotten_pointer_sends_nothing_more(make_worker) -> None:
    bob = make_worker("bob")
    keep = torch.ones(1).send(bob)
    x = torch.ones(3).send(bob)
    x.get()
    del x
    assert stored_count(bob) == 1
    assert keep.get().tolist() == [1.0]


def test_training_loop_keeps_the_store_at_its_size(make_worker) -> None:
    bob = make_worker("bob")
    data = torch.tensor([[1.0, 1], [0, 1], [1, 0], [0, 0]]).send(bob)
    target = torch.tensor([[1.0], [1], [0], [0]]).send(bob)
    model = nn.Linear(2, 1).send(bob)
    opt = optim.SGD(model.parameters(), lr=0.1)
    start = stored_count(bob)
    for _ in range(30):
        opt.zero_grad()
        loss = ((model(data) - target) ** 2).sum()
        loss.backward()
        opt.step()
    del loss
    assert stored_count(bob) == start
    model.get()
    assert stored_count(bob) == 2


def test_pointer_chain_deletes_cascade(make_worker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    bob.add_worker(alice)
    alice.add_worker(bob)
    p = torch.ones(3).send(bob).send(alice)
    y = p + p
    y.wait()
    assert (stored_count(bob), stored_count(alice)) == (2, 2)
    del y
    alice.ping()
    assert (stored_count(bob), stored_count(alice)) == (1, 1)
    del p
    alice.ping()
    assert (stored_count(bob), stored_count(alice)) == (0, 0)


def test_search_pointers_never_delete(make_worker) -> None:
    bob = make_worker("bob")
    x = torch.tensor([1.0, 2.0]).tag("#data")
    ptr = x.send(bob)
    found = bob.search("#data")
    assert len(found) == 1 and found[0].id_at_location == ptr.id_at_location
    del found
    assert stored_count(bob) == 1
    for _ in range(5):
        (f,) = bob.search("#data")
        assert (f * 2).get().tolist() == [2.0, 4.0]
        del f
    assert stored_count(bob) == 1
    assert ptr.get().tolist() == [1.0, 2.0]
    assert stored_count(bob) == 0


def test_failed_results_are_freed_too(make_worker) -> None:
    bob = make_worker("bob")
    a = torch.ones(2, 3).send(bob)
    for _ in range(20):
        bad = a.mm(a)  # shape error on the node (or unknown-shape locally): a Failure stored
        del bad
    assert stored_count(bob) == 1


def test_a_failed_get_does_not_keep_the_failure_alive(make_worker) -> None:
    """The raised error's traceback holds the pointer; fedws must not keep that error."""
    bob = make_worker("bob")
    x = torch.ones(3).send(bob)
    w = x.mm(x)  # fails on the node: 1-D mm
    for _ in range(3):
        try:
            w.get()
        except sy.RemoteError:
            pass
        else:  # pragma: no cover
            raise AssertionError("the failed result was returned")
    del w
    assert stored_count(bob) == 1  # only x; the Failure left with its pointer
