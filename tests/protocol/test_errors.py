"""Every error is a FedwsError whose message names the worker and the object."""

from __future__ import annotations

import pytest
import torch

import fedws as sy


def test_mixing_pointer_and_local_tensor(make_worker) -> None:
    bob = make_worker("bob")
    x = torch.ones(3).send(bob)
    with pytest.raises(sy.LocationError) as info:
        torch.add(x, torch.ones(3))
    msg = str(info.value)
    assert "bob" in msg and str(x.id_at_location) in msg
    assert isinstance(info.value, sy.FedwsError)


def test_pointer_on_another_worker(make_worker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    x, y = torch.ones(3).send(bob), torch.ones(3).send(alice)
    with pytest.raises(sy.LocationError) as info:
        x * y
    msg = str(info.value)
    assert "bob" in msg and "alice" in msg
    assert str(x.id_at_location) in msg and str(y.id_at_location) in msg


def test_object_no_longer_present(make_worker) -> None:
    bob = make_worker("bob")
    x = torch.ones(3).send(bob)
    bob.clear_objects()
    with pytest.raises(sy.ObjectNotFoundError) as info:
        x.get()
    err = info.value
    assert err.worker == "bob" and err.obj_id == x.id_at_location
    assert "bob" in str(err) and str(x.id_at_location) in str(err)


def test_get_twice_is_a_pointer_error(make_worker) -> None:
    bob = make_worker("bob")
    x = torch.ones(3).send(bob)
    x.get()
    with pytest.raises(sy.PointerError, match=str(x.id_at_location)):
        x.get()
    with pytest.raises(sy.PointerError):
        x + 1


def test_disallowed_op(make_worker) -> None:
    bob = make_worker("bob")
    x = torch.ones(3).send(bob)
    with pytest.raises(sy.OpNotAllowedError) as info:
        x.share_memory_()
    assert "share_memory_" in str(info.value)


def test_remote_torch_error_reaches_the_caller_on_get(make_worker) -> None:
    bob = make_worker("bob")
    a, b = torch.ones(2, 3).send(bob), torch.ones(2, 3).send(bob)
    c = a.mm(b)
    with pytest.raises(sy.RemoteError) as info:
        c.get()
    err = info.value
    assert err.remote_type == "RuntimeError"
    assert "cannot be multiplied" in err.remote_message
    assert err.worker == "bob" and err.obj_id == c.id_at_location
    assert "bob" in str(err) and str(c.id_at_location) in str(err) and "mm" in str(err)
    # the node keeps its traceback (paths of its install) to itself
    assert err.remote_traceback is None


def test_dependent_command_fails_with_the_cause_chained(make_worker) -> None:
    bob = make_worker("bob")
    a = torch.ones(2, 3).send(bob)
    bad = a.mm(a)
    worse = (bad + 1).sum()
    with pytest.raises(sy.DependencyError) as info:
        worse.get()
    err = info.value
    assert err.worker == "bob"
    assert "RuntimeError" in str(err) and "cannot be multiplied" in str(err)
    assert err.remote_type == "RuntimeError"
    with pytest.raises(sy.RemoteError):
        bad.get()


async def test_errors_surface_on_await(make_worker) -> None:
    bob = make_worker("bob")
    a = torch.ones(2, 3).send(bob)
    bad = a.mm(a)
    with pytest.raises(sy.RemoteError, match="cannot be multiplied"):
        await bad
    with pytest.raises(sy.RemoteError, match="cannot be multiplied"):
        await bad.get_async()


def test_wait_raises_the_remote_error(make_worker) -> None:
    bob = make_worker("bob")
    a = torch.ones(2, 3).send(bob)
    with pytest.raises(sy.RemoteError, match="bob"):
        a.mm(a).wait()
    assert a.wait() is a


def test_data_dependent_python_calls_are_pointer_errors(make_worker) -> None:
    bob = make_worker("bob")
    x = torch.ones(3).send(bob)
    for call in (lambda: bool(x.sum()), lambda: x.sum().item(), lambda: x.tolist(), lambda: float(x.sum())):
        with pytest.raises(sy.PointerError, match="bob"):
            call()


def test_move_to_a_worker_that_does_not_know_the_source() -> None:
    hook = sy.TorchHook(torch)
    other = sy.TorchHook(torch, federation=sy.Federation())  # workers of one hook know each other
    bob, carol = sy.VirtualWorker(hook, id="bob"), sy.VirtualWorker(other, id="carol")
    x = torch.ones(2).send(bob).move(carol)  # carol was never told about bob
    with pytest.raises(sy.RemoteError) as info:
        x.get()
    assert "carol" in str(info.value) and "bob" in str(info.value)
    assert "add_worker" in str(info.value)
