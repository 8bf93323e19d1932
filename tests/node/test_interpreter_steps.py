"""A stored plan's ops are resolved once (compile_steps) and run like the tree walk did:
same results, nested arguments, refused ops failing only when reached, the guard before
every op."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedws.exceptions import MemoryBudgetError, PlanError
from fedws.node.interpreter import StoredPlan, compile_steps, execute, local_resolver
from fedws.protocol.codec import ObjRef
from fedws.protocol.plan import Op, PlanCode


def _code(ops: list[Op], outputs: list[int], n_registers: int) -> PlanCode:
    return PlanCode(name="p", n_args=1, n_inputs=1, n_state=0, n_registers=n_registers, ops=ops, outputs=outputs)


CODE = _code(
    [
        Op("torch.mul", [ObjRef(0), 2.0], {}, [1]),
        Op("torch.cat", [[ObjRef(0), ObjRef(1)]], {"dim": 0}, [2]),  # nested: the general walk
        Op("torch.add", [ObjRef(2)], {"other": ObjRef(2), "alpha": 3}, [3]),
        Op("torch.chunk", (ObjRef(3), 2), {}, [4, 5]),
    ],
    [4, 5],
    6,
)


def test_compiled_steps_give_what_the_ops_say() -> None:
    x = torch.arange(3.0)
    steps = compile_steps(CODE, local_resolver)
    for run in (execute(CODE, [x], []), execute(CODE, [x], [], steps=steps), execute(CODE, [x], [], steps=steps)):
        whole = torch.cat([x, 2 * x]) * 4
        assert torch.equal(run[0], whole[:3]) and torch.equal(run[1], whole[3:])


def test_a_stored_plan_keeps_its_steps_per_resolver() -> None:
    stored = StoredPlan(CODE, [])
    first = stored.steps(local_resolver)
    assert stored.steps(local_resolver) is first
    assert stored.steps(lambda name: local_resolver(name)) is not first


def test_a_refused_op_fails_when_reached_and_the_guard_sees_every_op() -> None:
    code = _code([Op("torch.neg", [ObjRef(0)], {}, [1]), Op("os.system", ["true"], {}, [2])], [1], 3)
    seen: list[str] = []

    def guard(op: str, fn: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(op)

    with pytest.raises(PlanError, match="step 2 of 2.*not allowed"):
        execute(code, [torch.ones(2)], [], guard=guard, steps=compile_steps(code, local_resolver))
    assert seen == ["torch.neg"]

    def refuse(op: str, fn: Any, args: Any, kwargs: dict[str, Any]) -> None:
        raise MemoryBudgetError("no room")

    with pytest.raises(MemoryBudgetError):
        execute(CODE, [torch.ones(2)], [], guard=refuse, steps=compile_steps(CODE, local_resolver))
