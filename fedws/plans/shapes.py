"""A plan's output specs for new input shapes, worked out from its code by rule.

A plan is traced on a small example (FedAvg's training step on a batch of 2) and then
called with other shapes (the node's whole shard, a batch of 32). Its result pointers need
their shapes before the call is sent. Running the whole plan on meta tensors answers that,
but its Python meta kernels import ``torch._dynamo`` and sympy on first use: most of a
first FedAvg round. Here each op's result is derived from its arguments' specs by
:mod:`fedws.protocol.shape_rules` instead, with ``requires_grad`` propagated as autograd
does; ``x.size(0)`` is the concrete size of the new input.

An op without a rule (or one a rule is unsure of) makes :func:`infer_outputs` return None
and the caller falls back to meta tensors. So does a plan whose rules do not reproduce
what the trace itself saw on the example: :func:`infer_outputs` is first checked against
the traced specs (see :meth:`PlanSignature.output_specs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..protocol.codec import ObjRef
from ..protocol.ops import is_inplace
from ..protocol.plan import PlanCode
from ..protocol.shape_rules import TensorSpec, infer_by_rule
from ..protocol.tree import tree_leaves, tree_map

__all__ = ["infer_outputs", "AbstractTensor"]

Sig = tuple[tuple[int, ...], torch.dtype, bool]

# Ops whose result never requires grad.
_NO_GRAD = frozenset({"Tensor.detach", "torch.detach", "Tensor.grad"})
# Ops with no result that change nothing a spec holds (shapes are kept by set_grad/backward).
_NO_RESULT = frozenset({"Tensor.backward", "fedws.set_grad"})
_SAME_SHAPE_INPLACE = frozenset(
    {"add_", "sub_", "mul_", "div_", "copy_", "zero_", "fill_", "clamp_", "relu_", "neg_", "abs_", "__iadd__",
     "__isub__", "__imul__", "__itruediv__", "addcmul_", "addcdiv_", "lerp_", "sqrt_", "exp_"}
)


class AbstractTensor:
    """A register's tensor as the rules see it: its spec, and whether it requires grad."""

    __slots__ = ("spec", "rg")

    def __init__(self, spec: TensorSpec, rg: bool) -> None:
        self.spec = spec
        self.rg = rg


class _Unsure(Exception):
    """Some op has no rule: the caller runs the plan on meta tensors instead."""


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _spec(x: Any) -> Any:
    return x.spec if isinstance(x, AbstractTensor) else x


def infer_outputs(code: PlanCode, inputs: Sequence[Sig], state: Sequence[Sig]) -> list[Sig] | None:
    """``(shape, dtype, requires_grad)`` of each output of ``code`` run on these specs, or None.

    None means unsure (an op without a rule, a non-tensor output): fall back to meta tensors.
    """
    try:
        return _run(code, inputs, state)
    except _Unsure:
        return None
    except Exception:  # a malformed plan or a rule's blind spot: never guess
        return None


def _run(code: PlanCode, inputs: Sequence[Sig], state: Sequence[Sig]) -> list[Sig]:
    regs: list[Any] = [AbstractTensor(TensorSpec(s, d), rg) for s, d, rg in (*inputs, *state)]
    regs.extend([None] * (code.n_registers - len(regs)))

    def load(obj: Any) -> Any:
        return tree_map(lambda x: regs[x.id] if type(x) is ObjRef else x, obj)

    for op in code.ops:
        args = load(op.args)
        kwargs = load(op.kwargs) if op.kwargs else {}
        name = op.name
        tail = name.rpartition(".")[2]
        first = args[0] if args else None
        if name in _NO_RESULT:
            if op.results or not isinstance(first, AbstractTensor):
                raise _Unsure(name)
            continue
        if name == "Tensor.size":
            if not isinstance(first, AbstractTensor) or len(op.results) != 1 or kwargs:
                raise _Unsure(name)
            shape = first.spec.shape
            regs[op.results[0]] = shape[args[1]] if len(args) > 1 else torch.Size(shape)
            continue
        if name == "Tensor.grad":
            if not isinstance(first, AbstractTensor) or len(op.results) != 1 or not first.rg:
                raise _Unsure(name)
            regs[op.results[0]] = AbstractTensor(first.spec, False)
            continue
        leaves = [x for x in tree_leaves((args, kwargs)) if isinstance(x, AbstractTensor)]
        any_rg = op.grad and any(x.rg for x in leaves)
        if is_inplace(name):
            if tail not in _SAME_SHAPE_INPLACE or not isinstance(first, AbstractTensor) or op.results != [op.args[0].id]:
                raise _Unsure(name)
            # in place: the target keeps its shape; it requires grad once a grad-tracked value flows in
            regs[op.results[0]] = AbstractTensor(first.spec, first.rg or any_rg)
            continue
        spec = infer_by_rule(name, tree_map(_spec, args), tree_map(_spec, kwargs))
        if not isinstance(spec, TensorSpec) or len(op.results) != 1:
            raise _Unsure(name)
        rg = any_rg and _is_float(spec.dtype) and name not in _NO_GRAD
        regs[op.results[0]] = AbstractTensor(spec, rg)
    outs = []
    for o in code.outputs:
        v = regs[o]
        if not isinstance(v, AbstractTensor):
            raise _Unsure("output")
        outs.append((v.spec.shape, v.spec.dtype, v.rg))
    return outs
