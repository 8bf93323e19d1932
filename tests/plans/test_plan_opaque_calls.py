"""A plan never replays a build-time value it should have computed: TorchScript functions
are traced through their Python original; calls the tracer cannot see into (a script or
loaded module, a C extension) are refused at build time with a PlanError."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import fedws as sy


@torch.jit.script
def _affine(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def test_scripted_function_is_traced_through(make_worker) -> None:
    bob = make_worker("bob")

    @sy.func2plan(args_shape=[(3,)])
    def plan(x):
        return _affine(x).relu()

    assert "mul" in plan.code and "relu" in plan.code
    x = torch.tensor([3.0, -4.0, 0.5])
    torch.testing.assert_close(plan(x), (x * 2 + 1).relu())  # not the mock input's output
    out = plan.send(bob)(x.send(bob)).get()
    torch.testing.assert_close(out, (x * 2 + 1).relu())


def test_jit_traced_function_is_traced_through() -> None:
    traced = torch.jit.trace(lambda t: t * 3, torch.ones(3))

    @sy.func2plan(args_shape=[(3,)])
    def plan(x):
        return traced(x) + 1

    torch.testing.assert_close(plan(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([4.0, 7.0, 10.0]))


def test_script_module_is_refused_at_build_time() -> None:
    scripted = torch.jit.script(nn.Linear(3, 1))
    with pytest.raises(sy.PlanError, match="cannot see into"):

        @sy.func2plan(args_shape=[(3,)])
        def plan(x):
            return scripted(x)


def test_loaded_torchscript_is_refused_at_build_time() -> None:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(3, 2), nn.ReLU())), buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with pytest.raises(sy.PlanError, match="constant"):

        @sy.func2plan(args_shape=[(3,)])
        def plan(x):
            return loaded(x) * 2


def test_script_function_without_source_is_refused_at_build_time() -> None:
    @torch.jit.script
    def plus_one(t: torch.Tensor) -> torch.Tensor:
        return t + 1

    del plus_one._torchdynamo_inline  # as from torch.jit.load: no Python source
    with pytest.raises(sy.PlanError, match="cannot see into"):

        @sy.func2plan(args_shape=[(3,)])
        def plan(x):
            return plus_one(x)


def test_constants_that_do_not_depend_on_inputs_are_still_fine() -> None:
    offset = torch.tensor([1.0, 2.0, 3.0])

    @sy.func2plan(args_shape=[(3,)])
    def plan(x):
        return x + offset + torch.ones(3)

    torch.testing.assert_close(plan(torch.zeros(3)), torch.tensor([2.0, 3.0, 4.0]))
    torch.testing.assert_close(plan(torch.ones(3)), torch.tensor([3.0, 4.0, 5.0]))
