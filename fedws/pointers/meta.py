"""Result specs and meta-tensor inference: a result pointer's shape before anything is sent.

Running an op on ``meta`` tensors (no data) gives its result's shapes and dtypes. On this
torch that costs 20-150 us, so the outcome is cached by (op, argument signatures) in a
bounded :class:`SpecCache`; a repeated op then costs a dict lookup. When the meta run fails
(no meta kernel, a data-dependent shape, or a genuine error) the spec is :data:`UNKNOWN`:
the command is sent anyway and the shape is asked of the node when needed.

Specs are small frozen records instead of tagged tuples, so a reader (and mypy) sees what
each one holds.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias

import torch
from torch._C import DisableTorchFunctionSubclass

from ..protocol.shape_rules import TensorSpec

__all__ = [
    "Signature",
    "TensorSpec",
    "SeqSpec",
    "NoneSpec",
    "UnknownSpec",
    "NONE",
    "UNKNOWN",
    "ResultSpec",
    "SpecCache",
    "SPECS",
    "spec_of",
    "result_count",
    "meta_shell",
    "meta_tensor",
    "run_on_meta",
]


class Signature(NamedTuple):
    """What a pointer knows locally about its remote tensor.

    A named tuple rather than a dataclass: signatures are parts of the meta-cache key, and
    a tuple hashes and compares in C, on every op.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


@dataclass(frozen=True, slots=True)
class SeqSpec:
    """The result is a sequence of tensors (``torch.max(x, 0)``, ``x.unbind()``).

    ``container`` is ``list``, ``tuple`` or one of torch's named tuples
    (``torch.return_types.*``), rebuilt around the result pointers.
    """

    container: type
    items: tuple[TensorSpec | SeqSpec | NoneSpec | UnknownSpec, ...]


@dataclass(frozen=True, slots=True)
class NoneSpec:
    """The op returns None (it works by side effect): no result id is drawn."""


@dataclass(frozen=True, slots=True)
class UnknownSpec:
    """The result could not be worked out locally: one pointer of unknown shape."""


NONE = NoneSpec()
UNKNOWN = UnknownSpec()

ResultSpec: TypeAlias = TensorSpec | SeqSpec | NoneSpec | UnknownSpec


def spec_of(out: Any) -> ResultSpec:
    """The spec of what an op returned on meta tensors."""
    if isinstance(out, torch.Tensor):
        return TensorSpec(tuple(out.shape), out.dtype)
    if out is None:
        return NONE
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return SeqSpec(type(out), tuple(spec_of(o) for o in out))
    return UNKNOWN


def result_count(spec: ResultSpec) -> int:
    """How many result ids a command with this spec needs."""
    if isinstance(spec, SeqSpec):
        return sum(result_count(s) for s in spec.items)
    return 0 if spec is NONE else 1


_SHELLS: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}
_SHELLS_MAX = 4096


def meta_shell(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A shared meta tensor to build pointers on (``Tensor._make_subclass`` copies it).

    Shared per (shape, dtype) because building a meta tensor costs more than the lookup.
    """
    key = (shape, dtype)
    t = _SHELLS.get(key)
    if t is None:
        t = torch.empty(shape, dtype=dtype, device="meta")
        if len(_SHELLS) < _SHELLS_MAX:
            _SHELLS[key] = t
    return t


def meta_tensor(sig: Signature) -> torch.Tensor:
    """A fresh meta tensor standing in for a pointer with signature ``sig``."""
    return torch.empty(sig.shape, dtype=sig.dtype, device="meta")


def run_on_meta(func: Callable[..., Any], meta_args: Sequence[Any], meta_kwargs: dict[str, Any]) -> ResultSpec:
    """Run ``func`` on meta arguments; UNKNOWN if that fails for any reason.

    A genuine error (wrong shapes) is not raised here: the node raises it, and the user sees
    it where every remote error surfaces (``get``/``await``).
    """
    try:
        with DisableTorchFunctionSubclass(), torch.no_grad():
            out = func(*meta_args, **meta_kwargs)
        return spec_of(out)
    except Exception:
        return UNKNOWN


class SpecCache:
    """Result specs by (op, argument signatures), bounded so a long session cannot grow it.

    Once full it stops learning (no eviction): the ops a training loop repeats are the
    first ones it sees.
    """

    __slots__ = ("_specs", "max_size", "find")

    def __init__(self, max_size: int = 65536) -> None:
        self._specs: dict[Hashable, ResultSpec] = {}
        self.max_size = max_size
        self.find: Callable[[Hashable], ResultSpec | None] = self._specs.get
        """The cached spec or None; raises TypeError for an unhashable key. The bare dict
        lookup, for the per-op path (:meth:`get` is the forgiving form)."""

    def get(self, key: Hashable) -> ResultSpec | None:
        """The cached spec, or None (also when ``key`` holds something unhashable)."""
        try:
            return self._specs.get(key)
        except TypeError:
            return None

    def put(self, key: Hashable, spec: ResultSpec) -> None:
        """Remember ``spec`` unless the cache is full or ``key`` is unhashable."""
        if len(self._specs) < self.max_size:
            try:
                self._specs[key] = spec
            except TypeError:
                pass

    def clear(self) -> None:
        """Forget every spec (tests measure inference with a cold cache)."""
        self._specs.clear()

    def __len__(self) -> int:
        return len(self._specs)


SPECS = SpecCache()
"""The process-wide cache: specs depend only on torch, not on workers."""
