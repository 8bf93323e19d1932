"""The private policy of a node, without a transport: who may do what, what may leave.

Every request runs as a caller (principal + session). Each attack here succeeds on an open
node (today's behaviour, kept for the tutorials) and is refused on a private one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from fedws.node import Node
from fedws.node.audit import AUDIT_LOGGER, open_audit_log
from fedws.node.policy import DPRule, Policy, plan_digest
from fedws.protocol.codec import ObjRef, decode, encode_bytes
from fedws.protocol.messages import Kind
from fedws.protocol.plan import Op, PlanCode

X_ID, Y_ID = 1000, 1001  # served data
SECRET = 4242.125  # a value that must never appear anywhere it should not


class Client:
    """Sends requests to a node as one caller; ``ok``/``denied`` check the outcome."""

    def __init__(self, node: Node, principal: str, session: str) -> None:
        self.node = node
        self.caller = node.caller(principal, session, "127.0.0.1:1")
        self.seq = 0

    def send(self, kind: Kind, *fields: Any) -> tuple[list[Any], list[Any]]:
        self.seq += 1
        frame = encode_bytes([int(kind), self.seq, *fields])
        _, values, errors = decode(b"".join(self.node.handle(frame, self.caller)))
        return [v for _, v in values], errors

    def ok(self, kind: Kind, *fields: Any) -> Any:
        values, errors = self.send(kind, *fields)
        assert errors == [], errors
        return values[0] if values else None

    def denied(self, kind: Kind, *fields: Any, code: str = "PermissionDeniedError") -> str:
        _, errors = self.send(kind, *fields)
        assert len(errors) == 1, errors
        assert errors[0][1]["type"] == code, errors[0][1]
        return str(errors[0][1]["message"])

    # shorthands
    def store(self, obj_id: int, value: Any) -> None:
        self.ok(Kind.STORE, obj_id, value, [], None)

    def cmd(self, op: str, args: list[Any], result_ids: list[int], **kwargs: Any) -> None:
        self.ok(Kind.CMD, op, args, kwargs, result_ids)

    def get(self, obj_id: int, remove: bool = False) -> Any:
        return self.ok(Kind.GET, obj_id, remove)


def private_node(policy: Policy | None = None) -> Node:
    node = Node("alice", policy=policy or Policy("private"))
    node.serve(X_ID, torch.tensor([[SECRET, 2.0], [3.0, 4.0]]), ["#x", "#train"], "patient features")
    node.serve(Y_ID, torch.tensor([1.0, 0.0]), ["#y", "#train"], "labels")
    return node


def test_open_node_is_todays_behaviour() -> None:
    node = Node("alice")  # the default: open (VirtualWorkers, --insecure-dev)
    node.serve(X_ID, torch.tensor([SECRET]), ["#x"], None)
    a, b = Client(node, "lab-a", "a" * 32), Client(node, "lab-b", "b" * 32)
    a.store(1, torch.ones(2))
    assert b.get(1).tolist() == [1.0, 1.0]
    assert b.get(X_ID).tolist() == [SECRET]


@pytest.mark.parametrize("b_principal", ["lab-a", "lab-b"], ids=["same-principal", "other-principal"])
def test_another_session_cannot_touch_my_objects(b_principal: str) -> None:
    node = private_node()
    a = Client(node, "lab-a", "a" * 32)
    b = Client(node, b_principal, "b" * 32)
    a.store(1, torch.tensor([1.0, 2.0]))
    a.store(2, torch.zeros(2, 2, requires_grad=True))
    a.ok(Kind.STORE_PLAN, 3, _plan_sum().to_wire([]))

    assert "belongs to another session" in b.denied(Kind.GET, 1, False)
    b.denied(Kind.GET, 1, True)
    b.denied(Kind.CMD, "torch.add", [ObjRef(1), 1], {}, [10])  # use in a command
    b.denied(Kind.CMD, "Tensor.add_", [ObjRef(1), 100.0], {}, [])  # modify in place
    b.denied(Kind.CMD, "fedws.set_data", [ObjRef(2), torch.zeros(5)], {}, [])  # reshape A's weight
    b.denied(Kind.CMD, "fedws.set_grad", [ObjRef(2), torch.ones(2, 2)], {}, [])
    b.denied(Kind.STORE, 1, torch.tensor([666.0]), [], None)  # store over it
    # a command whose *result* would land on A's id, and one that fails there: both refused,
    # and the failure is not recorded over A's object
    b.denied(Kind.CMD, "torch.ones", [3], {}, [1])
    b.send(Kind.CMD, "Tensor.mm", [torch.ones(2, 3), torch.ones(2, 3)], {}, [1])
    b.denied(Kind.DELETE, [1, 2])
    b.denied(Kind.INFO, "meta", 1)
    b.denied(Kind.RUN_PLAN, 3, [ObjRef(1)], [11])
    b.denied(Kind.CMD, "fedws.share", [1], {}, [])
    b.ok(Kind.CLEAR)  # clears B's own objects only
    assert b.ok(Kind.INFO, "count") == 2  # only the served data
    listed = {d[0] for d in b.ok(Kind.INFO, "list")}
    assert listed == {X_ID, Y_ID}
    assert {d[0] for d in b.ok(Kind.SEARCH, [])} == {X_ID, Y_ID}

    # A's objects are intact and A still has every right on them
    assert a.get(1).tolist() == [1.0, 2.0]
    assert a.get(2).shape == (2, 2)
    assert a.ok(Kind.INFO, "count") == 5
    a.cmd("Tensor.add_", [ObjRef(1), 1.0], [])
    assert a.get(1, remove=True).tolist() == [2.0, 3.0]
    a.ok(Kind.CLEAR)
    assert a.ok(Kind.INFO, "count") == 2


def test_a_reconnecting_session_keeps_its_objects() -> None:
    node = private_node()
    a = Client(node, "lab-a", "a" * 32)
    a.store(1, torch.ones(1))
    again = Client(node, "lab-a", "a" * 32)  # same principal and session key: the same caller
    assert again.caller is a.caller and again.get(1).tolist() == [1.0]
    thief = Client(node, "lab-b", "a" * 32)  # the key without the principal's token is nothing
    thief.denied(Kind.GET, 1, False)


def test_served_data_is_read_only_and_never_leaves() -> None:
    node = private_node()
    a = Client(node, "lab-a", "a" * 32)
    assert "never leaves" in a.denied(Kind.GET, X_ID, False)
    a.denied(Kind.GET, X_ID, True)
    a.denied(Kind.DELETE, [X_ID])
    a.denied(Kind.STORE, X_ID, torch.zeros(1), [], None)
    a.denied(Kind.CMD, "Tensor.add_", [ObjRef(X_ID), 1.0], {}, [])
    a.denied(Kind.CMD, "Tensor.__setitem__", [ObjRef(X_ID), 0, 0.0], {}, [])
    a.denied(Kind.CMD, "torch.add", [ObjRef(Y_ID), 1.0], {"out": ObjRef(X_ID)}, [])
    a.denied(Kind.CMD, "fedws.set_data", [ObjRef(X_ID), torch.zeros(1)], {}, [])
    a.denied(Kind.CMD, "Tensor.requires_grad_", [ObjRef(X_ID)], {}, [])
    a.denied(Kind.CMD, "torch.nn.functional.relu", [ObjRef(X_ID)], {"inplace": True}, [])
    a.denied(Kind.CMD, "fedws.share", [X_ID], {}, [])
    # a view of served data is served data too
    a.cmd("Tensor.__getitem__", [ObjRef(X_ID), 0], [5])
    a.denied(Kind.CMD, "Tensor.mul_", [ObjRef(5), 0.0], {}, [])
    a.ok(Kind.CLEAR)
    assert a.ok(Kind.INFO, "count") == 2
    assert node.store.get(X_ID)[0, 0].item() == SECRET


@pytest.mark.parametrize(
    "launder",
    [
        [("torch.add", [ObjRef(X_ID), 0], {}, [10])],  # (x + 0).get()
        [("Tensor.__getitem__", [ObjRef(X_ID), slice(0, 1)], {}, [10])],  # x[0:1].get()
        [("Tensor.clone", [ObjRef(X_ID)], {}, [9]), ("Tensor.sum", [ObjRef(9)], {}, [10])],  # a chain
        [("Tensor.__getitem__", [ObjRef(Y_ID), 0], {}, [9]), ("Tensor.double", [ObjRef(9)], {}, [10])],  # another dtype
        [("torch.max", [ObjRef(X_ID), 0], {}, [11, 10])],  # one of several results
    ],
    ids=["plus-zero", "slice", "chain", "double", "multi-result"],
)
def test_derived_values_stay_private(launder: list[Any]) -> None:
    a = Client(private_node(), "lab-a", "a" * 32)
    for op, args, kwargs, rids in launder:
        a.ok(Kind.CMD, op, args, kwargs, rids)
    assert "is private" in a.denied(Kind.GET, 10, True)
    a.denied(Kind.CMD, "fedws.share", [10], {}, [])  # nor sent on as a pointer
    a.denied(Kind.INFO, "meta", 10)  # its shape may depend on the data


@pytest.mark.parametrize(
    "write",
    [
        lambda a: a.cmd("Tensor.add_", [ObjRef(1), ObjRef(X_ID)], []),
        lambda a: a.cmd("Tensor.copy_", [ObjRef(1), ObjRef(X_ID)], []),
        lambda a: a.cmd("Tensor.__setitem__", [ObjRef(1), 0, ObjRef(7)], []),
        lambda a: a.cmd("torch.add", [ObjRef(X_ID), 0], [8], out=ObjRef(1)),
        lambda a: a.cmd("fedws.set_data", [ObjRef(1), ObjRef(7)], []),
        # through a view: the base shares the storage
        lambda a: (a.cmd("Tensor.__getitem__", [ObjRef(1), 0], [6]), a.cmd("Tensor.add_", [ObjRef(6), ObjRef(7)], [])),
    ],
    ids=["add_", "copy_", "setitem", "out=", "set_data", "view"],
)
def test_writing_private_data_into_my_tensor_makes_it_private(write: Any) -> None:
    a = Client(private_node(), "lab-a", "a" * 32)
    a.store(1, torch.zeros(2, 2))
    a.cmd("Tensor.__getitem__", [ObjRef(X_ID), 0], [7])  # a private row
    write(a)
    a.denied(Kind.GET, 1, False)


def test_gradients_computed_from_private_data_are_private() -> None:
    a = Client(private_node(), "lab-a", "a" * 32)
    a.store(1, torch.ones(2, requires_grad=True))
    a.store(2, torch.ones(2, requires_grad=True))  # not in the graph: stays releasable
    a.cmd("torch.matmul", [ObjRef(X_ID), ObjRef(1)], [3])
    a.cmd("Tensor.sum", [ObjRef(3)], [4])
    a.cmd("Tensor.backward", [ObjRef(4)], [])
    a.denied(Kind.GET, 1, False)  # its .grad travels with it
    a.cmd("Tensor.grad", [ObjRef(1)], [5])
    a.denied(Kind.GET, 5, False)
    assert a.get(2).tolist() == [1.0, 1.0]
    # set_grad with a private value
    a.store(6, torch.ones(2, requires_grad=True))
    a.cmd("torch.add", [ObjRef(Y_ID), 0], [7])
    a.cmd("fedws.set_grad", [ObjRef(6), ObjRef(7)], [])
    a.denied(Kind.GET, 6, False)


# -- plans ----------------------------------------------------------------------------------


def _plan_sum() -> PlanCode:
    """``def f(x): return x.sum()``"""
    return PlanCode("f", n_args=1, n_inputs=1, n_state=0, n_registers=2,
                    ops=[Op("Tensor.sum", [ObjRef(0)], {}, [1])], outputs=[1],
                    out_specs=[((), torch.float32, False)])


def _plan_train() -> PlanCode:
    """``def step(x, w): s = x.sum(); w.add_(s); return s`` — a stand-in for a training step."""
    return PlanCode("step", n_args=2, n_inputs=2, n_state=0, n_registers=4,
                    ops=[Op("Tensor.sum", [ObjRef(0)], {}, [2]), Op("Tensor.add_", [ObjRef(1), ObjRef(2)], {}, [3])],
                    outputs=[2], out_specs=[((), torch.float32, False)])


def _plan_poison() -> PlanCode:
    """``def f(x): x.mul_(0)`` — writes into its argument."""
    return PlanCode("poison", n_args=1, n_inputs=1, n_state=0, n_registers=2,
                    ops=[Op("Tensor.mul_", [ObjRef(0), 0.0], {}, [1])], outputs=[1],
                    out_specs=[((2, 2), torch.float32, False)])


def test_unapproved_plan_outputs_and_updates_stay_private(caplog: pytest.LogCaptureFixture) -> None:
    a = Client(private_node(), "lab-a", "a" * 32)
    code = _plan_train()
    with caplog.at_level(logging.WARNING, "fedws.node"):
        a.ok(Kind.STORE_PLAN, 50, code.to_wire([]))
    digest = plan_digest(code, [])
    assert digest in caplog.text and "not approved" in caplog.text and "def step(" in caplog.text
    a.store(1, torch.zeros(()))
    a.ok(Kind.RUN_PLAN, 50, [ObjRef(X_ID), ObjRef(1)], [60])
    a.denied(Kind.GET, 60, False)  # output
    a.denied(Kind.GET, 1, False)  # argument it updated in place
    # the plan (its state) saw private data: later runs on public inputs stay private too
    a.store(2, torch.ones(2))
    a.store(3, torch.zeros(()))
    a.ok(Kind.RUN_PLAN, 50, [ObjRef(2), ObjRef(3)], [61])
    a.denied(Kind.GET, 61, False)


def test_approved_plan_releases_its_outputs_and_updated_arguments() -> None:
    code = _plan_train()
    node = private_node(Policy("private", frozenset({plan_digest(code, [])})))
    a = Client(node, "lab-a", "a" * 32)
    a.ok(Kind.STORE_PLAN, 50, code.to_wire([]))
    a.store(1, torch.zeros(()))
    a.ok(Kind.RUN_PLAN, 50, [ObjRef(X_ID), ObjRef(1)], [60])
    total = SECRET + 2 + 3 + 4
    assert a.get(60) == pytest.approx(total)
    assert a.get(1) == pytest.approx(total)
    # ... but not when a private *computed* value goes in: it would launder it
    a.cmd("torch.mul", [ObjRef(X_ID), 1.0], [2])
    a.store(3, torch.zeros(()))
    a.ok(Kind.RUN_PLAN, 50, [ObjRef(2), ObjRef(3)], [62])
    a.denied(Kind.GET, 62, False)
    a.denied(Kind.GET, 3, False)
    # a plan with other constants (state) has another digest: not approved
    other = _plan_train()
    other.ops[0] = Op("Tensor.sum", [ObjRef(0)], {"dim": 0}, [2])
    assert plan_digest(other, []) != plan_digest(code, [])


def test_plans_cannot_write_into_served_data() -> None:
    node = private_node()
    a = Client(node, "lab-a", "a" * 32)
    a.ok(Kind.STORE_PLAN, 50, _plan_poison().to_wire([]))
    _, errors = a.send(Kind.RUN_PLAN, 50, [ObjRef(X_ID)], [60])
    assert errors and "read-only" in errors[0][1]["message"]
    assert node.store.get(X_ID)[0, 0].item() == SECRET


def test_sharing_lets_another_node_follow_a_pointer_but_not_to_private_data() -> None:
    node = private_node()
    a, peer = Client(node, "lab-a", "a" * 32), Client(node, "default", "p" * 32)
    a.store(1, torch.ones(2))
    peer.denied(Kind.GET, 1, True)
    a.cmd("fedws.share", [1], [])
    assert peer.get(1, remove=True).tolist() == [1.0, 1.0]  # move: the peer takes it


# -- differential privacy -------------------------------------------------------------------


def test_dp_release_clips_noises_and_respects_each_principals_budget() -> None:
    pytest.importorskip("opacus")
    # noise_multiplier 4: epsilon 1.01, 1.48, 1.85, 2.45 ... after 1, 2, 3, 5 releases
    rule = DPRule(max_norm=1.0, noise_multiplier=4.0, epsilon=2.0, delta=1e-5)
    node = private_node(Policy("private", dp=rule))
    a, b = Client(node, "lab-a", "a" * 32), Client(node, "lab-b", "b" * 32)
    a.cmd("Tensor.sum", [ObjRef(X_ID), 0], [10])  # a private aggregate, norm ~4249
    assert "dp=True" in a.denied(Kind.GET, 10, False)  # a plain get is refused
    released = []
    while True:
        values, errors = a.send(Kind.GET, 10, False, "dp")
        if errors:
            assert errors[0][1]["type"] == "PrivacyBudgetExceededError"
            break
        released.append(values[0])
        assert len(released) < 100
    assert len(released) == 3  # the 4th would spend epsilon 2.17 > 2
    for v in released:  # clipped to norm 1, noise sd 4: nothing near the true sums (4249, 6)
        assert v.shape == (2,) and v.abs().max() < 100
    assert node.accountant is not None
    assert node.accountant.spent("lab-a") <= rule.epsilon
    # lab-b has a budget of its own; served data itself is never released, DP or not
    b.cmd("Tensor.sum", [ObjRef(X_ID), 0], [20])
    b.ok(Kind.GET, 20, True, "dp")
    b.denied(Kind.GET, X_ID, False, "dp")


# -- audit ----------------------------------------------------------------------------------


def test_audit_log_records_releases_and_refusals_but_no_values(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    handler = open_audit_log(path)
    try:
        code = _plan_train()
        node = private_node(Policy("private", frozenset({plan_digest(code, [])})))
        a, b = Client(node, "lab-a", "a" * 32), Client(node, "lab-b", "b" * 32)
        node.audit.connected(a.caller)
        a.ok(Kind.STORE_PLAN, 50, code.to_wire([]))
        a.store(1, torch.full((), 777.5))
        a.ok(Kind.RUN_PLAN, 50, [ObjRef(X_ID), ObjRef(1)], [60])
        a.get(60)
        b.denied(Kind.GET, 1, False)
        a.denied(Kind.GET, X_ID, False)
    finally:
        logging.getLogger(AUDIT_LOGGER).removeHandler(handler)
        handler.close()
    text = path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    events = [(r["event"], r.get("principal")) for r in lines]
    assert ("connect", "lab-a") in events
    assert ("store_plan", "lab-a") in events and ("run_plan", "lab-a") in events
    run = next(r for r in lines if r["event"] == "run_plan")
    assert run["plan"] == plan_digest(code, []) and run["approved"] is True
    release = next(r for r in lines if r["event"] == "release")
    assert release["principal"] == "lab-a" and release["obj_id"] == 60 and release["bytes"] == 4
    refusals = [r for r in lines if r["event"] == "refuse"]
    assert {r["principal"] for r in refusals} == {"lab-a", "lab-b"}
    assert all(r["reason"] and r["request"] == "GET" for r in refusals)
    for value in (str(SECRET), "777.5", str(SECRET + 2 + 3 + 4 + 777.5)):
        assert value not in text
