"""Roles: the operator decides per principal what it may do (``[[tokens]] may = [...]``).

A principal with no ``may`` may do everything a private node allows; one with a list is
refused the rest, each refusal naming the permission it lacks. Its own objects stay its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_policy import X_ID, Client, private_node

from fedws.node.policy import PERMISSIONS, DPRule, Policy
from fedws.node_config import load_config
from fedws.node_process import roles
from fedws.protocol.codec import ObjRef
from fedws.protocol.messages import Kind
from fedws.protocol.plan import Op, PlanCode


def _plan() -> PlanCode:
    return PlanCode(name="double", n_args=1, n_inputs=1, n_state=0, n_registers=2,
                    ops=[Op("torch.add", [ObjRef(0), ObjRef(0)], {}, [1])], outputs=[1],
                    out_specs=[((2,), torch.float32, False)])


def test_a_principal_is_refused_what_it_was_not_granted() -> None:
    dp = DPRule(max_norm=1.0, noise_multiplier=1.0, epsilon=10.0, delta=1e-5)
    node = private_node(Policy("private", dp=dp, roles={"viewer": frozenset(), "analyst": frozenset({"compute"})}))
    viewer = Client(node, "viewer", "v" * 32)
    analyst = Client(node, "analyst", "a" * 32)
    full = Client(node, "lab", "l" * 32)  # no role: everything
    # compute on served data
    assert "compute" in viewer.denied(Kind.CMD, "torch.mul", [ObjRef(X_ID), 2.0], {}, [10])
    analyst.cmd("torch.mul", [ObjRef(X_ID), 2.0], [11])
    full.cmd("torch.mul", [ObjRef(X_ID), 2.0], [12])
    # its own objects are its own, whatever its role
    viewer.store(20, torch.ones(2))
    viewer.cmd("torch.add", [ObjRef(20), 1.0], [21])
    assert viewer.get(21).tolist() == [2.0, 2.0]
    # plans
    wire = _plan().to_wire([])
    assert "plans" in analyst.denied(Kind.STORE_PLAN, 30, wire)
    full.ok(Kind.STORE_PLAN, 31, wire)
    # DP releases
    assert "dp" in analyst.denied(Kind.GET, 11, False, "dp")
    assert full.ok(Kind.GET, 12, False, "dp").shape == (2, 2)
    # node-to-node links
    assert "peers" in analyst.denied(Kind.ADD_PEER, "bob", None)


def test_roles_come_from_the_config(tmp_path: Path) -> None:
    cfg = tmp_path / "n.toml"
    cfg.write_text(
        'id = "n"\n'
        '[[tokens]]\nprincipal = "lab-a"\nsha256 = "' + "a" * 64 + '"\nmay = ["compute", "plans"]\n'
        '[[tokens]]\nprincipal = "lab-b"\nsha256 = "' + "b" * 64 + '"\n'
    )
    assert roles(load_config(cfg)) == {"lab-a": frozenset({"compute", "plans"})}
    cfg.write_text('id = "n"\n[[tokens]]\nprincipal = "x"\nsha256 = "' + "c" * 64 + '"\nmay = ["root"]\n')
    with pytest.raises(ValueError, match="may lists permissions"):
        load_config(cfg)
    with pytest.raises(ValueError, match="unknown permissions"):
        Policy("private", roles={"x": frozenset({"root"})})
    assert {"compute", "plans", "dp", "peers", "status", "smpc", "secagg"} == PERMISSIONS
