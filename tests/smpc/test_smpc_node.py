"""The node commands of secure computation (``fedws.smpc.split``, ``fedws.smpc.triple``)
without a transport: correct results, bounds checked before allocating, and on a private
node the ``smpc`` permission and ownership checked on the node."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedws.node import Node
from fedws.node.policy import Policy
from fedws.node.random_shares import MAX_ELEMENTS, MAX_PARTIES, bits, split, triple
from fedws.node.store import Failure
from fedws.protocol.codec import ObjRef, decode, encode_bytes
from fedws.protocol.messages import Kind


class Client:
    """One caller (principal + session) of a node."""

    def __init__(self, node: Node, principal: str, session: str) -> None:
        self.node = node
        self.caller = node.caller(principal, session, "127.0.0.1:1")
        self.seq = 0

    def send(self, kind: Kind, *fields: Any) -> tuple[list[Any], list[Any]]:
        self.seq += 1
        frame = encode_bytes([int(kind), self.seq, *fields])
        _, values, errors = decode(b"".join(self.node.handle(frame, self.caller)))
        return [v for _, v in values], errors

    def cmd(self, op: str, args: list[Any], result_ids: list[int]) -> list[Any]:
        _, errors = self.send(Kind.CMD, op, args, {}, result_ids)
        return errors

    def get(self, obj_id: int) -> Any:
        values, errors = self.send(Kind.GET, obj_id, False)
        assert errors == [], errors
        return values[0]


def _no_tensors(node: Node) -> bool:
    """Nothing but the failures recorded under a refused command's result ids."""
    return all(type(v) is Failure for v in node.store.objects.values())


def _error(errors: list[Any]) -> tuple[str, str]:
    assert len(errors) == 1, errors
    return errors[0][1]["type"], errors[0][1]["message"]


def test_split_sums_to_the_secret_with_wrap_around() -> None:
    secret = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63)], dtype=torch.int64)
    for n in (2, 3, MAX_PARTIES):
        shares = split(secret, n)
        total = torch.zeros_like(secret)
        for s in shares:
            total += s
        assert torch.equal(total, secret)


def test_triple_is_a_times_b() -> None:
    parts = triple("matmul", [3, 4], [4, 2], 3)
    a, b, c = (sum(parts[i * 3:(i + 1) * 3], torch.zeros(1, dtype=torch.int64)) for i in range(3))
    assert torch.equal(c, a @ b)
    parts = triple("mul", [5], [5], 2)
    a, b, c = parts[0] + parts[1], parts[2] + parts[3], parts[4] + parts[5]
    assert torch.equal(c, a * b)


def test_and_triple_and_bits_are_xor_shared() -> None:
    parts = triple("and", [6], [6], 3)
    a, b, c = (parts[i * 3] ^ parts[i * 3 + 1] ^ parts[i * 3 + 2] for i in range(3))
    assert torch.equal(c, a & b)
    made = bits([1000], 2)
    r_xor, r_add = made[0] ^ made[1], made[2] + made[3]
    assert torch.equal(r_xor, r_add) and set(r_xor.tolist()) == {0, 1}


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["mul", [2], [2], 1], "number of shares"),
        (["mul", [2], [2], MAX_PARTIES + 1], "number of shares"),
        (["mul", [2], [2], 2.0], "number of shares"),
        (["pow", [2], [2], 2], "kind"),
        (["mul", [MAX_ELEMENTS, 2], [1], 2], "elements"),
        (["mul", [1] * 9, [1], 2], "at most"),
        (["mul", [-1], [1], 2], "sizes"),
        (["matmul", [2, 3], [2, 3], 2], "do not fit"),
        (["mul", "22", [1], 2], "list"),
        (["and", [2], [3], 2], "equal shapes"),
    ],
)
def test_triple_bounds_are_checked_before_allocating(args: list[Any], text: str) -> None:
    node = Node("carol")
    client = Client(node, "lab", "s" * 32)
    kind, message = _error(client.cmd("fedws.smpc.triple", args, [1, 2, 3, 4, 5, 6]))
    assert kind == "ValueError" and text in message
    assert _no_tensors(node)


def test_a_triple_over_the_memory_budget_is_refused() -> None:
    node = Node("carol", max_memory_bytes=1 << 20)
    kind, message = _error(Client(node, "lab", "s" * 32).cmd("fedws.smpc.triple", ["mul", [1 << 16], [1 << 16], 2],
                                                            list(range(1, 7))))
    assert kind == "MemoryBudgetError" and "fedws.smpc.triple" in message


def test_split_refuses_what_is_not_an_int64_tensor() -> None:
    node = Node("bob")
    client = Client(node, "lab", "s" * 32)
    client.send(Kind.STORE, 7, torch.ones(2), [], None)
    kind, message = _error(client.cmd("fedws.smpc.split", [ObjRef(7), 2], [8, 9]))
    assert kind == "TypeError" and "int64" in message


def test_private_node_another_session_cannot_split_my_object() -> None:
    node = Node("bob", policy=Policy("private"))
    owner = Client(node, "lab-a", "a" * 32)
    attacker = Client(node, "lab-b", "b" * 32)
    owner.send(Kind.STORE, 7, torch.tensor([42]), [], None)
    owner.send(Kind.STORE, 8, torch.tensor([0]), [], None)  # the owner's own result ids
    owner.send(Kind.STORE, 9, torch.tensor([0]), [], None)
    kind, message = _error(attacker.cmd("fedws.smpc.split", [ObjRef(7), 2], [8, 9]))
    assert kind == "PermissionDeniedError" and "another session" in message
    assert torch.equal(node.store.objects[8], torch.tensor([0]))  # nothing of the attacker's
    assert owner.cmd("fedws.smpc.split", [ObjRef(7), 2], [8, 9]) == []
    assert torch.equal(owner.get(8) + owner.get(9), torch.tensor([42]))
    # the shares are the owner's: the attacker can neither read nor use them
    _, errors = attacker.send(Kind.GET, 8, False)
    assert _error(errors)[0] == "PermissionDeniedError"


def test_private_node_refuses_a_principal_without_the_smpc_permission() -> None:
    node = Node("carol", policy=Policy("private", roles={"viewer": frozenset({"compute"})}))
    viewer = Client(node, "viewer", "v" * 32)
    kind, message = _error(viewer.cmd("fedws.smpc.triple", ["mul", [2], [2], 2], list(range(1, 7))))
    assert kind == "PermissionDeniedError" and "'smpc'" in message
    assert _no_tensors(node)
    viewer.send(Kind.STORE, 7, torch.tensor([42]), [], None)
    assert _error(viewer.cmd("fedws.smpc.split", [ObjRef(7), 2], [8, 9]))[0] == "PermissionDeniedError"
    lab = Client(node, "lab", "l" * 32)  # no role: everything
    assert lab.cmd("fedws.smpc.triple", ["mul", [2], [2], 2], list(range(11, 17))) == []


def test_shares_of_private_data_stay_private() -> None:
    """A split of data the node serves is derived from it: the shares cannot leave."""
    node = Node("bob", policy=Policy("private"))
    node.serve(1000, torch.tensor([4242]), ["#x"], None)
    lab = Client(node, "lab", "l" * 32)
    assert lab.cmd("fedws.smpc.split", [ObjRef(1000), 2], [8, 9]) == []
    _, errors = lab.send(Kind.GET, 8, False)
    assert _error(errors)[0] == "PermissionDeniedError"
    _, errors = lab.send(Kind.CMD, "fedws.share", [9], {}, [])
    assert _error(errors)[0] == "PermissionDeniedError"
