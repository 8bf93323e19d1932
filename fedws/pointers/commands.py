"""Building a command from a torch call on pointers, and the result pointers it promises.

A command names an allowlisted op, its arguments (pointers become :class:`ObjRef` s) and
the ids its results will get. The ids are drawn here, before anything is sent, so the
result pointers exist at once; the node acknowledges later. This is the per-op hot path
of the coordinator: every torch call on a pointer goes through :func:`remote_call`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..exceptions import LocationError, OpNotAllowedError, PointerError
from ..protocol.codec import ObjRef
from ..protocol.ids import new_id, planned_result_ids
from ..protocol.messages import Kind
from ..protocol.ops import is_inplace, op_name
from ..protocol.shape_rules import infer_by_rule
from ..protocol.tree import tree_leaves, tree_map
from .meta import (
    NONE,
    SPECS,
    UNKNOWN,
    ResultSpec,
    SeqSpec,
    TensorSpec,
    meta_tensor,
    result_count,
    run_on_meta,
)
from .multi import MultiPointerTensor
from .tensor import PointerTensor, make_pointer, reshape_shell, set_local_requires_grad

if TYPE_CHECKING:
    from ..client.worker import Worker

__all__ = [
    "ArgScan",
    "scan_args",
    "infer_spec",
    "take_result_ids",
    "grad_mode",
    "build_results",
    "remote_call",
    "send_command",
]


class ArgScan:
    """What scanning a call's arguments found.

    Attributes:
        location: the worker every pointer argument lives on.
        first: the first pointer met (named in error messages; its owner owns the results).
        key: the meta-cache key parts: argument signatures, plain values, container shapes.
        cacheable: False once an argument cannot be part of a cache key (unknown shape,
            an arbitrary object).
        any_grad: some pointer argument requires grad.
        local: a local tensor met among pointers (an error, reported by :meth:`check`).
    """

    __slots__ = ("location", "key", "cacheable", "first", "any_grad", "local")

    def __init__(self) -> None:
        self.location: Worker | None = None
        self.key: list[Any] = []
        self.cacheable = True
        self.first: PointerTensor | None = None
        self.any_grad = False
        self.local: torch.Tensor | None = None

    def check(self) -> None:
        """Raise LocationError if a local tensor was mixed with pointers.

        Checked after the whole call was scanned, so the message can name the pointer.
        """
        if self.local is not None:
            raise LocationError(
                f"cannot mix a local tensor with {self.first!r}, which lives on worker "
                f"{self.location.id!r}: send the tensor there first (tensor.send(worker)) "  # type: ignore[union-attr]
                f"or bring the pointer back (ptr.get()); local tensor: {self.local!r:.60}"
            )

    def wire(self, obj: Any) -> Any:
        """``obj`` for the wire: pointers become ObjRefs; records what it met.

        This is a walker of its own, not :func:`~fedws.protocol.tree.tree_map`: it walks the
        same containers (exact list/tuple/dict/set; torch.Size and named tuples are leaves),
        but it also writes each container's type and length into the meta-cache key —
        ``f([a, b])`` and ``f([a], [b])`` must not share a cache entry — which tree_map does
        not report. It is also the per-op hot path.
        """
        if isinstance(obj, PointerTensor):
            if obj.gotten:
                obj.check_live()
            loc = obj.location
            if self.location is None:
                self.location = loc
                self.first = obj
            elif loc is not self.location:
                raise LocationError(
                    f"{obj!r} is on worker {loc.id!r} but {self.first!r} is on worker "
                    f"{self.location.id!r}; move one of them first (ptr.move(worker))"
                )
            sig = obj.signature
            if sig is None:
                self.cacheable = False
            else:
                self.key.append(sig)
                if sig.requires_grad:
                    self.any_grad = True
            return ObjRef(obj.id_at_location)
        t = type(obj)
        if t is list or t is tuple:
            self.key.append((t, len(obj)))
            out = [self.wire(x) for x in obj]
            return out if t is list else tuple(out)
        if t is dict:
            self.key.append((dict, tuple(obj)))
            return {k: self.wire(v) for k, v in obj.items()}
        if t is set:  # unordered: fine on the wire, useless in a key
            self.cacheable = False
            return {self.wire(x) for x in obj}
        if isinstance(obj, torch.Tensor):
            self.local = obj  # reported once every pointer was seen, so the message names them
            return obj
        if isinstance(obj, MultiPointerTensor):
            raise LocationError("cannot mix a MultiPointerTensor into a single-worker op")
        if t in _SIMPLE:
            self.key.append((t, obj))
        elif t is slice:
            self.key.append((slice, obj.start, obj.stop, obj.step))
        elif isinstance(obj, (torch.Size, torch.device)) or obj is Ellipsis:
            self.key.append((t, obj))
        else:
            self.cacheable = False
        return obj


_SIMPLE = (int, float, bool, str, type(None), torch.dtype)


def scan_args(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[ArgScan, list[Any], dict[str, Any]]:
    """Scan a call: ``(scan, wire_args, wire_kwargs)``; checks every pointer shares a location.

    Raises:
        LocationError: pointers on different workers, or a local tensor among pointers.
        PointerError: a pointer whose value was already retrieved.
    """
    scan = ArgScan()
    wire_args = [scan.wire(a) for a in args]
    wire_kwargs = {k: scan.wire(v) for k, v in kwargs.items()} if kwargs else {}
    scan.check()
    return scan, wire_args, wire_kwargs


def _to_meta(leaf: Any) -> Any:
    if isinstance(leaf, PointerTensor):
        assert leaf.signature is not None  # callers check first
        return meta_tensor(leaf.signature)
    return leaf


def _to_spec(leaf: Any) -> Any:
    if isinstance(leaf, PointerTensor):
        sig = leaf.signature
        assert sig is not None  # callers check first
        return TensorSpec(sig.shape, sig.dtype)
    return leaf


def infer_spec(
    func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], scan: ArgScan, name: str | None = None
) -> ResultSpec:
    """What ``func(*args, **kwargs)`` will return (cached): by rule for the common ops
    (:mod:`.shape_rules`, no meta kernel, no ``torch._dynamo`` import), else on meta tensors."""
    key = None
    if scan.cacheable:
        key = (func, *scan.key)
        try:
            spec = SPECS.find(key)
        except TypeError:  # an unhashable value in the key
            spec, key = None, None
        if spec is not None:
            return spec
    elif any(isinstance(a, PointerTensor) and a.signature is None for a in tree_leaves((args, kwargs))):
        return UNKNOWN
    ruled = infer_by_rule(name, tree_map(_to_spec, list(args)), tree_map(_to_spec, kwargs)) if name else None
    spec = ruled if ruled is not None else run_on_meta(func, tree_map(_to_meta, list(args)), tree_map(_to_meta, kwargs))
    if key is not None:
        SPECS.put(key, spec)
    return spec


def take_result_ids(n: int) -> list[int]:
    """``n`` fresh result ids, or the ones planned for this call.

    A node that follows a pointer chain re-issues the call to the next node with the ids
    it already promised (:data:`~fedws.protocol.ids.planned_result_ids`), so the pointers on
    both sides name the same objects.
    """
    planned = planned_result_ids.get()
    if planned:
        ids, planned[:] = planned[:n], planned[n:]
        while len(ids) < n:
            ids.append(new_id())
        return ids
    return [new_id() for _ in range(n)]


def grad_mode() -> tuple[bool, ...]:
    """The caller's grad mode as a trailing command field, sent only when off.

    Grad mode is thread-local: the node must be told (an optimizer step runs under
    ``no_grad``), or an in-place update of a parameter that requires grad fails there.
    """
    return () if torch.is_grad_enabled() else (False,)


def build_results(spec: ResultSpec, ids: Iterator[int], location: Worker, owner: Worker, seq: int, rg: bool) -> Any:
    """The result pointers of a command with ``spec``, drawing ids from ``ids`` in order."""
    if isinstance(spec, TensorSpec):
        return make_pointer(location, next(ids), shape=spec.shape, dtype=spec.dtype, requires_grad=rg, owner=owner, seq=seq)
    if isinstance(spec, SeqSpec):
        items = [build_results(s, ids, location, owner, seq, rg) for s in spec.items]
        ctype = spec.container
        if ctype is list:
            return items
        if ctype is tuple:
            return tuple(items)
        try:
            return ctype(items)  # torch.return_types.* named tuples
        except TypeError:
            return tuple(items)
    if spec is NONE:
        return None
    return make_pointer(location, next(ids), shape=None, dtype=torch.float32, requires_grad=rg, owner=owner, seq=seq)


def send_command(target: PointerTensor, name: str, wire_args: list[Any], wire_kwargs: dict[str, Any]) -> None:
    """Send a command with no results that changes ``target`` (a setter, ``backward``)."""
    target.seq, _ = target.location.submit(Kind.CMD, name, wire_args, wire_kwargs, [], *grad_mode())


# Ops whose result never requires grad, whatever their arguments.
_NON_DIFFERENTIABLE = frozenset({"Tensor.detach", "torch.detach", "Tensor.data", "Tensor.grad"})

# In-place ops that change the shape: the local shell follows them.
_SHAPE_CHANGING = (
    "unsqueeze_", "squeeze_", "t_", "transpose_", "resize_", "resize_as_", "swapdims_",
    "swapaxes_", "as_strided_",
)


def _into_out(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], name: str) -> Any:
    """``f(..., out=ptr)`` as ``ptr.copy_(f(...))`` on the node (optimizers write ``out=``).

    Only pointers of the same call can be written to; the result must fit ``out`` exactly
    (torch would resize ``out``; a pointer's shell cannot follow a resize it did not see).
    """
    out = kwargs["out"]
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if not all(isinstance(o, PointerTensor) for o in outs):
        raise PointerError(f"{name}: out= on pointers must name pointers")
    result = remote_call(func, args, {k: v for k, v in kwargs.items() if k != "out"}, name=name)
    results = list(result) if isinstance(result, (tuple, list)) else [result]
    if len(results) != len(outs):
        raise PointerError(f"{name}: out= names {len(outs)} tensors, the op returns {len(results)}")
    for o, r in zip(outs, results):
        remote_call(torch.Tensor.copy_, (o, r), {})
    return out


def remote_call(
    func: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    name: str | None = None,
    spec: ResultSpec | None = None,
) -> Any:
    """Send ``func(*args, **kwargs)`` as a command; return its result pointers at once.

    Args:
        name: the op's wire name (default: looked up in the allowlist).
        spec: the result spec if the caller knows it (default: inferred on meta tensors).

    Raises:
        OpNotAllowedError: ``func`` is not in the allowlist.
        PointerError: ``out=`` names something other than pointers.
        LocationError: see :func:`scan_args`.
    """
    name = name or op_name(func)
    if name is None:
        if isinstance(func, torch._C.ScriptMethod):
            owner: Any = func.owner
            raise OpNotAllowedError(
                f"TorchScript module method {func.name!r} of {owner._type().name()!r} cannot run on "
                "pointers: the script module keeps no Python code to send as commands; call the "
                "nn.Module itself (or a torch.jit.script function, which keeps its Python original)",
                op=str(func.name),
            )
        raise OpNotAllowedError(
            f"{getattr(func, '__qualname__', func)!r} is not an allowed remote op",
            op=str(getattr(func, "__name__", func)),
        )
    if "out" in kwargs and kwargs["out"] is not None:
        return _into_out(func, args, kwargs, name)
    scan = ArgScan()  # scan_args, inlined: this is the per-op hot path
    wire_args = [scan.wire(a) for a in args]
    wire_kwargs = {k: scan.wire(v) for k, v in kwargs.items()} if kwargs else {}
    scan.check()
    location = scan.location
    assert location is not None and scan.first is not None
    target = scan.first
    flags = _FLAGS.get(name)
    if flags is None:
        flags = _FLAGS[name] = _flags_of(name)
    inplace, foreach_inplace, differentiable = flags
    if inplace and args and isinstance(args[0], PointerTensor):
        target = args[0]
        spec = infer_spec(func, args, kwargs, scan, name) if name.endswith(_SHAPE_CHANGING) else None
        target.seq, _ = location.submit(Kind.CMD, name, wire_args, wire_kwargs, [], *grad_mode())
        if isinstance(spec, TensorSpec) and target.signature is not None:
            reshape_shell(target, spec.shape)
        if name.endswith("requires_grad_"):
            flag = bool(args[1]) if len(args) > 1 else bool(kwargs.get("requires_grad", True))
            set_local_requires_grad(target, flag)
        return target if "__setitem__" not in name else None
    if spec is None:
        spec = infer_spec(func, args, kwargs, scan, name)
    grad_on = torch.is_grad_enabled()
    if type(spec) is TensorSpec and planned_result_ids.get() is None:  # the common case, inlined
        rid = new_id()
        seq, _ = location.submit(Kind.CMD, name, wire_args, wire_kwargs, [rid], *(() if grad_on else (False,)))
        rg = scan.any_grad and grad_on and differentiable
        return make_pointer(location, rid, shape=spec.shape, dtype=spec.dtype, requires_grad=rg, owner=target.owner, seq=seq)
    ids = take_result_ids(result_count(spec))
    seq, _ = location.submit(Kind.CMD, name, wire_args, wire_kwargs, ids, *grad_mode())
    if foreach_inplace and args and type(args[0]) is list:
        for t in args[0]:  # each changed tensor's get() must see this op's error, if any
            if isinstance(t, PointerTensor):
                t.seq = seq
    rg = scan.any_grad and grad_on and differentiable
    return build_results(spec, iter(ids), location, target.owner, seq, rg)


_FLAGS: dict[str, tuple[bool, bool, bool]] = {}
"""Per op name: (in place, an in-place ``torch._foreach_*``, its result can require grad).
Worked out once per name: string tests on every op cost more than the lookup."""


def _flags_of(name: str) -> tuple[bool, bool, bool]:
    inplace = is_inplace(name)
    return inplace, inplace and name.startswith("torch._foreach_"), name not in _NON_DIFFERENTIABLE
