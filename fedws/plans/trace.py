"""Tracing: run a function once on real (or mock) tensors and record its torch calls.

A :class:`torch.overrides.TorchFunctionMode` sees every torch function, Tensor method,
operator, property read (``.grad``), property write (``.grad = None``) and ``backward``.
Each call whose result is a tensor (or that works by side effect) becomes an :class:`Op`
naming the allowlisted callable, with tensors replaced by register references. Calls that
only read metadata (``dtype``, ``requires_grad``, a comparison turned into ``bool``) run
and are not recorded: their value is fixed at trace time, like the path through ``if``
and ``for``. ``.shape`` and ``.size()`` are the exception: sizes used as op arguments are
re-read on the worker, so a plan built with mock shapes works on batches of any size.

What the mode cannot see it must not freeze. A ``torch.jit.script`` ed function runs as its
Python original while tracing (:func:`~fedws.pointers.compat.python_originals`), so its
torch calls are recorded. Anything else that computes on traced tensors behind torch's
back (a traced or loaded TorchScript module, a C extension) is caught by a dispatch-level
watcher: an aten op outside every recorded call that reads a traced tensor means the plan
would replay a build-time value as a constant, so the build fails with a PlanError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves as torch_leaves

from ..exceptions import OpNotAllowedError, PlanError
from ..node.interpreter import flat_outputs, flat_tensors
from ..pointers.compat import install as install_torch_compat
from ..pointers.compat import python_originals
from ..protocol.codec import ObjRef
from ..protocol.ops import op_name
from ..protocol.plan import Op, PlanCode
from ..protocol.tree import tree_map

__all__ = ["trace", "TraceResult"]

_T = torch.Tensor
# Property writes, named as the ops a node runs for them.
_SETTERS: dict[Any, str] = {
    _T.grad.__set__: "fedws.set_grad",  # type: ignore[union-attr]
    _T.data.__set__: "fedws.set_data",  # type: ignore[attr-defined]
    _T.requires_grad.__set__: "Tensor.requires_grad_",  # type: ignore[attr-defined]
}
_SHAPE_GETTERS = {_T.shape.__get__}  # type: ignore[attr-defined]


class TracedInt(int):
    """A size read during tracing: used as an op argument it is re-read on the worker."""

    src: torch.Tensor
    dim: int


    def __new__(cls, value: int, src: torch.Tensor, dim: int) -> TracedInt:
        obj = super().__new__(cls, value)
        obj.src = src
        obj.dim = dim
        return obj


class TracedSize(tuple[int, ...]):
    """``x.shape`` during tracing: its items are :class:`TracedInt`."""

    src: torch.Tensor

    def __new__(cls, size: Sequence[int], src: torch.Tensor) -> TracedSize:
        obj = super().__new__(cls, size)
        obj.src = src
        return obj

    def __getitem__(self, i: Any) -> Any:
        value = super().__getitem__(i)
        if isinstance(i, int):
            return TracedInt(value, self.src, i if i >= 0 else i + len(self))
        return value

    def __iter__(self) -> Any:
        return (self[i] for i in range(len(self)))

    def numel(self) -> int:
        return torch.Size(self).numel()

    def __repr__(self) -> str:
        return repr(torch.Size(self))


class TraceResult:
    """What tracing produced: the code, the state it reads, and the real outputs."""

    def __init__(self, code: PlanCode, state: list[torch.Tensor], outputs: Any) -> None:
        self.code = code
        self.state = state
        self.outputs = outputs


class _Recorder(TorchFunctionMode):
    def __init__(self, inputs: list[torch.Tensor], state: list[torch.Tensor]) -> None:
        super().__init__()
        self.slots: dict[int, int] = {}
        self.alive: list[Any] = []  # keeps traced objects alive so their ids stay unique
        self.ops: list[Op] = []
        self.n_regs = 0
        for t in inputs:
            self._new_slot(t)
        self.state = list(state)
        for t in state:
            self._new_slot(t)
        self.captured: list[torch.Tensor] = []  # tensors met as arguments that came from outside
        self.depth = 0  # > 0 while a recorded call runs: the aten ops below it are its own
        self.opaque: str | None = None  # the first op on traced tensors the recorder could not see

    def note_opaque(self, op: Any, args: Any, kwargs: Any) -> None:
        """Remember ``op`` if it reads a traced tensor from outside every recorded call."""
        if self.opaque is None and any(
            isinstance(t, torch.Tensor) and id(t) in self.slots for t in torch_leaves((args, kwargs))
        ):
            self.opaque = str(getattr(op, "__name__", op))

    def _new_slot(self, obj: Any) -> int:
        slot = self.n_regs
        self.n_regs += 1
        self.slots[id(obj)] = slot
        self.alive.append(obj)
        return slot

    def ref(self, obj: Any, pending: list[torch.Tensor]) -> Any:
        """``obj`` with traced tensors and sizes replaced by register refs.

        Tensors from outside the trace are collected in ``pending`` (left in place until
        the op is kept, see :meth:`commit`).
        """

        def leaf(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                slot = self.slots.get(id(x))
                if slot is None:
                    pending.append(x)
                    return x
                return ObjRef(slot)
            if isinstance(x, TracedInt):
                return self._size_ref(x.src, x.dim)
            if isinstance(x, TracedSize):
                return self._size_ref(x.src, None)
            if isinstance(x, torch.Size):  # a leaf to tree_map; its items are plain ints
                return tuple(x)
            return x

        return tree_map(leaf, obj)

    def _size_ref(self, src: torch.Tensor, dim: int | None) -> ObjRef:
        slot = self.slots.get(id(src))
        if slot is None:
            return int(src.shape[dim]) if dim is not None else tuple(src.shape)  # type: ignore[return-value]
        result = self.n_regs
        self.n_regs += 1
        self.ops.append(
            Op("Tensor.size", [ObjRef(slot)] if dim is None else [ObjRef(slot), dim], {}, [result], True)
        )
        return ObjRef(result)

    def commit(self, obj: Any) -> Any:
        """Turn tensors from outside (closures, module buffers) into plan state refs."""

        def leaf(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                slot = self.slots.get(id(x))
                if slot is None:
                    self.captured.append(x)
                    slot = self._new_slot(x)
                return ObjRef(slot)
            return x

        return tree_map(leaf, obj)

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        self.depth += 1
        try:
            return self._record(func, args, kwargs)
        finally:
            self.depth -= 1

    def _record(self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        if isinstance(func, torch._ops.OpOverload):  # an aten op a TorchScript interpreter runs
            self.note_opaque(func, args, kwargs)
            return func(*args, **kwargs)
        if func in _SHAPE_GETTERS or (func is _T.size and not kwargs):
            out = func(*args, **kwargs)
            src = args[0]
            if id(src) in self.slots:
                if isinstance(out, int):
                    dim = args[1] if len(args) > 1 else 0
                    return TracedInt(out, src, dim if dim >= 0 else dim + src.dim())
                return TracedSize(out, src)
            return out
        name = _SETTERS.get(func) or op_name(func)
        grad = torch.is_grad_enabled()
        pending: list[torch.Tensor] = []
        wire_args = [self.ref(a, pending) for a in args]
        wire_kwargs = {k: self.ref(v, pending) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        values = flat_outputs(out)
        has_tensor = any(isinstance(v, torch.Tensor) for v in values)
        if name is None:
            if has_tensor:
                what = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
                raise OpNotAllowedError(
                    f"{what} is not an allowed op, so it cannot be part of a plan", op=str(what)
                )
            return out  # metadata: its value is fixed at trace time
        if not has_tensor and out is not None:
            return out  # x.dim(), x.numel(), ...: fixed at trace time
        if pending:
            wire_args = self.commit(wire_args)
            wire_kwargs = self.commit(wire_kwargs)
        results = []
        if has_tensor:
            for v in values:
                slot = self.slots.get(id(v))
                results.append(self._new_slot(v) if slot is None else slot)
        self.ops.append(Op(name, wire_args, wire_kwargs, results, grad))
        return out


class _Unseen(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Watches the aten ops no recorded call accounts for (see the module docstring).

    The recorder remembers the first such op that read a traced tensor; :func:`trace` refuses the
    plan after the function returned (raising inside a TorchScript interpreter would reach
    the user as a RuntimeError of its own).
    """

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.recorder = recorder

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """False: torch would otherwise wrap ``__torch_dispatch__`` in ``torch._disable_dynamo``,
        whose first call imports ``torch._dynamo`` (and sympy): 1-4 s of a first round, for a
        mode that never runs under ``torch.compile``."""
        return False

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.recorder.depth == 0:
            self.recorder.note_opaque(func, args, kwargs)
        return func(*args, **kwargs)


def _snapshot(tensors: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, Any, bool]]:
    with torch.no_grad():
        return [
            (t, t.detach().clone(), None if t.grad is None else t.grad.detach().clone(), t.requires_grad)
            for t in tensors
            if t.is_leaf
        ]


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor, Any, bool]]) -> None:
    with torch.no_grad():
        for t, data, grad, rg in saved:
            if t.shape == data.shape:
                t.copy_(data)
            else:
                t.data = data
            t.grad = grad
            if t.requires_grad != rg:
                t.requires_grad_(rg)


def _opaque_call(name: str, op: str) -> PlanError:
    return PlanError(
        f"plan {name!r} computes on its inputs or state with a call the tracer cannot see "
        f"into (aten op {op} ran outside any torch call it recorded): a TorchScript module or "
        "function without Python source, or a C extension. Replaying its build-time result as a "
        "constant would be wrong for new inputs, so the plan is not built; call the Python code "
        "(the nn.Module, or a torch.jit.script function) instead",
        op=op,
    )


def trace(
    fn: Callable[..., Any],
    args: Sequence[Any],
    state: Sequence[torch.Tensor],
    *,
    name: str,
    extra_args: Sequence[Any] = (),
) -> TraceResult:
    """Run ``fn(*args, *extra_args)`` once and record it as plan code.

    ``state`` tensors become the plan's state registers; tensors ``fn`` reads from elsewhere
    (a closure, a module buffer) are captured as extra state. Tracing leaves the inputs and
    state as they were, even if ``fn`` updates them in place.

    Raises:
        OpNotAllowedError: ``fn`` uses a torch callable outside the allowlist.
        PlanError: ``fn`` computes on traced tensors where the tracer cannot see (an
            opaque call), so the plan would replay a build-time value.
        TypeError: ``fn`` returns something other than tensors.
    """
    install_torch_compat()
    inputs = flat_tensors(list(args))
    saved = _snapshot([*inputs, *state])
    recorder = _Recorder(inputs, list(state))
    try:
        with recorder, _Unseen(recorder), python_originals():
            try:
                out = fn(*args, *extra_args)
            except RuntimeError as exc:  # the opaque call itself may fail after it was noted
                if recorder.opaque is None:
                    raise
                raise _opaque_call(name, recorder.opaque) from exc
        if recorder.opaque is not None:
            raise _opaque_call(name, recorder.opaque)
        outs = [out] if isinstance(out, torch.Tensor) else out
        if not isinstance(outs, (tuple, list)) or not all(isinstance(o, torch.Tensor) for o in outs):
            raise TypeError(f"plan {name!r} must return a tensor or a tuple of tensors, got {type(out).__name__}")
        pending: list[torch.Tensor] = []
        refs = [recorder.ref(o, pending) for o in outs]
        if pending:
            refs = recorder.commit(refs)
        outputs = [r.id for r in refs]
        specs = [(tuple(o.shape), o.dtype, bool(o.requires_grad)) for o in outs]
    finally:
        captured = recorder.captured
        _restore(saved)
    all_state = [*state, *captured]
    code = PlanCode(
        name=name,
        n_args=len(args),
        n_inputs=len(inputs),
        n_state=len(all_state),
        n_registers=recorder.n_regs,
        ops=recorder.ops,
        outputs=outputs,
        single=isinstance(out, torch.Tensor),
        out_specs=specs,
        n_user_state=len(state),
    )
    _renumber_captured(code, len(inputs), len(state), recorder)
    return TraceResult(code, all_state, out)


def _renumber_captured(code: PlanCode, n_inputs: int, n_state: int, recorder: _Recorder) -> None:
    """Move captured tensors' registers right after the user state (their place at run time)."""
    first = n_inputs + n_state
    captured_slots = [recorder.slots[id(t)] for t in recorder.captured]
    others = [r for r in range(first, recorder.n_regs) if r not in set(captured_slots)]
    mapping = {old: first + i for i, old in enumerate(captured_slots)}
    base = first + len(captured_slots)
    mapping.update({old: base + i for i, old in enumerate(others)})

    def remap(leaf: Any) -> Any:
        return ObjRef(mapping.get(leaf.id, leaf.id)) if type(leaf) is ObjRef else leaf

    for op in code.ops:
        op.args = tree_map(remap, op.args)
        op.kwargs = tree_map(remap, op.kwargs)
        op.results = [mapping.get(r, r) for r in op.results]
    code.outputs = [mapping.get(r, r) for r in code.outputs]
