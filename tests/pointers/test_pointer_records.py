"""The pointer package's records and seams: typed specs, signatures, the meta cache,
a PointerPlan that holds a PlanSignature (not the Plan), and the parameter conversions."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import fedws as sy
from fedws.plans import PlanSignature, func2plan
from fedws.pointers import (
    NONE,
    UNKNOWN,
    SeqSpec,
    Signature,
    TensorSpec,
    parameter_to_pointer,
    pointer_to_parameter,
)
from fedws.pointers.commands import ArgScan, infer_spec
from fedws.pointers.meta import SPECS, result_count, spec_of


@pytest.fixture
def bob(hook: sy.TorchHook) -> sy.Worker:
    return sy.VirtualWorker(hook, id="rec_bob")


def test_specs_are_typed_records() -> None:
    x = torch.empty(2, 3, device="meta")
    assert spec_of(x) == TensorSpec((2, 3), torch.float32)
    assert spec_of(None) is NONE and spec_of("no tensor") is UNKNOWN
    seq = spec_of(torch.max(x, 1))
    assert isinstance(seq, SeqSpec) and seq.items == (TensorSpec((2,), torch.float32), TensorSpec((2,), torch.int64))
    assert [result_count(s) for s in (seq, NONE, UNKNOWN, TensorSpec((), torch.int8))] == [2, 0, 1, 1]
    with pytest.raises(AttributeError):
        TensorSpec((1,), torch.float32).shape = (2,)  # type: ignore[misc]


def test_pointer_signature_and_named_tuple_results(bob: sy.Worker) -> None:
    x = torch.tensor([[1.0, 5.0], [7.0, 2.0]], requires_grad=True).send(bob)
    assert x.signature == Signature((2, 2), torch.float32, True)
    values, indices = out = torch.max(x, 1)
    assert type(out).__name__ == "max" and values.signature == Signature((2,), torch.float32, True)
    assert indices.signature == Signature((2,), torch.int64, False)  # ints never require grad
    assert values.get().tolist() == [5.0, 7.0]


def test_cache_key_tells_container_shapes_apart(bob: sy.Worker) -> None:
    a, b = torch.ones(2).send(bob), torch.ones(2).send(bob)
    SPECS.clear()
    together, apart = ArgScan(), ArgScan()
    args_together, args_apart = ([a, b],), ([a], [b])
    for scan, args in ((together, args_together), (apart, args_apart)):
        for arg in args:
            scan.wire(arg)
    assert together.key != apart.key
    assert infer_spec(torch.cat, args_together, {}, together) == TensorSpec((4,), torch.float32)
    assert len(SPECS) == 1


def test_a_pointer_plan_keeps_only_the_signature(bob: sy.Worker) -> None:
    @func2plan(args_shape=[(2,)])
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    sent = double.send(bob)
    assert isinstance(sent.signature, PlanSignature) and not hasattr(sent, "plan")
    assert (sent.signature.name, sent.signature.n_args, sent.signature.single) == ("double", 1, True)
    plan_ref = weakref.ref(double)
    del double
    gc.collect()
    assert plan_ref() is None  # the pointer plan does not keep the Plan (or its state) alive
    assert sent(torch.tensor([1.0, 2.0]).send(bob)).get().tolist() == [2.0, 4.0]


def test_parameter_round_trip_keeps_the_object(bob: sy.Worker) -> None:
    param = nn.Parameter(torch.tensor([1.0, 2.0]))
    same = param
    ptr = parameter_to_pointer(param, bob)
    assert ptr is same and isinstance(ptr, sy.PointerParameter)
    value = ptr.get()
    back = pointer_to_parameter(ptr, value)
    assert back is same and type(back) is nn.Parameter and back.tolist() == [1.0, 2.0]
    assert not hasattr(back, "location")
