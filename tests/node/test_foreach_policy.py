"""torch._foreach_* ops (allowed for optimizers with foreach=True) under a private node's
policy: they write every tensor of their first list, so each of those is checked like the
first argument of any in-place op; they read served data only into private results."""

from __future__ import annotations

from typing import Any

import torch

from fedws.node import Node
from fedws.node.policy import Policy
from fedws.protocol.codec import ObjRef, decode, encode_bytes
from fedws.protocol.messages import Kind

X_ID = 1000  # served data
SECRET = 4242.125


class _Caller:
    def __init__(self, node: Node, principal: str, session: str) -> None:
        self.node, self.seq = node, 0
        self.caller = node.caller(principal, session, "127.0.0.1:1")

    def send(self, kind: Kind, *fields: Any) -> tuple[list[Any], list[Any]]:
        self.seq += 1
        _, values, errors = decode(b"".join(self.node.handle(encode_bytes([int(kind), self.seq, *fields]), self.caller)))
        return [v for _, v in values], errors

    def cmd(self, op: str, args: list[Any], result_ids: list[int], **kwargs: Any) -> list[Any]:
        return self.send(Kind.CMD, op, args, kwargs, result_ids)[1]

    def error_type(self, errors: list[Any]) -> str | None:
        return errors[0][1]["type"] if errors else None


def _node() -> Node:
    node = Node("alice", policy=Policy("private"))
    node.serve(X_ID, torch.tensor([[SECRET, 2.0], [3.0, 4.0]]), ["#x"], "features")
    return node


def test_foreach_inplace_cannot_write_served_data() -> None:
    node = _node()
    a = _Caller(node, "lab-a", "a" * 32)
    a.send(Kind.STORE, 1, torch.zeros(2, 2), [], None)
    errors = a.cmd("torch._foreach_add_", [[ObjRef(1), ObjRef(X_ID)], 1.0], [])
    assert a.error_type(errors) == "PermissionDeniedError"
    assert node.store.get(X_ID)[0, 0].item() == SECRET  # nothing was written


def test_foreach_inplace_makes_every_written_tensor_private() -> None:
    a = _Caller(_node(), "lab-a", "a" * 32)
    a.send(Kind.STORE, 1, torch.zeros(2), [], None)
    a.send(Kind.STORE, 2, torch.zeros(2), [], None)
    assert a.cmd("Tensor.__getitem__", [ObjRef(X_ID), 0], [7]) == []  # a private row
    assert a.cmd("torch._foreach_copy_", [[ObjRef(2), ObjRef(1)], [ObjRef(7), ObjRef(7)]], []) == []
    for obj in (1, 2):  # the second target too, not only the list's first tensor
        _, errors = a.send(Kind.GET, obj, False)
        assert a.error_type(errors) == "PermissionDeniedError"


def test_foreach_results_from_served_data_are_private() -> None:
    a = _Caller(_node(), "lab-a", "a" * 32)
    assert a.cmd("torch._foreach_mul", [[ObjRef(X_ID)], 1.0], [5]) == []
    _, errors = a.send(Kind.GET, 5, False)
    assert a.error_type(errors) == "PermissionDeniedError"


def test_foreach_cannot_reach_another_sessions_tensor() -> None:
    node = _node()
    a, b = _Caller(node, "lab-a", "a" * 32), _Caller(node, "lab-b", "b" * 32)
    a.send(Kind.STORE, 1, torch.ones(2), [], None)
    b.send(Kind.STORE, 2, torch.ones(2), [], None)
    errors = b.cmd("torch._foreach_mul_", [[ObjRef(2), ObjRef(1)], 3.0], [])
    assert a.error_type(errors) == "PermissionDeniedError"
    assert node.store.get(1).tolist() == [1.0, 1.0]


def test_foreach_with_mismatched_lists_is_an_error_not_a_crash() -> None:
    """Lengths, shapes, dtypes and aliasing a peer can choose: torch checks each, the node
    answers with errors and keeps running (in a subprocess: a crash would be a signal)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import torch
        from fedws.node import Node
        from fedws.protocol.codec import ObjRef, decode, encode_bytes
        node = Node("bob")
        def run(*reqs):
            return decode(b"".join(node.handle(b"".join(encode_bytes(r) for r in reqs))))
        run([2, 1, 10, torch.zeros(4), [], None], [2, 2, 11, torch.zeros(1000), [], None],
            [2, 3, 12, torch.zeros(2, dtype=torch.int8), [], None])
        _, _, errors = run(
            [1, 4, "torch._foreach_add_", [[ObjRef(10), ObjRef(11)], [ObjRef(10)]], {}, []],
            [1, 5, "torch._foreach_add_", [[ObjRef(10)], [ObjRef(11)]], {}, []],
            [1, 6, "torch._foreach_copy_", [[ObjRef(10)], [ObjRef(11)]], {}, []],
            [1, 7, "torch._foreach_mul", [[ObjRef(10)], [1.0, 2.0, 3.0]], {}, [20]],
            [1, 8, "torch._foreach_addcmul_", [[ObjRef(12)], [ObjRef(10)], [ObjRef(11)]], {}, []],
            [1, 9, "torch._foreach_lerp_", [[], [], 0.5], {}, []],
        )
        assert {e[0] for e in errors} >= {4, 5, 6, 7, 8}, errors
        assert node.store.get(11).sum().item() == 0 and node.store.get(10).sum().item() == 0
        print("alive")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "alive" in out.stdout, (out.returncode, out.stderr[-2000:])
