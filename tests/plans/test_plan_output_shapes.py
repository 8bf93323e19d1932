"""A plan's output specs for new shapes come from its code by rule, not from meta tensors,
and a first op and a first plan never import torch._dynamo (seconds of a first round)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

import fedws as sy
from fedws.fl.local_training import build_training_plan
from fedws.node.interpreter import execute
from fedws.plans.shapes import infer_outputs


def _meta(shape: tuple[int, ...], dtype: torch.dtype, rg: bool) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.requires_grad_(rg) if rg else t


def _on_meta(plan: sy.Plan, inputs: list[tuple[tuple[int, ...], torch.dtype, bool]]) -> list[tuple[object, ...]]:
    sig = plan.signature
    outs = execute(sig.code, [_meta(*s) for s in inputs], [_meta(*s) for s in sig.state_specs])
    return [(tuple(o.shape), o.dtype, bool(o.requires_grad)) for o in outs]


def test_forward_plan_specs_by_rule_match_meta() -> None:
    @sy.func2plan(args_shape=[(2, 10)])
    def mlp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(x @ torch.ones(10, 4) + 1)
        return h.sum(dim=1), h.view(-1)

    new = [((64, 10), torch.float32, True)]
    ruled = infer_outputs(mlp.signature.code, new, mlp.signature.state_specs)
    assert ruled == _on_meta(mlp, new) == [((64,), torch.float32, True), ((256,), torch.float32, True)]
    assert mlp.output_specs([torch.ones(64, 10, requires_grad=True)]) == ruled


def test_training_step_specs_for_a_bigger_shard() -> None:
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 2))
    plan = build_training_plan(
        model, nn.functional.cross_entropy, lr=0.1, momentum=0.9,
        x_like=((10,), torch.float32), y_like=((), torch.int64),
    )
    sig = plan.signature
    new = [((64, 10), torch.float32, False), ((64,), torch.int64, False), ((32,), torch.int64, False),
           *sig.traced_inputs[3:]]
    assert infer_outputs(sig.code, new, sig.state_specs) == _on_meta(plan, new) == [((), torch.float32, False)]


def test_an_op_without_a_rule_falls_back_to_meta() -> None:
    @sy.func2plan(args_shape=[(1, 1, 4, 4)])
    def pool(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.max_pool2d(x, 2) * 2

    assert infer_outputs(pool.signature.code, [((1, 1, 8, 8), torch.float32, False)], ()) is None
    assert pool.output_specs([torch.ones(1, 1, 8, 8)]) == [((1, 1, 4, 4), torch.float32, False)]


FIRST_USE = """
import sys, torch
import fedws as sy
from torch import nn
hook = sy.TorchHook(torch, federation=sy.Federation())
bob = sy.VirtualWorker(hook, id="bob")
x = torch.ones(8, 10).send(bob)
w, b = torch.ones(3, 10).send(bob), torch.ones(3).send(bob)
y = nn.functional.linear(x, w, b).relu().sum()
assert y.shape == () and y.get().item() == 8 * 3 * 11

@sy.func2plan(args_shape=[(2, 10)])
def step(x):
    return nn.functional.linear(x, torch.ones(3, 10)).mean(dim=0)

out = step.send(bob)(torch.ones(64, 10).send(bob))
assert out.shape == (3,) and out.get().tolist() == [10.0, 10.0, 10.0]

@sy.func2plan(args_shape=[(2, 10)])  # what an evaluation plan does: predict, compare, count
def score(x):
    return (nn.functional.linear(x, torch.ones(3, 10)).argmax(1) == 0).to(torch.float32).sum()

hits = score.send(bob)(torch.ones(64, 10).send(bob))
assert hits.shape == () and hits.get().item() == 64
bob.close()
print("dynamo" if "torch._dynamo" in sys.modules else "clean")
"""


def test_first_op_and_plan_do_not_import_dynamo() -> None:
    root = Path(__file__).resolve().parents[2]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FIRST_USE)], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"
