"""The course transcript (seed 004, "Federated Learning" section) as tests, cell by cell.

``import fedws as sy`` stands in for ``import syft as sy``. Tests that use ``make_worker``
run on every transport; tests that read ``worker._objects`` (a VirtualWorker-only view of
the node's store) build ``sy.VirtualWorker`` directly.
"""

from __future__ import annotations

import gc
import re

import pytest
import torch as th
from conftest import stored_count as _stored_count
from torch import nn, optim

import fedws as sy

PTR_RE = r"\[PointerTensor \| me:(\d+) -> {loc}:(\d+)\]"


def ptr_ids(ptr: object, loc: str, owner: str = "me") -> tuple[int, int]:
    """Parse ``[PointerTensor | owner:ID -> loc:ID]`` and return the two ids."""
    m = re.fullmatch(PTR_RE.replace("me:", f"{owner}:").format(loc=loc), repr(ptr))
    assert m is not None, repr(ptr)
    return int(m.group(1)), int(m.group(2))


def values(worker: sy.VirtualWorker) -> list[list]:
    """The tensors a virtual worker holds, as sorted lists (pointers as their repr)."""
    return sorted(
        (v.tolist() if type(v) is th.Tensor else repr(v)) for v in worker._objects.values()
    )


def stored_count(worker: sy.Worker) -> int:
    """``conftest.stored_count`` after a barrier.

    Session.take_frame (fedws/client/session.py) appends queued deletes *after* the queued
    requests, so the INFO "count" request runs before deletes queued earlier. A ping first
    flushes the deletes of pointers freed by refcount. See test_gc.py::test_count_applies_deletes_queued_before_it.
    """
    worker.ping()
    return _stored_count(worker)


@pytest.fixture
def virtual(hook: sy.TorchHook):
    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    yield bob, alice
    gc.collect()


# -- Lesson: Introducing / Installing PySyft (cells 1-2) -------------------------------------


def test_cells_1_2_hook_leaves_local_torch_alone(hook: sy.TorchHook) -> None:
    x = th.tensor([1, 2, 3, 4, 5])
    y = x + x
    assert repr(y[0]) == "tensor(2)"
    assert th.equal(th.tensor([1, 2, 3, 4, 5]), x)
    assert hasattr(th.Tensor, "send")


# -- Lesson: Basic Remote Execution (cells 3-19) ---------------------------------------------


def test_cells_3_19_send_pointer_metadata_get(virtual) -> None:
    bob, _ = virtual
    x = th.tensor([1, 2, 3, 4, 5])
    y = th.tensor([1, 1, 1, 1, 1])
    x_ptr = x.send(bob)
    y_ptr = y.send(bob)
    # cell 6: bob holds both tensors under the ids the pointers name
    assert set(bob._objects) == {x_ptr.id_at_location, y_ptr.id_at_location}
    assert bob._objects[x_ptr.id_at_location].tolist() == [1, 2, 3, 4, 5]
    assert bob._objects[y_ptr.id_at_location].tolist() == [1, 1, 1, 1, 1]
    # cell 7: (Wrapper)>[PointerTensor | me:ID -> bob:ID]
    own_id, at = ptr_ids(x_ptr, "bob")
    assert own_id == x_ptr.id and at == x_ptr.id_at_location
    # cells 8-10
    assert repr(x_ptr.location) == "<VirtualWorker id:bob #tensors:2>"
    assert repr(bob) == "<VirtualWorker id:bob #tensors:2>"
    assert bob == x_ptr.location
    # cell 11
    assert x_ptr.id_at_location in bob._objects
    # cells 12-14
    me = sy.local_worker
    assert repr(me) == "<VirtualWorker id:me #tensors:0>"
    assert repr(x_ptr.owner) == "<VirtualWorker id:me #tensors:0>"
    assert me == x_ptr.owner
    # cells 15-19
    assert x_ptr.get().tolist() == [1, 2, 3, 4, 5]
    assert y_ptr.get().tolist() == [1, 1, 1, 1, 1]
    assert bob._objects == {}


def test_send_get_any_transport(make_worker) -> None:
    bob = make_worker("bob")
    x_ptr = th.tensor([1, 2, 3, 4, 5]).send(bob)
    y_ptr = th.tensor([1, 1, 1, 1, 1]).send(bob)
    assert stored_count(bob) == 2
    ptr_ids(x_ptr, "bob")
    assert x_ptr.location is bob
    assert x_ptr.owner is sy.local_worker
    assert th.equal(x_ptr.get(), th.tensor([1, 2, 3, 4, 5]))
    assert th.equal(y_ptr.get(), th.tensor([1, 1, 1, 1, 1]))
    assert stored_count(bob) == 0


# -- Project: Playing with Remote Tensors (cells 20-28) --------------------------------------


def test_cells_20_28_send_to_two_workers(virtual) -> None:
    bob, alice = virtual
    x = th.tensor([1, 2, 3, 4, 5])
    x_ptr = x.send(bob, alice)
    assert values(bob) == [[1, 2, 3, 4, 5]]
    assert values(alice) == [[1, 2, 3, 4, 5]]
    got = x_ptr.get()
    assert isinstance(got, list) and [g.tolist() for g in got] == [[1, 2, 3, 4, 5]] * 2
    assert bob._objects == {} and alice._objects == {}
    x_ptr = x.send(bob, alice)
    assert x_ptr.get(sum_results=True).tolist() == [2, 4, 6, 8, 10]
    assert bob._objects == {} and alice._objects == {}


def test_multi_send_any_transport(make_worker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    x_ptr = th.tensor([1, 2, 3, 4, 5]).send(bob, alice)
    assert isinstance(x_ptr, sy.MultiPointerTensor)
    assert (stored_count(bob), stored_count(alice)) == (1, 1)
    assert th.equal((x_ptr + x_ptr).get(sum_results=True), th.tensor([4, 8, 12, 16, 20]))
    assert [t.tolist() for t in x_ptr.get()] == [[1, 2, 3, 4, 5]] * 2
    assert (stored_count(bob), stored_count(alice)) == (0, 0)


# -- Lesson: Introducing Remote Arithmetic (cells 29-42) -------------------------------------


def test_cells_29_36_remote_arithmetic(make_worker) -> None:
    bob = make_worker("bob")
    x = th.tensor([1, 2, 3, 4, 5]).send(bob)
    y = th.tensor([1, 1, 1, 1, 1]).send(bob)
    ptr_ids(x, "bob")
    z = x + y
    own, at = ptr_ids(z, "bob")
    assert own == at  # cell 33: a result's pointer id equals its id on bob
    assert z.get().tolist() == [2, 3, 4, 5, 6]
    z = th.add(x, y)
    own, at = ptr_ids(z, "bob")
    assert own == at
    assert z.get().tolist() == [2, 3, 4, 5, 6]
    assert stored_count(bob) == 2


def test_cells_37_42_backward_and_grad(make_worker) -> None:
    bob = make_worker("bob")
    x = th.tensor([1.0, 2, 3, 4, 5], requires_grad=True).send(bob)
    y = th.tensor([1.0, 1, 1, 1, 1], requires_grad=True).send(bob)
    z = (x + y).sum()
    z.backward()
    x = x.get()
    assert repr(x) == "tensor([1., 2., 3., 4., 5.], requires_grad=True)"
    assert repr(x.grad) == "tensor([1., 1., 1., 1., 1.])"
    assert y.get().grad.tolist() == [1.0] * 5


# -- Project: Learn a Simple Linear Model (cells 43-44) ----------------------------------------

SEED_LOSSES = [2.0, 0.56, 0.2432, 0.1372, 0.0849, 0.0538, 0.0344, 0.0220, 0.0141, 0.0090]


def test_cells_43_44_linear_model_on_bob(make_worker) -> None:
    bob = make_worker("bob")
    input = th.tensor([[1.0, 1], [0, 1], [1, 0], [0, 0]], requires_grad=True).send(bob)
    target = th.tensor([[1.0], [1], [0], [0]], requires_grad=True).send(bob)
    weights = th.tensor([[0.0], [0]], requires_grad=True).send(bob)
    start = stored_count(bob)
    losses = []
    for _ in range(10):
        pred = input.mm(weights)
        loss = ((pred - target) ** 2).sum()
        loss.backward()
        weights.data.sub_(weights.grad * 0.1)
        weights.grad *= 0
        losses.append(loss.get().data)
    assert str(losses[0]) == "tensor(2.)"
    assert [round(float(v), 4) for v in losses] == SEED_LOSSES
    del pred, loss
    assert stored_count(bob) == start
    assert weights.get().shape == (2, 1)


# -- Lesson: Common Errors (cells 45-47) ---------------------------------------------------------


def test_cell_46_local_plus_pointer_is_a_location_error(make_worker) -> None:
    bob = make_worker("bob")
    x = th.tensor([1, 2, 3, 4, 5]).send(bob)
    y = th.tensor([1, 1, 1, 1, 1])
    for op in (lambda: y + x, lambda: x + y):
        with pytest.raises(sy.LocationError, match="bob") as info:
            op()
        assert str(x.id_at_location) in str(info.value)
    assert stored_count(bob) == 1  # nothing was sent


def test_cell_47_objects_cleared_then_used(virtual) -> None:
    bob, _ = virtual
    x = th.tensor([1, 2, 3, 4, 5]).send(bob)
    bob._objects = {}
    y = x + x  # non-blocking: the error is reported where a value is asked for
    with pytest.raises(sy.ObjectNotFoundError, match="bob") as info:
        y.get()
    assert str(x.id_at_location) in str(info.value)
    assert isinstance(info.value, sy.FedwsError)


def test_cell_47_any_transport(make_worker) -> None:
    bob = make_worker("bob")
    x = th.tensor([1, 2, 3, 4, 5]).send(bob)
    bob.clear_objects()
    with pytest.raises(sy.ObjectNotFoundError, match=str(x.id_at_location)):
        (x + x).get()
    with pytest.raises(sy.ObjectNotFoundError, match="bob"):
        x.get()


# -- Lesson: Toy Federated Learning (cells 52-58) -------------------------------------------------


def test_cells_52_53_centralized_training_baseline() -> None:
    th.manual_seed(0)
    data = th.tensor([[1.0, 1], [0, 1], [1, 0], [0, 0]], requires_grad=True)
    target = th.tensor([[1.0], [1], [0], [0]], requires_grad=True)
    model = nn.Linear(2, 1)
    opt = optim.SGD(params=model.parameters(), lr=0.1)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((model(data) - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 < losses[0]


def test_cells_57_58_toy_federated_learning(make_worker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    th.manual_seed(0)
    data = th.tensor([[1.0, 1], [0, 1], [1, 0], [0, 0]], requires_grad=True)
    target = th.tensor([[1.0], [1], [0], [0]], requires_grad=True)
    data_bob, target_bob = data[0:2].send(bob), target[0:2].send(bob)
    data_alice, target_alice = data[2:].send(alice), target[2:].send(alice)
    datasets = [(data_bob, target_bob), (data_alice, target_alice)]
    model = nn.Linear(2, 1)
    reference = nn.Linear(2, 1)
    reference.load_state_dict(model.state_dict())
    params = list(model.parameters())

    opt = optim.SGD(params=model.parameters(), lr=0.1)
    ref_opt = optim.SGD(params=reference.parameters(), lr=0.1)
    local_sets = [(data[0:2], target[0:2]), (data[2:], target[2:])]
    losses = []
    for _ in range(20):
        for (d, t), (ld, lt) in zip(datasets, local_sets):
            model.send(d.location)
            assert model.location is d.location
            opt.zero_grad()
            pred = model(d)
            loss = ((pred - t) ** 2).sum()
            loss.backward()
            model.get()
            opt.step()
            losses.append(loss.get().data)
            # the same step, locally, on the same data: fedws must match it exactly
            ref_opt.zero_grad()
            ((reference(ld) - lt) ** 2).sum().backward()
            ref_opt.step()
    assert len(losses) == 40
    assert float(losses[-1]) < 1e-3 < float(losses[0])
    assert all(a is b for a, b in zip(params, model.parameters()))  # same Parameter objects
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert th.allclose(model.weight, reference.weight, atol=1e-6)
    assert th.allclose(model.bias, reference.bias, atol=1e-6)
    del pred, loss
    assert (stored_count(bob), stored_count(alice)) == (2, 2)  # only the datasets


# -- Lesson: Advanced Remote Execution Tools (cells 59-79) -----------------------------------------


def test_cells_59_68_send_a_pointer(virtual) -> None:
    bob, alice = virtual
    assert bob.clear_objects() is bob
    assert alice.clear_objects() is alice
    bob.add_worker(alice)
    alice.add_worker(bob)
    x = th.tensor([1, 2, 3, 4])
    x_ptr = x.send(bob)
    x_own, x_at = ptr_ids(x_ptr, "bob")
    pointer_to_x_ptr = x_ptr.send(alice)
    own, at = ptr_ids(pointer_to_x_ptr, "alice")
    assert at == x_own  # cell 62: alice stores the pointer under its own id
    assert values(bob) == [[1, 2, 3, 4]]  # cell 63: the data did not move
    # cell 64: {8236342053: [PointerTensor | alice:8236342053 -> bob:42080168797]}
    assert list(alice._objects) == [x_own]
    assert repr(alice._objects[x_own]) == f"[PointerTensor | alice:{x_own} -> bob:{x_at}]"
    x_ptr = pointer_to_x_ptr.get()  # cell 65
    assert repr(x_ptr) == f"[PointerTensor | me:{x_own} -> bob:{x_at}]"
    assert alice._objects == {}
    assert x_ptr.get().tolist() == [1, 2, 3, 4]  # cell 68
    assert bob._objects == {} and alice._objects == {}


def test_cells_71_79_arithmetic_on_pointer_chains(virtual) -> None:
    bob, alice = virtual
    bob.add_worker(alice)
    alice.add_worker(bob)
    p2p2x = th.tensor([1, 2, 3, 4, 5]).send(bob).send(alice)
    y = p2p2x + p2p2x
    own, at = ptr_ids(y, "alice")
    # cells 72-73: the result has the same id at every hop
    assert own == at
    assert set(bob._objects) == {at, *(k for k in bob._objects if k != at)}
    assert bob._objects[at].tolist() == [2, 4, 6, 8, 10]
    assert values(bob) == [[1, 2, 3, 4, 5], [2, 4, 6, 8, 10]]
    assert len(alice._objects) == 2
    assert repr(alice._objects[at]) == f"[PointerTensor | alice:{at} -> bob:{at}]"
    (x_bob_id,) = set(bob._objects) - {at}
    (chain_id,) = set(alice._objects) - {at}
    assert chain_id == p2p2x.id_at_location
    assert repr(alice._objects[chain_id]) == f"[PointerTensor | alice:{chain_id} -> bob:{x_bob_id}]"
    assert y.get().get().tolist() == [2, 4, 6, 8, 10]  # cell 74
    assert list(bob._objects) == [x_bob_id]  # cells 75-76
    assert list(alice._objects) == [chain_id]
    assert p2p2x.get().get().tolist() == [1, 2, 3, 4, 5]  # cell 77
    assert bob._objects == {} and alice._objects == {}  # cells 78-79


def test_pointer_chain_any_transport(make_worker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    bob.add_worker(alice)
    alice.add_worker(bob)
    p2p2x = th.tensor([1, 2, 3, 4, 5]).send(bob).send(alice)
    y = p2p2x + p2p2x
    y.wait()  # alice acknowledges once bob, at the end of the chain, has run it too
    assert (stored_count(bob), stored_count(alice)) == (2, 2)
    assert y.get().get().tolist() == [2, 4, 6, 8, 10]
    assert (stored_count(bob), stored_count(alice)) == (1, 1)
    assert p2p2x.get().get().tolist() == [1, 2, 3, 4, 5]
    assert (stored_count(bob), stored_count(alice)) == (0, 0)


# -- Lesson: Pointer Chain Operations (cells 84-100) -----------------------------------------------


def test_cells_84_93_remote_get(virtual) -> None:
    bob, alice = virtual
    bob.add_worker(alice)
    alice.add_worker(bob)
    assert repr(alice.clear_objects()) == "<VirtualWorker id:alice #tensors:0>"  # cell 84
    x = th.tensor([1, 2, 3, 4, 5]).send(bob).send(alice)
    assert values(bob) == [[1, 2, 3, 4, 5]]
    (chain_id,) = alice._objects
    own, at = ptr_ids(x, "alice")
    assert at == chain_id
    x2 = x.remote_get()
    assert repr(x2) == f"[PointerTensor | me:{own} -> alice:{at}]"  # cell 90
    assert bob._objects == {}  # cell 91
    assert list(alice._objects) == [at]  # cell 92: alice now holds the data itself
    assert type(alice._objects[at]) is th.Tensor
    assert alice._objects[at].tolist() == [1, 2, 3, 4, 5]
    assert x2.get().tolist() == [1, 2, 3, 4, 5]
    assert alice._objects == {}


def test_cells_94_100_move(virtual) -> None:
    bob, alice = virtual
    bob.add_worker(alice)
    alice.add_worker(bob)
    x = th.tensor([1, 2, 3, 4, 5]).send(bob)
    own, at = ptr_ids(x, "bob")
    assert values(bob) == [[1, 2, 3, 4, 5]] and alice._objects == {}
    x = x.move(alice)
    assert bob._objects == {}
    assert list(alice._objects) == [own]  # cell 100: stored under the old pointer's id
    assert alice._objects[own].tolist() == [1, 2, 3, 4, 5]
    assert x.location is alice
    assert x.get().tolist() == [1, 2, 3, 4, 5]


def test_remote_get_and_move_any_transport(make_worker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    bob.add_worker(alice)
    alice.add_worker(bob)
    x = th.tensor([1, 2, 3, 4, 5]).send(bob).send(alice)
    x.remote_get()
    assert (stored_count(bob), stored_count(alice)) == (0, 1)
    assert x.get().tolist() == [1, 2, 3, 4, 5]
    x = th.tensor([1.0, 2]).send(bob).move(alice)
    assert (stored_count(bob), stored_count(alice)) == (0, 1)
    assert (x * 2).get().tolist() == [2.0, 4.0]
    assert x.get().tolist() == [1.0, 2.0]
    assert (stored_count(bob), stored_count(alice)) == (0, 0)


# -- Final Project: Federated Learning with Untrusted Central Server ---------------------------------


def test_final_project_untrusted_central_server(make_worker) -> None:
    bob, alice, secure = make_worker("bob"), make_worker("alice"), make_worker("secure_worker")
    for a in (bob, alice, secure):
        for b in (bob, alice, secure):
            if a is not b:
                a.add_worker(b)
    th.manual_seed(1)
    data = th.tensor([[1.0, 1], [0, 1], [1, 0], [0, 0]], requires_grad=True)
    target = th.tensor([[1.0], [1], [0], [0]], requires_grad=True)
    shards = {"bob": (data[0:2], target[0:2]), "alice": (data[2:], target[2:])}
    remote = {w: (shards[w.id][0].send(w), shards[w.id][1].send(w)) for w in (bob, alice)}
    model = nn.Linear(2, 1)
    reference = nn.Linear(2, 1)
    reference.load_state_dict(model.state_dict())

    def local_round(ref: nn.Linear) -> dict[str, th.Tensor]:
        copies = {}
        for wid, (d, t) in shards.items():
            m = nn.Linear(2, 1)
            m.load_state_dict(ref.state_dict())
            o = optim.SGD(m.parameters(), lr=0.1)
            for _ in range(10):
                o.zero_grad()
                ((m(d) - t) ** 2).sum().backward()
                o.step()
            copies[wid] = m
        return {k: (copies["bob"].state_dict()[k] + copies["alice"].state_dict()[k]) / 2 for k in ("weight", "bias")}

    first_loss = last_loss = None
    for _ in range(3):
        bobs_model = model.copy().send(bob)
        alices_model = model.copy().send(alice)
        opts = [optim.SGD(bobs_model.parameters(), lr=0.1), optim.SGD(alices_model.parameters(), lr=0.1)]
        for _ in range(10):
            for m, o, w in ((bobs_model, opts[0], bob), (alices_model, opts[1], alice)):
                d, t = remote[w]
                o.zero_grad()
                loss = ((m(d) - t) ** 2).sum()
                loss.backward()
                o.step()
                value = float(loss.get().data)
                first_loss = value if first_loss is None else first_loss
                last_loss = value
        assert bobs_model.weight.location is bob and alices_model.weight.location is alice
        alices_model.move(secure)
        bobs_model.move(secure)
        assert alices_model.weight.location is secure and bobs_model.location is secure
        # bob's and alice's copies left their workers; only the datasets remain there
        assert (stored_count(bob), stored_count(alice)) == (2, 2)
        assert stored_count(secure) == 4
        with th.no_grad():
            avg_w = ((alices_model.weight.data + bobs_model.weight.data) / 2).get()
            avg_b = ((alices_model.bias.data + bobs_model.bias.data) / 2).get()
            model.weight.set_(avg_w)
            model.bias.set_(avg_b)
        expected = local_round(reference)
        reference.load_state_dict(expected)
        assert th.allclose(model.weight, expected["weight"], atol=1e-5)
        assert th.allclose(model.bias, expected["bias"], atol=1e-5)
        del bobs_model, alices_model, opts, m, o, loss
        assert stored_count(secure) == 0  # the individual models were never fetched
    assert last_loss < first_loss
