"""Memory limits of a node: its budget, and what values and commands cost. No I/O.

A node must survive every command a coordinator sends, so memory is checked *before* it
is allocated:

* **The budget.** A node has one memory budget in bytes (``--max-memory-mb``; by default
  half of the machine's physical memory, or the store cap if that is smaller: see
  :func:`default_budget`). A command whose output would take the bytes the store holds
  plus the output over the budget is refused with
  :class:`~fedws.exceptions.MemoryBudgetError` before it runs; so is each step of a plan
  (its earlier steps' outputs count as held), and a reply that would need more bytes than
  the whole budget to encode.
* **Output sizes** come from running the op on ``meta`` tensors (shapes, strides and
  dtypes only, no data), cached by (op, argument signatures) as the coordinator does in
  ``fedws.pointers.meta``; a repeated op costs a dict lookup. What counts is the bytes of
  *new* storage: views (``expand``, ``view``, slicing) and in-place ops cost nothing,
  ``out=`` counts what its storage grows by.
* **Data-dependent sizes.** Ops without a meta kernel, or whose size depends on values,
  are bounded instead: ``bincount``, ``repeat_interleave``, ``one_hot``, ``cov``,
  ``corrcoef``, ``combinations`` and ``histogram`` by a bound computed from the values or
  the shapes (:data:`_VALUE_BOUNDS`); 0-d tensors standing for sizes
  (``arange(tensor(n))``) by their values; every other op (``nonzero``, ``unique``,
  ``masked_select``, boolean indexing, ``lstsq``...) by its inputs: at most
  ``8 * (ndim + 3)`` bytes per input element (``nonzero`` of a 2-d tensor needs 16 bytes
  per element, ``unique`` with inverse and counts 24).
* **What the store holds** (:func:`own`) counts every byte: tensor storages (each once per
  stored value), the Python objects of non-tensor values (lists, dicts, strings, numbers,
  recursed with a bound), the tensors and ops of stored plans, and a tensor that borrows a
  received frame's memory: one that borrows less than half the frame is copied when it is
  stored (so the frame can be freed); a larger one keeps the frame and counts all of it.

Not counted: transient work space inside a kernel (a sort's buffers) and Python objects an
op builds that are not stored; the budget keeps a margin for them by being a share of the
machine.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
from collections.abc import Callable, Hashable
from typing import Any

import torch

from ..exceptions import LimitExceededError, MemoryBudgetError
from ..protocol.codec import VIEW_MIN_BYTES
from ..protocol.shape_rules import TensorSpec, fresh_bytes
from ..protocol.tree import tree_map

__all__ = [
    "MemoryBudget",
    "physical_memory",
    "default_budget",
    "output_bytes",
    "reply_bytes",
    "own",
    "enter_frame",
    "leave_frame",
    "check_listing",
    "MAX_LISTED",
    "MAX_WALK",
    "UNCOUNTABLE",
]

# Objects one SEARCH or INFO list reply may describe. They are answered on the event loop
# (~10 us per entry: 10^6 entries froze every connection for 10 s); 10^5 keeps a reply near
# a second while leaving room for busy honest nodes (tests hold over 10^4 objects).
MAX_LISTED = 100_000
# Objects :func:`own` / :func:`reply_bytes` visit in one value before giving up (a value
# that large is refused: it is counted as :data:`UNCOUNTABLE` bytes).
MAX_WALK = 1 << 22
UNCOUNTABLE = 1 << 62
# Bytes per input element an op of unknown output size may produce (see the docstring).
_UNKNOWN_PER_DIM = 8


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine, or None where the OS does not say."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def default_budget(max_store_bytes: int | None = None) -> int:
    """Half of physical memory, or ``max_store_bytes`` if smaller (4 GiB if unknown)."""
    phys = physical_memory()
    share = phys // 2 if phys else 4 << 30
    return share if max_store_bytes is None else min(share, max_store_bytes)


class MemoryBudget:
    """A node's memory budget and its checks.

    Args:
        limit: bytes the node may hold plus allocate for one command.
        worker: the node's id, named in refusals.
    """

    __slots__ = ("limit", "worker")

    def __init__(self, limit: int, worker: str) -> None:
        self.limit = limit
        self.worker = worker

    def check(self, need: int, held: int, what: str, *, op: str | None = None, obj_id: int | None = None) -> None:
        """Refuse ``what`` if ``held + need`` bytes exceed the budget.

        Raises:
            MemoryBudgetError: nothing was allocated.
        """
        if need and held + need > self.limit:
            raise MemoryBudgetError(
                f"{what} would allocate {_mib(need)} with {_mib(held)} held, over the memory "
                f"budget of {_mib(self.limit)} of worker {self.worker!r}; nothing was run",
                worker=self.worker,
                op=op,
                obj_id=obj_id,
            )

    def check_op(
        self, op: str, fn: Callable[..., Any], args: Any, kwargs: dict[str, Any], held: int,
    ) -> int:
        """Check an op before it runs; return the bytes it will allocate (an estimate).

        Raises:
            MemoryBudgetError: its output would not fit.
        """
        need = output_bytes(op, fn, args, kwargs)
        self.check(need, held, op, op=op)
        return need

    def plan_guard(self, held: int) -> Callable[[str, Callable[..., Any], Any, dict[str, Any]], None]:
        """A check for each step of one plan run: earlier steps' outputs count as held."""
        total = [held]

        def guard(op: str, fn: Callable[..., Any], args: Any, kwargs: dict[str, Any]) -> None:
            total[0] += self.check_op(op, fn, args, kwargs, total[0])

        return guard

    def check_reply(self, value: Any, obj_id: int | None = None) -> None:
        """Refuse a reply whose tensors need more bytes to encode than the whole budget.

        Raises:
            MemoryBudgetError: the object stays where it was.
        """
        need = reply_bytes(value)
        if need > self.limit:
            raise MemoryBudgetError(
                f"object {obj_id} would need {_mib(need)} to send, over the memory budget of "
                f"{_mib(self.limit)} of worker {self.worker!r} (it stays on the worker: "
                "send a part of it, or a reduction)",
                worker=self.worker,
                obj_id=obj_id,
            )


def check_listing(count: int, worker: str) -> None:
    """Refuse to describe more than :data:`MAX_LISTED` objects in one reply.

    Raises:
        LimitExceededError: the caller should narrow the search with tags.
    """
    if count > MAX_LISTED:
        raise LimitExceededError(
            f"worker {worker!r} would describe {count} objects, more than {MAX_LISTED} in one "
            "reply; search with tags to narrow it",
            worker=worker,
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


# -- output sizes --------------------------------------------------------------------------

_VALUE = object()  # cache entry: the size depends on argument values, infer every time
_CACHE: dict[Hashable, Any] = {}
_CACHE_MAX = 65536
_cache_lock = threading.Lock()
_SCALARS = frozenset({int, float, bool, str, complex, type(None)})


class _Uncacheable(Exception):
    pass


def _sig(v: Any, tensors: list[torch.Tensor]) -> Hashable:
    """A hashable signature of an argument; its tensors are appended to ``tensors``."""
    if isinstance(v, torch.Tensor):
        tensors.append(v)
        return (v.shape, v.dtype) if v.is_contiguous() else (v.shape, v.stride(), v.dtype)
    t = type(v)
    if t in _SCALARS:
        return (t, v)  # the type: 1, 1.0 and True hash alike
    if t is list or t is tuple:
        return (t, tuple([_sig(x, tensors) for x in v]))
    if t is dict:
        return (t, tuple([(k, _sig(x, tensors)) for k, x in v.items()]))
    if t is slice:
        return (t, _sig(v.start, tensors), _sig(v.stop, tensors), _sig(v.step, tensors))
    try:
        hash(v)
    except TypeError:
        raise _Uncacheable from None
    return (t, v)


def _key(op: str, args: Any, kwargs: dict[str, Any], tensors: list[torch.Tensor]) -> Hashable:
    """The cache key of a command: ``_sig`` of everything, with the commonest leaves inline
    (this runs for every command)."""
    parts: list[Hashable] = [op]
    for v in args:
        if type(v) is torch.Tensor:
            tensors.append(v)
            parts.append((v.shape, v.dtype) if v.is_contiguous() else (v.shape, v.stride(), v.dtype))
        else:
            parts.append(_sig(v, tensors))
    if kwargs:
        parts.append(_sig(kwargs, tensors))
    return tuple(parts)


def output_bytes(op: str, fn: Callable[..., Any], args: Any, kwargs: dict[str, Any]) -> int:
    """Bytes of new storage ``fn(*args, **kwargs)`` would allocate (without running it).

    0 for fedws's own ops (they move or rebind, never compute) and for ops on pointers
    (the work happens on another node).
    """
    if op.startswith("fedws."):
        return 0
    tensors: list[torch.Tensor] = []
    try:
        key: Hashable = _key(op, args, kwargs, tensors)
        cached = _CACHE.get(key)
    except _Uncacheable:
        key, cached = None, None
    if cached is not None and cached is not _VALUE:
        return int(cached)
    if any(t.device.type == "meta" for t in tensors):
        return 0  # a pointer: the op runs where its data is
    if cached is None:
        need = _rule_bytes(op, args, kwargs)  # common ops by rule: no torch._dynamo import
        need = _meta_bytes(fn, args, kwargs) if need is None else need
        if key is not None and len(_CACHE) < _CACHE_MAX:
            with _cache_lock:
                _CACHE[key] = _VALUE if need is None else need
        if need is not None:
            return need
    return _value_bytes(op, fn, args, kwargs, tensors)


def _rule_bytes(op: str, args: Any, kwargs: dict[str, Any]) -> int | None:
    def spec(x: Any) -> Any:
        return TensorSpec(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x

    return fresh_bytes(op, tree_map(spec, list(args)), tree_map(spec, kwargs))


def _meta_of(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _on_meta(obj: Any, scalars: bool = False) -> Any:
    """``obj`` with its tensors replaced by meta tensors (0-d ones by their values if ``scalars``)."""
    if isinstance(obj, torch.Tensor):
        if scalars and obj.dim() == 0:
            return obj.item()
        return _meta_of(obj)
    t = type(obj)
    if t is list or t is tuple:
        return t(_on_meta(x, scalars) for x in obj)
    if t is dict:
        return {k: _on_meta(x, scalars) for k, x in obj.items()}
    return obj


def _meta_bytes(fn: Callable[..., Any], args: Any, kwargs: dict[str, Any], scalars: bool = False) -> int | None:
    """New storage bytes of ``fn`` run on meta stand-ins; None if that cannot be run."""
    try:
        margs, mkwargs = _on_meta(args, scalars), _on_meta(kwargs, scalars)
        inputs = _leaves((margs, mkwargs))
        storages = {s._cdata: s for s in (t.untyped_storage() for t in inputs)}
        before = {cdata: s.nbytes() for cdata, s in storages.items()}
        if "device" in mkwargs:
            mkwargs["device"] = "meta"
        # Factories build on meta under the device context; torch.range ignores it, so an
        # op given no tensor is also offered device="meta" (never a real allocation here).
        with torch.device("meta"), torch.no_grad():
            if inputs or "device" in mkwargs:
                out = fn(*margs, **mkwargs)
            else:
                try:
                    out = fn(*margs, device="meta", **mkwargs)
                except TypeError:
                    out = fn(*margs, **mkwargs)
    except Exception:
        return None
    need = 0
    grown = {cdata: s.nbytes() - before[cdata] for cdata, s in storages.items()}
    seen: set[int] = set()
    for t in _leaves(out):
        s = t.untyped_storage()
        cdata = s._cdata
        if cdata in seen:
            continue
        seen.add(cdata)
        if cdata in storages:
            need += max(0, grown[cdata])  # out= / in place: what the storage grew by
        else:
            need += s.nbytes()
    for cdata, growth in grown.items():  # an input resized but not returned
        if cdata not in seen and growth > 0:
            need += growth
    return need


def _leaves(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        return [t for x in obj for t in _leaves(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in _leaves(x)]
    return []


def _value_bytes(
    op: str, fn: Callable[..., Any], args: Any, kwargs: dict[str, Any], tensors: list[torch.Tensor]
) -> int:
    """Bound for an op whose output size meta inference could not give (see module doc)."""
    bound = _VALUE_BOUNDS.get(op.rpartition(".")[2])
    if bound is not None:
        try:
            return int(bound(list(args), kwargs))
        except Exception:
            pass  # torch will raise the real error; bound it like any other op
    if any(t.dim() == 0 for t in tensors):
        need = _meta_bytes(fn, args, kwargs, scalars=True)
        if need is not None:
            return need
    return sum(t.numel() * _UNKNOWN_PER_DIM * (t.dim() + 3) for t in tensors)


def _arg(args: list[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _int_max(t: torch.Tensor) -> int:
    return int(t.max()) if t.numel() else -1


def _bincount(args: list[Any], kwargs: dict[str, Any]) -> int:
    x = _arg(args, kwargs, 0, "input")
    minlength = int(_arg(args, kwargs, 2, "minlength", 0))
    return int(max(_int_max(x) + 1, minlength, 0) * 8)


def _repeat_interleave(args: list[Any], kwargs: dict[str, Any]) -> int:
    x = _arg(args, kwargs, 0, "input")
    repeats = _arg(args, kwargs, 1, "repeats")
    if repeats is None:  # torch.repeat_interleave(repeats): 0, 0, 1, 1, 1, ...
        return max(int(x.clamp(min=0).sum()), 0) * 8
    dim = _arg(args, kwargs, 2, "dim")
    along = x.size(dim) if dim is not None else x.numel()
    rest = x.numel() // along if along else 0
    if isinstance(repeats, torch.Tensor):
        total = int(repeats.clamp(min=0).sum()) * (along if repeats.numel() == 1 else 1)
    else:
        total = max(int(repeats), 0) * along
    return int(total * rest * x.element_size())


def _one_hot(args: list[Any], kwargs: dict[str, Any]) -> int:
    x = _arg(args, kwargs, 0, "tensor")
    classes = int(_arg(args, kwargs, 1, "num_classes", -1))
    if classes < 0:
        classes = _int_max(x) + 1
    return int(x.numel() * max(classes, 0) * 8)


def _cov(args: list[Any], kwargs: dict[str, Any]) -> int:
    x = _arg(args, kwargs, 0, "input")
    rows = x.shape[0] if x.dim() == 2 else 1
    return int(rows * rows * max(x.element_size(), 8))


def _combinations(args: list[Any], kwargs: dict[str, Any]) -> int:
    x = _arg(args, kwargs, 0, "input")
    r = int(_arg(args, kwargs, 1, "r", 2))
    n = x.numel() + (r - 1 if _arg(args, kwargs, 2, "with_replacement", False) else 0)
    return int(math.comb(n, r) * r * x.element_size()) if r >= 0 else 0


def _histogram(args: list[Any], kwargs: dict[str, Any]) -> int:
    x = _arg(args, kwargs, 0, "input")
    bins = _arg(args, kwargs, 1, "bins", 100)
    n = bins.numel() if isinstance(bins, torch.Tensor) else int(bins)
    return int((2 * n + 2) * max(x.element_size(), 8))


def _backward(args: list[Any], kwargs: dict[str, Any]) -> int:
    # What the catch-all below gives it, without first trying meta with 0-d tensors as
    # numbers (autograd never runs on those: it only cost every training step a meta run).
    return sum(t.numel() * _UNKNOWN_PER_DIM * (t.dim() + 3) for t in _leaves((args, kwargs)))


_VALUE_BOUNDS: dict[str, Callable[[list[Any], dict[str, Any]], int]] = {
    "backward": _backward,
    "bincount": _bincount,
    "repeat_interleave": _repeat_interleave,
    "one_hot": _one_hot,
    "cov": _cov,
    "corrcoef": _cov,
    "combinations": _combinations,
    "histogram": _histogram,
}


# -- what a value holds ------------------------------------------------------------------


class _Frame(threading.local):
    span: tuple[int, int] | None = None


_frame = _Frame()


def enter_frame(frame: bytes | bytearray | memoryview) -> None:
    """Remember (for this thread) where the frame being handled lies in memory.

    Decoded tensors of 64 KiB and more are views of a writable frame; :func:`own` uses
    this to tell a tensor that keeps the frame alive.
    """
    span = None
    try:
        mv = memoryview(frame)
        if not mv.readonly and mv.nbytes >= VIEW_MIN_BYTES and mv.c_contiguous:
            start = ctypes.addressof(ctypes.c_char.from_buffer(mv))
            span = (start, start + mv.nbytes)
    except (TypeError, ValueError):
        pass
    _frame.span = span


def leave_frame() -> None:
    """Forget the frame of :func:`enter_frame` (this thread handles no frame any more)."""
    _frame.span = None


def own(obj: Any) -> tuple[Any, int]:
    """``obj`` made to stop borrowing a small part of the current frame, and the bytes it holds.

    Tensors count their storage (each storage once); one that borrows less than half of
    the frame being handled is replaced by a copy (at the top, or inside a list or dict;
    elsewhere it counts the whole frame, as does one borrowing more). Other values count
    their Python objects, recursively (lists, tuples, dicts, sets, and fedws objects with
    ``__slots__`` such as stored plans). Pointers (meta tensors) hold nothing here. A value
    of more than :data:`MAX_WALK` objects counts :data:`UNCOUNTABLE` bytes.
    """
    span = _frame.span
    if type(obj) is torch.Tensor and (span is None or not _borrows(obj, span)) and not obj.requires_grad:
        return obj, _storage_bytes(obj)  # the common case
    if isinstance(obj, torch.Tensor) and span is not None:
        obj = _adopt(obj, span)
    total = 0
    storages: set[int] = set()
    seen: set[int] = set()
    stack: list[tuple[Any, Any, Any]] = [(obj, None, None)]  # (value, its list/dict, its key)
    visited = 0
    while stack:
        o, parent, key = stack.pop()
        visited += 1
        if visited > MAX_WALK:
            return obj, UNCOUNTABLE
        if isinstance(o, torch.Tensor):
            if o.device.type == "meta":
                continue
            if span is not None and parent is not None and _borrows(o, span):
                o = _adopt(o, span)
                parent[key] = o
            sk = _storage_key(o)
            if sk in storages:
                continue
            storages.add(sk)
            if span is not None and _borrows(o, span):
                total += span[1] - span[0]  # it keeps the whole frame alive
            else:
                total += _storage_bytes(o)
            if o.is_leaf and o.requires_grad and o.grad is not None:
                stack.append((o.grad, None, None))
            continue
        t = type(o)
        if t in _SCALARS or t is bytes or t is bytearray:
            total += sys.getsizeof(o)
            continue
        if id(o) in seen:
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if t is list:
            stack.extend([(x, o, i) for i, x in enumerate(o)])
        elif t is dict:
            stack.extend([(k, None, None) for k in o])
            stack.extend([(x, o, k) for k, x in o.items()])
        elif isinstance(o, (list, tuple, set, frozenset, dict)):
            stack.extend([(x, None, None) for x in (o.values() if isinstance(o, dict) else o)])
        elif t.__module__.startswith("fedws.") and hasattr(t, "__slots__"):
            for cls in t.__mro__:
                for name in getattr(cls, "__slots__", ()):
                    v = getattr(o, name, None)
                    if v is not None:
                        stack.append((v, None, None))
    return obj, total


def _borrows(t: torch.Tensor, span: tuple[int, int]) -> bool:
    """Whether ``t``'s memory lies in the frame being handled."""
    try:
        ptr = int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return False
    return span[0] <= ptr < span[1]


def _adopt(t: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """A copy of ``t`` in memory of its own if it borrows less than half of the frame.

    Only leaves are copied (a copy of a tensor with a history would lose it); the copy
    keeps ``requires_grad`` and the grad. Anything else is returned as it is.
    """
    if not _borrows(t, span) or not t.is_leaf or 2 * _storage_bytes(t) > span[1] - span[0]:
        return t
    copy = t.detach().clone()
    if t.requires_grad:
        grad = t.grad
        copy.requires_grad_(True)
        if grad is not None:
            copy.grad = _adopt(grad, span)
    return copy


def _storage_key(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().data_ptr()) or id(t)
    except (RuntimeError, NotImplementedError):
        return id(t)


def _storage_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s storage (0 for meta tensors: pointers)."""
    if t.device.type == "meta":
        return 0
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return 0


def reply_bytes(value: Any) -> int:
    """Bytes the tensors in ``value`` take once encoded (dense), grads included."""
    total = 0
    stack = [value]
    visited = 0
    while stack:
        o = stack.pop()
        visited += 1
        if visited > MAX_WALK:
            return UNCOUNTABLE
        if isinstance(o, torch.Tensor):
            total += o.numel() * o.element_size()
            if o.is_leaf and o.requires_grad and o.grad is not None:
                stack.append(o.grad)
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
    return total
