"""Which frames are cheap enough to answer on the server's event loop, before running them.

Handing a frame to the connection's thread and its reply back costs two thread wake-ups,
most of a small round trip. A frame may skip them only when its cost is bounded whatever
the caller sends, so a long computation never holds up pings or other connections: every
request is a bounded kind (ping, info, search, get, delete) or a command whose op is
elementwise or a reduction (:data:`CHEAP_OPS`: work linear in its inputs), whose tensors
(stored or in the frame) have at most :data:`MAX_ELEMENTS` elements each, whose broadcast
result has at most that many too, and whose other arguments are plain numbers. Anything
else (plans, matmuls, shape arguments, pointers to other nodes, unknown ids) is not cheap
and goes to the thread, where the node checks and runs it as always: this only chooses
the thread, never what is allowed.
"""

from __future__ import annotations

from typing import Any

import torch

from ..protocol import codec
from ..protocol.codec import ObjRef, peek_kinds
from ..protocol.messages import Kind
from .store import ObjectStore

__all__ = ["cheap_frame", "CHEAP_OPS", "MAX_ELEMENTS", "BOUNDED_KINDS"]

MAX_ELEMENTS = 4096
"""Largest tensor (elements) a cheap command may read or make: ~10 µs of elementwise work."""

BOUNDED_KINDS = frozenset({Kind.PING, Kind.INFO, Kind.SEARCH, Kind.GET, Kind.DELETE})
"""Requests whose cost does not depend on what the caller asks the node to compute."""

_ELEMENTWISE = (
    "add", "sub", "mul", "div", "true_divide", "neg", "abs", "exp", "log", "sqrt", "rsqrt",
    "sigmoid", "tanh", "relu", "sin", "cos", "clamp", "maximum", "minimum", "eq", "ne", "lt",
    "le", "gt", "ge", "square", "reciprocal", "sign", "floor", "ceil", "round",
)
_REDUCTIONS = ("sum", "mean", "max", "min", "argmax", "argmin", "prod", "norm", "clone", "item", "detach")
_DUNDERS = (
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__",
    "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__neg__", "__abs__", "__eq__",
    "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
)
CHEAP_OPS: frozenset[str] = frozenset(
    [f"torch.{n}" for n in _ELEMENTWISE + _REDUCTIONS]
    + [f"Tensor.{n}" for n in _ELEMENTWISE + _REDUCTIONS + _DUNDERS]
    + [f"Tensor.{n}_" for n in _ELEMENTWISE]
    + ["torch.nn.functional.relu", "torch.nn.functional.sigmoid", "torch.nn.functional.tanh"]
)
"""Ops whose work is linear in their (broadcast) operands."""

_PLAIN = (int, float, bool, type(None))


def cheap_frame(frame: bytes | bytearray | memoryview, store: ObjectStore) -> bool:
    """Whether every request of ``frame`` is cheap (see the module docstring).

    Reads sizes from ``store`` without checking who may use the objects: the answer only
    picks the thread; the node's checks run on the request either way.
    """
    kinds = peek_kinds(frame)
    if kinds is None:
        return False
    if all(k in BOUNDED_KINDS for k in kinds):
        return True
    try:
        blobs = list(codec.iter_blobs(frame))
        for kind, blob in zip(kinds, blobs, strict=True):
            if kind in BOUNDED_KINDS:
                continue
            if kind != Kind.CMD or not _cheap_cmd(codec.decode(blob), store):
                return False
    except Exception:  # malformed: let the thread report it as the node always does
        return False
    return True


def _cheap_cmd(msg: Any, store: ObjectStore) -> bool:
    # [kind, seq, op, args, kwargs, result_ids(, grad_enabled)]
    if type(msg) is not list or len(msg) not in (6, 7) or msg[2] not in CHEAP_OPS:
        return False
    args, kwargs = msg[3], msg[4]
    if type(args) is not list or type(kwargs) is not dict or len(kwargs) > 4:
        return False
    shapes: list[tuple[int, ...]] = []
    for value in [*args, *kwargs.values()]:
        if type(value) is ObjRef:
            value = store.objects.get(value.id)
            if value is None:  # not there yet (or never): its size is unknown
                return False
        if type(value) in (torch.Tensor, torch.nn.Parameter):
            if value.numel() > MAX_ELEMENTS or value.is_sparse:
                return False
            shapes.append(value.shape)
        elif not isinstance(value, _PLAIN):
            return False
    return _broadcast_bound(shapes) <= MAX_ELEMENTS


def _broadcast_bound(shapes: list[tuple[int, ...]]) -> int:
    """Elements of the shapes broadcast together (an upper bound when they do not broadcast)."""
    out = 1
    for i in range(1, max((len(s) for s in shapes), default=0) + 1):
        out *= max(s[-i] if len(s) >= i else 1 for s in shapes)
    return out
