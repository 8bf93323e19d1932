"""PlanCode: the recorded ops of a plan, as data — never as Python code.

Values live in numbered *registers*: first the plan's input tensors (its arguments,
flattened), then its state tensors, then one register per op result. An op names an
allowlisted callable and refers to registers with :class:`~fedws.protocol.codec.ObjRef`
(inside a plan an ObjRef's id is a register number, not a store id); everything else in
its arguments is a literal. The wire form is a plain msgpack-able dict, and
:meth:`PlanCode.from_wire` checks every field of one that arrives before it is kept.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ..exceptions import DecodeError, OpNotAllowedError
from .codec import DTYPE_NAMES, DTYPES, ObjRef, encode
from .ops import FEDWS_OPS, OPS
from .tree import tree_leaves

__all__ = ["Op", "PlanCode", "OutSpec", "MAX_REGISTERS", "MAX_OPS", "MAX_STATE"]

WIRE_VERSION = 1
# Caps on a plan from the wire, checked before anything is sized by them: a node allocates
# one slot per register when it runs a plan (a 54-byte plan declaring 10^9 registers got the
# node OOM-killed). Traced plans of real models have hundreds to a few thousand of each.
MAX_REGISTERS = 1 << 20
MAX_OPS = 1 << 18
MAX_STATE = 1 << 16

# (shape, dtype, requires_grad) of one output, as seen when the plan was traced.
OutSpec = tuple[tuple[int, ...], torch.dtype, bool]


@dataclass(slots=True)
class Op:
    """One recorded call: ``results = name(*args, **kwargs)`` with grad mode ``grad``."""

    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    results: list[int]
    grad: bool = True


@dataclass(slots=True)
class PlanCode:
    """Everything a node needs to run a plan, except the state tensors' values."""

    name: str
    n_args: int  # arguments the caller passes
    n_inputs: int  # tensors among them (registers 0..n_inputs-1)
    n_state: int  # registers n_inputs..n_inputs+n_state-1
    n_registers: int
    ops: list[Op] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    single: bool = True  # the function returned one tensor, not a tuple
    out_specs: list[OutSpec] = field(default_factory=list)
    n_user_state: int = 0  # state given by the user; the rest was captured while tracing

    # -- wire -----------------------------------------------------------------------------

    def to_wire(self, state: list[torch.Tensor]) -> dict[str, Any]:
        """The msgpack-able form, with ``state`` (current values) travelling inside."""
        return {
            "v": WIRE_VERSION,
            "name": self.name,
            "n_args": self.n_args,
            "n_inputs": self.n_inputs,
            "n_registers": self.n_registers,
            "state": list(state),
            "ops": [[op.name, op.args, op.kwargs, op.results, op.grad] for op in self.ops],
            "outputs": self.outputs,
            "single": self.single,
            "out_specs": [[list(s), DTYPE_NAMES[d], rg] for s, d, rg in self.out_specs],
        }

    def digest(self, state: list[torch.Tensor]) -> str:
        """Hex sha256 of the plan with ``state``: what a node operator approves.

        Taken over the msgpack encoding of :meth:`to_wire` (code and state tensors), the
        same bytes a coordinator sends, so both sides compute the same digest.
        """
        h = hashlib.sha256()
        for chunk in encode(self.to_wire(list(state))):
            h.update(chunk)
        return h.hexdigest()

    @classmethod
    def from_wire(cls, d: Any, *, worker: str | None = None) -> tuple[PlanCode, list[torch.Tensor]]:
        """Check a plan that arrived and return it with its state.

        Raises:
            OpNotAllowedError: an op is not in the allowlist (the message names it).
            DecodeError: the plan is malformed (wrong types, registers out of range).
        """
        try:
            if not isinstance(d, dict) or d.get("v") != WIRE_VERSION:
                raise DecodeError("not a fedws plan (or a version this node does not know)")
            name, n_args, n_inputs, n_regs = d["name"], d["n_args"], d["n_inputs"], d["n_registers"]
            state = d["state"]
            if not (isinstance(name, str) and _ints(n_args, n_inputs, n_regs) and isinstance(state, list)):
                raise DecodeError("plan header has the wrong types")
            if not 0 <= n_regs <= MAX_REGISTERS:
                raise DecodeError(f"plan declares {n_regs} registers, at most {MAX_REGISTERS}")
            if len(state) > MAX_STATE or not isinstance(d["ops"], list) or len(d["ops"]) > MAX_OPS:
                raise DecodeError(f"plan has too many ops or state tensors (at most {MAX_OPS} and {MAX_STATE})")
            if not all(isinstance(t, torch.Tensor) for t in state):
                raise DecodeError("plan state must hold tensors only")
            if n_inputs + len(state) > n_regs:
                raise DecodeError("plan has fewer registers than inputs and state")
            ops = []
            for i, raw in enumerate(d["ops"]):
                op_name, args, kwargs, results, grad = raw
                if not isinstance(op_name, str):
                    raise DecodeError(f"plan step {i}: op name must be a string")
                if op_name not in OPS and op_name not in FEDWS_OPS:
                    raise OpNotAllowedError(
                        f"plan {name!r} step {i} uses op {op_name!r}, which is not allowed"
                        + (f" on worker {worker!r}" if worker else ""),
                        worker=worker,
                        op=op_name,
                    )
                if not isinstance(args, list) or not isinstance(kwargs, dict) or not isinstance(grad, bool):
                    raise DecodeError(f"plan step {i} ({op_name}) is malformed")
                if not (isinstance(results, list) and _ints(*results)):
                    raise DecodeError(f"plan step {i} ({op_name}): results must be registers")
                for r in (*results, *_refs_in(args), *_refs_in(kwargs)):
                    if not 0 <= r < n_regs:
                        raise DecodeError(f"plan step {i} ({op_name}) names register {r} of {n_regs}")
                ops.append(Op(op_name, args, kwargs, results, grad))
            outputs = d["outputs"]
            if not (isinstance(outputs, list) and _ints(*outputs) and all(0 <= o < n_regs for o in outputs)):
                raise DecodeError("plan outputs must be registers")
            specs = [(tuple(int(x) for x in s), DTYPES[dt], bool(rg)) for s, dt, rg in d["out_specs"]]
            code = cls(
                name=name,
                n_args=n_args,
                n_inputs=n_inputs,
                n_state=len(state),
                n_registers=n_regs,
                ops=ops,
                outputs=outputs,
                single=bool(d["single"]),
                out_specs=specs,
                n_user_state=len(state),
            )
        except (OpNotAllowedError, DecodeError):
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise DecodeError(f"malformed plan: {type(exc).__name__}: {exc}") from exc
        return code, list(state)

    # -- display --------------------------------------------------------------------------

    def register_name(self, r: int) -> str:
        if r < self.n_inputs:
            return f"arg_{r + 1}"
        if r < self.n_inputs + self.n_state:
            k = r - self.n_inputs
            return f"state_{k + 1}" if k < self.n_user_state else f"const_{k - self.n_user_state + 1}"
        return f"_{r}"

    def pretty(self) -> str:
        """The recorded ops as Python-looking text, for people (never executed)."""
        args = ", ".join(self.register_name(i) for i in range(self.n_inputs))
        lines = [f"def {self.name}({args}):"]
        for op in self.ops:
            lines.append("    " + self._line(op))
        outs = ", ".join(self.register_name(o) for o in self.outputs)
        lines.append(f"    return {outs if self.single or len(self.outputs) != 1 else outs + ','}")
        return "\n".join(lines)

    def _line(self, op: Op) -> str:
        fmt = self._fmt
        args = [fmt(a) for a in op.args] + [f"{k}={fmt(v)}" for k, v in op.kwargs.items()]
        lhs = ", ".join(self.register_name(r) for r in op.results)
        if op.name == "fedws.set_grad":
            return f"{args[0]}.grad = {args[1]}"
        if op.name == "fedws.set_data":
            return f"{args[0]}.data = {args[1]}"
        if op.name.startswith("Tensor."):
            method = op.name[len("Tensor."):]
            if method in ("grad", "data", "T", "mT", "H", "mH", "real", "imag"):
                call = f"{args[0]}.{method}"
            else:
                call = f"{args[0]}.{method}({', '.join(args[1:])})"
        else:
            short = op.name.replace("torch.nn.functional.", "F.")
            call = f"{short}({', '.join(args)})"
        return f"{lhs} = {call}" if lhs else call

    def _fmt(self, v: Any) -> str:
        if isinstance(v, ObjRef):
            return self.register_name(v.id)
        if isinstance(v, list):
            return "[" + ", ".join(self._fmt(x) for x in v) + "]"
        if isinstance(v, tuple):
            return "(" + ", ".join(self._fmt(x) for x in v) + ("," if len(v) == 1 else "") + ")"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k!r}: {self._fmt(x)}" for k, x in v.items()) + "}"
        if isinstance(v, torch.Tensor):
            return f"tensor{tuple(v.shape)}"
        return repr(v)


def _ints(*values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _refs_in(obj: Any) -> list[int]:
    """The registers ``obj`` refers to, wherever the interpreter would load them from."""
    return [v.id for v in tree_leaves(obj) if type(v) is ObjRef]
