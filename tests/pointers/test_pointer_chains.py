"""Pointer chains: who knows whom, who owns what, and the chain operations of PySyft 0.2
(``end_get``, ``mid_get``, ``remote_send``, ``copy``, ``move(worker, requires_grad=True)``).

Every behaviour runs on both transports. In-process workers of one federation know each
other without ``add_worker`` (as VirtualWorkers of one hook did in PySyft); real nodes link
only to the peers they were given (the pool's ``--insecure-dev`` nodes accept ``add_worker``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import stored_count
from torch import nn

import fedws as sy
from fedws.launch import start_node
from fedws.node import Node
from fedws.node.policy import Policy
from fedws.protocol.codec import ObjRef, decode, encode_bytes
from fedws.protocol.messages import Kind

MakeWorker = Callable[..., sy.Worker]


def link(transport: str, *workers: sy.Worker) -> None:
    """Real nodes learn their peers from us; in-process workers of one hook know each other."""
    if transport != "websocket":
        return
    for a in workers:
        for b in workers:
            if a is not b:
                a.add_worker(b)


# -- who knows whom ---------------------------------------------------------------------------


def test_virtual_workers_of_one_hook_follow_chains_without_add_worker(hook: sy.TorchHook) -> None:
    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    p2p2x = torch.tensor([1, 2, 3, 4, 5]).send(bob).send(alice)
    y = p2p2x + p2p2x
    assert y.get().get().tolist() == [2, 4, 6, 8, 10]
    x = torch.tensor([1, 2, 3]).send(bob).move(alice)
    assert x.location is alice and x.get().tolist() == [1, 2, 3]
    assert not bob.peers and not alice.peers  # nothing was added: the federation answered


def test_a_worker_of_another_federation_is_not_a_peer() -> None:
    ours = sy.TorchHook(torch, federation=sy.Federation())
    theirs = sy.TorchHook(torch, federation=sy.Federation())
    bob = sy.VirtualWorker(ours, id="bob")
    alice = sy.VirtualWorker(theirs, id="alice")
    with pytest.raises(sy.FedwsError, match="does not know worker 'bob'"):
        torch.tensor([1.0]).send(bob).send(alice).get()
    alice.add_worker(bob)  # an explicit peer still works
    assert torch.tensor([2.0]).send(bob).send(alice).remote_get().get().tolist() == [2.0]


def _strangers(transport: str, make_worker: MakeWorker) -> tuple[sy.Worker, sy.Worker]:
    """Two workers that were never introduced (names no other test links)."""
    if transport == "websocket":
        return make_worker("stranger1"), make_worker("stranger2")
    return make_worker("stranger1"), sy.VirtualWorker(sy.TorchHook(torch, federation=sy.Federation()), id="stranger2")


def test_an_unknown_peer_is_named_where_the_user_sees_the_error(transport: str, make_worker: MakeWorker) -> None:
    bob, alice = _strangers(transport, make_worker)
    p = torch.tensor([1.0, 2.0]).send(bob).send(alice)
    y = p + p
    deep = ((y * 2) + 1).sum()  # three commands down from the one that needed the peer
    for attempt in (y.get, p.get, deep.get, torch.tensor([3.0]).send(bob).move(alice).get):
        with pytest.raises(sy.FedwsError) as info:
            attempt()
        text = str(info.value)
        assert "does not know worker 'stranger1'" in text, text
        assert "[[peers]]" in text and "add_worker(stranger1)" in text, text
        assert text.count("result of a command that failed") <= 1, text  # the cause, once


# -- ownership --------------------------------------------------------------------------------


def test_a_pointer_brought_back_shares_ownership_with_the_one_that_was_sent(
    transport: str, make_worker: MakeWorker
) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    link(transport, bob, alice)
    x_ptr = torch.tensor([1, 2, 3]).send(bob)
    p = x_ptr.send(alice)
    back = p.get()
    assert (back.location, back.id_at_location) == (bob, x_ptr.id_at_location)
    del back, p
    assert stored_count(bob) == 1  # x_ptr still points at it: not deleted under it
    assert stored_count(alice) == 0
    assert x_ptr.get().tolist() == [1, 2, 3]
    assert stored_count(bob) == 0


def test_the_data_goes_once_the_last_of_the_two_pointers_goes(transport: str, make_worker: MakeWorker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    link(transport, bob, alice)
    x_ptr = torch.tensor([4.0]).send(bob)
    back = x_ptr.send(alice).get()
    del x_ptr
    assert stored_count(bob) == 1
    del back
    assert stored_count(bob) == 0


def test_sending_a_pointer_to_its_own_location_makes_no_chain(transport: str, make_worker: MakeWorker) -> None:
    bob = make_worker("bob")
    x_ptr = torch.tensor([1, 2, 3]).send(bob)
    p = x_ptr.send(bob)
    assert (p.location, p.id_at_location) == (bob, x_ptr.id_at_location)
    assert stored_count(bob) == 1  # no pointer to itself on bob
    del x_ptr
    assert stored_count(bob) == 1  # p still owns it
    assert p.get().tolist() == [1, 2, 3]  # the data, not a pointer
    assert stored_count(bob) == 0


# -- chain operations -------------------------------------------------------------------------


def test_end_get_gets_on_the_last_pointer_of_the_chain(transport: str, make_worker: MakeWorker) -> None:
    bob, alice, carol = make_worker("bob"), make_worker("alice"), make_worker("carol")
    link(transport, bob, alice, carol)
    x = torch.tensor([1, 2, 3, 4, 5]).send(bob).send(alice)
    assert x.end_get() is x  # in place, as PySyft's
    assert (stored_count(bob), stored_count(alice)) == (0, 1)
    assert x.get().tolist() == [1, 2, 3, 4, 5]  # alice had the data itself
    longer = torch.tensor([6, 7]).send(bob).send(alice).send(carol)
    longer.end_get()  # alice's pointer (the last one) got bob's data; carol still points at alice
    assert (stored_count(bob), stored_count(alice), stored_count(carol)) == (0, 1, 1)
    assert longer.get().get().tolist() == [6, 7]
    assert torch.tensor([8]).send(bob).end_get().tolist() == [8]  # a chain of one: get()


def test_mid_get_is_what_remote_get_asks_of_the_location(transport: str, make_worker: MakeWorker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    link(transport, bob, alice)
    x = torch.tensor([1.0, 2.0]).send(bob).send(alice)
    assert x.mid_get() is x
    assert (stored_count(bob), stored_count(alice)) == (0, 1)
    assert x.get().tolist() == [1.0, 2.0]


def test_remote_send_leaves_a_pointer_where_the_data_was(transport: str, make_worker: MakeWorker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    link(transport, bob, alice)
    x = torch.tensor([1.0, 2.0]).send(bob)
    assert x.remote_send(alice) is x
    assert (stored_count(bob), stored_count(alice)) == (1, 1)  # bob: a pointer; alice: the data
    inner = x.get()
    assert isinstance(inner, sy.PointerTensor) and inner.location is alice
    assert inner.get().tolist() == [1.0, 2.0]
    assert (stored_count(bob), stored_count(alice)) == (0, 0)
    g = torch.tensor([3.0]).send(bob).remote_send(alice, requires_grad=True).get()
    assert g.requires_grad and g.get().requires_grad


def test_copy_is_a_new_remote_object(transport: str, make_worker: MakeWorker) -> None:
    bob = make_worker("bob")
    x = torch.tensor([1.0, 2.0]).send(bob)
    c = x.copy()
    assert c.id_at_location != x.id_at_location and c.location is bob
    assert c.get().tolist() == [1.0, 2.0] and x.get().tolist() == [1.0, 2.0]


def test_move_to_the_coordinator_is_get(transport: str, make_worker: MakeWorker, hook: sy.TorchHook) -> None:
    bob = make_worker("bob")
    assert torch.tensor([5]).send(bob).move(hook.local_worker).tolist() == [5]
    assert stored_count(bob) == 0


def test_move_with_requires_grad_sends_the_gradient_back_across_the_cut(
    transport: str, make_worker: MakeWorker, one_torch_thread: None
) -> None:
    alice, bob = make_worker("alice"), make_worker("bob")
    link(transport, alice, bob)
    torch.manual_seed(0)
    bottom, top = nn.Linear(4, 3), nn.Linear(3, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    # the same step, locally, gives the gradient the bottom half must receive
    a_local = bottom(x)
    cut = a_local.detach().requires_grad_()
    ((top(cut) - y) ** 2).mean().backward()
    a_local.backward(cut.grad)
    expected = bottom.weight.grad.clone()
    bottom.zero_grad()
    top.zero_grad()
    bottom.send(alice)
    top.send(bob)
    a = bottom(x.send(alice))
    remote_a = a.move(bob, requires_grad=True)
    assert remote_a.location is bob and remote_a.requires_grad
    assert a.location is alice  # the original stays in alice's graph
    loss = ((top(remote_a) - y.send(bob)) ** 2).mean()
    loss.backward()
    bottom.get()
    assert bottom.weight.grad is not None
    assert torch.allclose(bottom.weight.grad, expected, atol=1e-6)


# -- a private node refuses a stranger's chain operations -------------------------------------


class _Caller:
    def __init__(self, node: Node, principal: str) -> None:
        self.node, self.caller, self.seq = node, node.caller(principal, principal * 8, "127.0.0.1:1"), 0

    def errors(self, kind: Kind, *fields: Any) -> list[Any]:
        self.seq += 1
        _, _, errors = decode(b"".join(self.node.handle(encode_bytes([int(kind), self.seq, *fields]), self.caller)))
        return list(errors)


def test_a_private_node_refuses_remote_send_and_end_get_of_anothers_object() -> None:
    node = Node("alice", policy=Policy("private"))
    node.serve(1000, torch.tensor([4242.0]), ["#x"], None)
    owner, attacker = _Caller(node, "lab-a"), _Caller(node, "lab-b")
    assert owner.errors(Kind.STORE, 1, torch.tensor([1.0]), [], None) == []
    attempts = {
        "remote_send of another's object": [Kind.CMD, "fedws.remote_send", [1, "eve", 99, False], {}, []],
        "end_get of another's object": [Kind.CMD, "fedws.end_get", [1], {}, [98]],
        "remote_send of served data": [Kind.CMD, "fedws.remote_send", [1000, "eve", 97, False], {}, []],
    }
    for what, request in attempts.items():
        errors = attacker.errors(*request)
        assert len(errors) == 1 and errors[0][1]["type"] == "PermissionDeniedError", (what, errors)
    # the owner may not send private (served-derived) values either
    assert owner.errors(Kind.CMD, "Tensor.mul", [ObjRef(1000), 2.0], {}, [2]) == []
    errors = owner.errors(Kind.CMD, "fedws.remote_send", [2, "eve", 96, False], {}, [])
    assert errors and errors[0][1]["type"] == "PermissionDeniedError"
    assert node.store.get(1).tolist() == [1.0]  # nothing was replaced by a pointer


def test_a_real_private_node_refuses_a_strangers_remote_send(tmp_path: Path) -> None:
    config = tmp_path / "alice.toml"
    config.write_text('id = "alice"\nport = 0\n')  # the default policy: private
    n = start_node(config, extra_args=["--threads", "1"])
    try:
        def connect() -> sy.Worker:
            return sy.connect(n.url, hook=sy.TorchHook(torch, federation=sy.Federation()), timeout=30.0)

        with connect() as owner, connect() as stranger:  # two sessions
            x = torch.tensor([1.0, 2.0]).send(owner)
            x.wait()
            for op, args, results in (
                ("fedws.remote_send", [x.id_at_location, "eve", 5, False], []),
                ("fedws.end_get", [x.id_at_location], [6]),
            ):
                seq, _ = stranger.submit(Kind.CMD, op, args, {}, results)
                with pytest.raises(sy.PermissionDeniedError):
                    stranger.ack_future(seq).result(30)
            assert x.get().tolist() == [1.0, 2.0]  # still the owner's data, not a pointer
    finally:
        n.stop()


def test_the_cut_holds_until_backward_even_without_a_pointer_kept(hook: sy.TorchHook) -> None:
    alice, bob = sy.VirtualWorker(hook, id="alice"), sy.VirtualWorker(hook, id="bob")
    w = torch.tensor([2.0], requires_grad=True).send(alice)
    a = w * 3.0
    loss = (a.move(bob, requires_grad=True) * 5.0).sum()  # no name for the copy on bob
    loss.backward()
    assert w.grad.get().tolist() == [15.0]
