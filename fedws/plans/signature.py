"""PlanSignature: what calling a built plan needs to know, without the plan itself.

A :class:`~fedws.plans.pointer_plan.PointerPlan` checks its arguments and works out its
result pointers' shapes before sending anything. That needs the plan's arity and code and
its state tensors' shapes and dtypes — not the :class:`~fedws.plans.plan.Plan` (an
``nn.Module`` with the state's memory). So a pointer plan holds this small record, and
``plan.py`` and ``pointer_plan.py`` no longer import each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import torch

from ..node.interpreter import execute, flat_tensors
from ..pointers import PointerTensor
from ..protocol.plan import PlanCode
from .shapes import infer_outputs

__all__ = ["PlanSignature", "TensorSig", "input_sigs"]

TensorSig: TypeAlias = tuple[tuple[int, ...] | None, torch.dtype, bool]
"""(shape, dtype, requires_grad) of a plan input or output; shape None when not known."""


def input_sigs(args: Sequence[Any]) -> tuple[TensorSig, ...]:
    """The signature of each tensor in ``args``, in the order the node lays plan inputs out.

    Uses the node's :func:`~fedws.node.interpreter.flat_tensors`, not the generic tree
    walker: the coordinator must count inputs exactly as the node does.
    """
    out: list[TensorSig] = []
    for t in flat_tensors(list(args)):
        if isinstance(t, PointerTensor):
            sig = t.signature
            out.append((None, t.dtype, False) if sig is None else (tuple(sig.shape), sig.dtype, bool(sig.requires_grad)))
        else:
            out.append((tuple(t.shape), t.dtype, bool(t.requires_grad)))
    return tuple(out)


def _meta(shape: tuple[int, ...], dtype: torch.dtype, rg: bool) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.requires_grad_(rg) if rg and (dtype.is_floating_point or dtype.is_complex) else t


class PlanSignature:
    """A built plan's arity, code and state specs; answers "what will a call return?".

    Args:
        code: the traced code.
        state: the plan's state tensors (only their shapes, dtypes and flags are kept).
        traced_inputs: the input signatures the plan was traced with.

    Attributes:
        code: the traced code (the node runs the same).
        state_specs: (shape, dtype, requires_grad) of each state tensor.
        traced_inputs: inputs shaped like these reuse the traced output shapes.
    """

    __slots__ = ("code", "state_specs", "traced_inputs", "_cache", "_rules_agree")

    _CACHE_MAX = 256

    def __init__(self, code: PlanCode, state: Sequence[torch.Tensor], traced_inputs: tuple[TensorSig, ...]) -> None:
        self.code = code
        self.state_specs: tuple[tuple[tuple[int, ...], torch.dtype, bool], ...] = tuple(
            (tuple(t.shape), t.dtype, bool(t.requires_grad)) for t in state
        )
        self.traced_inputs = traced_inputs
        self._cache: dict[tuple[TensorSig, ...], list[TensorSig]] = {}
        self._rules_agree: bool | None = None

    @property
    def name(self) -> str:
        """The plan's name."""
        return self.code.name

    @property
    def n_args(self) -> int:
        """How many arguments a call takes."""
        return self.code.n_args

    @property
    def n_inputs(self) -> int:
        """How many tensors those arguments hold."""
        return self.code.n_inputs

    @property
    def single(self) -> bool:
        """The plan returns one tensor (not a tuple)."""
        return self.code.single

    def check_args(self, args: Sequence[Any]) -> None:
        """Raise TypeError unless ``args`` fit the plan."""
        code = self.code
        if len(args) != code.n_args:
            raise TypeError(
                f"plan {code.name!r} takes {code.n_args} argument{'s' if code.n_args != 1 else ''}, "
                f"got {len(args)}"
            )
        n = len(flat_tensors(list(args)))
        if n != code.n_inputs:
            raise TypeError(f"plan {code.name!r} takes {code.n_inputs} tensors in its arguments, got {n}")

    def output_specs(self, args: Sequence[Any]) -> list[TensorSig]:
        """Shapes and dtypes the outputs will have for ``args``, worked out locally.

        Inputs shaped as at trace time reuse the traced shapes; others run the code on meta
        tensors (no data, no node). A shape that cannot be worked out is None.
        """
        traced = self.code.out_specs
        sigs = input_sigs(args)
        if sigs == self.traced_inputs:
            return [(s, d, rg) for s, d, rg in traced]
        cached = self._cache.get(sigs)
        if cached is not None:
            return cached
        unknown: list[TensorSig] = [(None, d, rg) for _, d, rg in traced]
        specs = unknown
        known = [(s, d, rg) for s, d, rg in sigs if s is not None]
        ruled = self._by_rule(known) if len(known) == len(sigs) else None
        if ruled is not None:
            specs = list(ruled)
        elif len(known) == len(sigs):
            try:
                inputs = [_meta(s, d, rg) for s, d, rg in known]
                state = [_meta(s, d, rg) for s, d, rg in self.state_specs]
                outs = execute(self.code, inputs, state)
                specs = [
                    (tuple(o.shape), o.dtype, bool(o.requires_grad)) if isinstance(o, torch.Tensor) else u
                    for o, u in zip(outs, unknown)
                ]
            except Exception:
                specs = unknown
        if len(self._cache) < self._CACHE_MAX:
            self._cache[sigs] = specs
        return specs

    def _by_rule(self, inputs: list[tuple[tuple[int, ...], torch.dtype, bool]]) -> list[TensorSig] | None:
        """The outputs for ``inputs`` derived op by op (:mod:`.shapes`), or None if unsure.

        Trusted only for a plan whose rules reproduce, on the traced inputs, exactly the
        specs the trace saw; otherwise (or for an op without a rule) the caller runs the
        code on meta tensors.
        """
        if self._rules_agree is None:
            traced = [(s, d, rg) for s, d, rg in self.traced_inputs if s is not None]
            self._rules_agree = len(traced) == len(self.traced_inputs) == self.code.n_inputs and infer_outputs(
                self.code, traced, self.state_specs
            ) == [(tuple(s), d, rg) for s, d, rg in self.code.out_specs]
        if not self._rules_agree:
            return None
        out = infer_outputs(self.code, inputs, self.state_specs)
        return None if out is None else list(out)
