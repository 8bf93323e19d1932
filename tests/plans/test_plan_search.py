"""Plans and protocols that are tagged, found with ``search`` and brought back with ``get``."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import fedws as sy
from fedws.node import Node
from fedws.node.policy import Policy
from fedws.plans import PointerPlan, Protocol
from fedws.plans.protocol import MAX_PROTOCOL_STEPS, PROTOCOL_TAG, PointerProtocol
from fedws.protocol.codec import ObjRef, decode, encode_bytes
from fedws.protocol.messages import Kind
from fedws.protocol.plan import Op, PlanCode


def _abs_plus_bias() -> sy.Plan:
    @sy.func2plan(args_shape=[(1,)], state={"bias": torch.tensor([1.0])})
    def plan_abs(x, state):
        bias = state.read("bias")
        return x.abs() + bias

    return plan_abs


def _inc() -> sy.Plan:
    @sy.func2plan(args_shape=[(1,)])
    def inc(x):
        return x + 1

    return inc


def test_a_tagged_plan_is_found_with_its_tags_and_description(make_worker) -> None:
    bob = make_worker("bob")
    plan = _abs_plus_bias().tag("#abs", "#model").describe("absolute value plus a learnt bias")
    sent = plan.send(bob)
    assert sent.tags == {"#abs", "#model"}
    (found,) = bob.search("#abs", "#model")
    assert isinstance(found, PointerPlan) and found.location is bob
    assert found.id_at_location == sent.id_at_location
    assert found.tags == {"#abs", "#model"} and found.description == "absolute value plus a learnt bias"
    assert [p.id_at_location for p in bob.search("learnt bias")] == [sent.id_at_location]
    # The found plan runs like the one sent: its signature comes from the node.
    x = torch.tensor([-3.0, 2.0]).send(bob)
    assert found(x).get().tolist() == [4.0, 3.0]
    assert found.signature.name == "plan_abs"


def test_pointer_plan_get_brings_a_usable_plan_back(make_worker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    plan = _abs_plus_bias().tag("#abs")
    plan.send(bob)
    (found,) = bob.search("#abs")
    back = found.get()
    assert isinstance(back, sy.Plan) and back.is_built and back.tags == {"#abs"}
    assert back(torch.tensor([-5.0])).tolist() == [6.0]  # runs locally
    assert bob.search("#abs") == []  # the worker forgot it
    with pytest.raises(sy.PointerError, match="already retrieved"):
        found(torch.tensor([1.0]).send(bob))
    # ... and can be sent again, anywhere.
    x = torch.tensor([-1.0]).send(alice)
    assert back.send(alice)(x).get().tolist() == [2.0]
    assert len(alice.search("#abs")) == 1


def test_plan_get_takes_the_state_back(make_worker) -> None:
    bob = make_worker("bob")

    @sy.func2plan(args_shape=[(1,)], state={"w": torch.tensor([0.0])})
    def step(x, state):
        w = state.read("w")
        w.add_(x)  # trains its state in place
        return w * 1

    step.send(bob)
    for _ in range(3):
        step(torch.tensor([2.0]).send(bob))
    assert step.get() is step
    assert step.state_tensors[0].tolist() == [6.0]  # what it learnt on bob
    assert stored_plans(bob) == 0


def stored_plans(worker: sy.Worker) -> int:
    return sum(1 for o in worker.list_objects_remote() if o["type"] == "StoredPlan")


def test_searched_plans_never_delete_the_plan(make_worker) -> None:
    bob = make_worker("bob")
    plan = _inc().tag("#inc")
    kept = plan.send(bob)
    for _ in range(3):
        found = bob.search("#inc")
        assert len(found) == 1
        del found
    assert stored_plans(bob) == 1
    del kept


def test_a_refused_plan_is_not_found_and_a_forged_plan_is_refused_on_get(make_worker) -> None:
    bob = make_worker("bob")
    forged = PlanCode("evil", n_args=1, n_inputs=1, n_state=0, n_registers=2,
                      ops=[Op("os.system", [ObjRef(0)], {}, [1])], outputs=[1],
                      out_specs=[((1,), torch.float32, False)])
    bob.submit(Kind.STORE_PLAN, 77, forged.to_wire([]), ["#evil"], None)
    assert bob.search("#evil") == []  # refused on arrival: a failure, not a plan


# -- protocols ------------------------------------------------------------------------------


def test_protocol_found_by_its_tag_comes_back_and_runs(make_worker) -> None:
    james, alice, bob = make_worker("james"), make_worker("alice"), make_worker("bob")
    alice.add_worker(bob)
    bob.add_worker(alice)
    protocol = Protocol([("w1", _inc()), ("w2", _inc()), ("w1", _inc())]).tag("my_protocol")
    protocol.describe("three increments, two workers")
    protocol.send(james)
    (found,) = james.search("my_protocol")
    assert isinstance(found, PointerProtocol) and found.tags == {"my_protocol", PROTOCOL_TAG}
    assert james.search("two workers")[0].id_at_location == found.id_at_location
    back = found.get()
    assert back.roles == ["w1", "w2"] and back.tags == {"my_protocol"}
    assert back.description == "three increments, two workers"
    back.deploy(alice, bob)
    assert back.run(torch.tensor([1.0])).get().tolist() == [4.0]
    with pytest.raises(sy.PointerError, match="already retrieved"):
        found.get()


def test_protocol_runs_where_it_was_sent(make_worker) -> None:
    james = make_worker("james")
    protocol = Protocol([("w1", _inc()), ("w2", _inc())]).send(james)
    x = torch.tensor([1.0]).send(james)
    ptr = protocol.run(x)
    assert ptr.location is james and ptr.get().tolist() == [3.0]


def test_protocol_of_real_workers_deploys_where_it_says(make_worker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    alice.add_worker(bob)
    bob.add_worker(alice)
    protocol = Protocol([(bob, _inc()), (alice, _inc()), (bob, _inc())]).deploy()
    ptr = protocol.run(torch.tensor([0.0]))
    assert ptr.location is bob and ptr.get().tolist() == [3.0]


def test_protocol_checks_its_steps_and_its_deployment() -> None:
    with pytest.raises(TypeError, match="pair"):
        Protocol([_inc()])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="Plan or a PointerPlan"):
        Protocol([("w1", lambda x: x)])  # type: ignore[list-item]
    protocol = Protocol([("w1", _inc()), ("w2", _inc())])
    with pytest.raises(sy.PointerError, match="not deployed"):
        protocol.run(torch.ones(1))
    hook = sy.TorchHook(torch, federation=sy.Federation())
    with pytest.raises(ValueError, match="2 workers"):
        protocol.deploy(sy.VirtualWorker(hook, id="only"))


def test_protocol_from_a_worker_is_checked_like_a_plan() -> None:
    with pytest.raises(sy.DecodeError, match="not a fedws protocol"):
        Protocol.from_wire({"steps": []})
    with pytest.raises(sy.DecodeError, match="steps"):
        Protocol.from_wire({"fedws.protocol": 1, "steps": [["w", {}]] * (MAX_PROTOCOL_STEPS + 1)})
    evil = PlanCode("evil", n_args=1, n_inputs=1, n_state=0, n_registers=2,
                    ops=[Op("builtins.eval", [ObjRef(0)], {}, [1])], outputs=[1])
    with pytest.raises(sy.OpNotAllowedError, match="builtins.eval"):
        Protocol.from_wire({"fedws.protocol": 1, "steps": [["w1", evil.to_wire([])]]})


# -- a private node -------------------------------------------------------------------------


class _Caller:
    def __init__(self, node: Node, principal: str, session: str) -> None:
        self.node, self.caller, self.seq = node, node.caller(principal, session, "127.0.0.1:1"), 0

    def send(self, kind: Kind, *fields: Any) -> tuple[list[Any], list[Any]]:
        self.seq += 1
        frame = encode_bytes([int(kind), self.seq, *fields])
        _, values, errors = decode(b"".join(self.node.handle(frame, self.caller)))
        return [v for _, v in values], errors


def _sum_plan() -> PlanCode:
    return PlanCode("f", n_args=1, n_inputs=1, n_state=0, n_registers=2,
                    ops=[Op("Tensor.sum", [ObjRef(0)], {}, [1])], outputs=[1],
                    out_specs=[((), torch.float32, False)])


def test_private_node_keeps_plans_to_their_owner() -> None:
    node = Node("alice", policy=Policy("private"))
    victim, attacker = _Caller(node, "lab-a", "a" * 32), _Caller(node, "lab-b", "b" * 32)
    _, errors = victim.send(Kind.STORE_PLAN, 50, _sum_plan().to_wire([]), ["#model"], "lab-a's model")
    assert errors == []
    found, _ = victim.send(Kind.SEARCH, ["#model"])
    assert [d[0] for d in found[0]] == [50] and found[0][0][1] == "StoredPlan"
    # Another session neither finds nor fetches it.
    found, _ = attacker.send(Kind.SEARCH, ["#model"])
    assert found == [[]]
    _, errors = attacker.send(Kind.GET, 50, True)
    assert errors[0][1]["type"] == "PermissionDeniedError"
    # Its owner gets it back, as the plan's wire form.
    values, errors = victim.send(Kind.GET, 50, False)
    assert errors == [] and PlanCode.from_wire(values[0])[0].name == "f"


def test_private_node_keeps_a_plan_that_ran_on_its_data() -> None:
    node = Node("alice", policy=Policy("private"))
    node.serve(1000, torch.tensor([4.0, 5.0]), ["#x"], None)
    a = _Caller(node, "lab-a", "a" * 32)
    state = torch.zeros(())
    code = PlanCode("acc", n_args=1, n_inputs=1, n_state=1, n_registers=3,
                    ops=[Op("Tensor.add_", [ObjRef(1), ObjRef(0)], {}, [2])], outputs=[2],
                    out_specs=[((), torch.float32, False)])
    # Its state learns from the served data: the plan is private from then on.
    code.ops = [Op("Tensor.sum", [ObjRef(0)], {}, [2]), Op("Tensor.add_", [ObjRef(1), ObjRef(2)], {}, [2])]
    _, errors = a.send(Kind.STORE_PLAN, 50, code.to_wire([state]))
    assert errors == []
    _, errors = a.send(Kind.RUN_PLAN, 50, [ObjRef(1000)], [60])
    assert errors == []
    _, errors = a.send(Kind.GET, 50, True)
    assert errors[0][1]["type"] == "PermissionDeniedError" and "private" in errors[0][1]["message"]
    assert 50 in node.store  # refused: it stays
