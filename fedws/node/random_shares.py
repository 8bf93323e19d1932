"""Node-side randomness for secure computation: additive shares and Beaver triples.

Two named node commands, drawn from the operating system's CSPRNG (:mod:`secrets`) on
the node that runs them, never from torch's seeded generator:

- ``fedws.smpc.split(secret, n)``: ``n`` additive shares of an int64 tensor the caller
  owns (``sum(shares) == secret`` in the ring of 64-bit integers, wrapping). The node
  that holds a value shares it itself, so the coordinator never sees it (PySyft Part 10:
  a remote parameter ``.fix_precision().share(...)``).
- ``fedws.smpc.triple(kind, shape_a, shape_b, n)``: a Beaver triple ``a, b, c = a*b``
  (or ``a @ b``; or ``a & b`` for kind ``"and"``, XOR-shared), returned only as ``n`` shares
  of each (``3n`` results). The crypto provider runs it; the coordinator holds pointers to
  the shares and moves each party's node to node, so it never holds a triple.
- ``fedws.smpc.bits(shape, n)``: random bits ``r``, XOR-shared and additively shared
  (``2n`` results), to turn a shared bit into an additive share (comparisons).

Both are bounded before anything is allocated (party count, rank, elements, the memory
budget) and, on a private node, need the ``smpc`` permission of the caller's principal;
ownership of ``secret`` is checked by the node's usual argument resolution. Results of a
split of a private value are private like any derived value: they cannot leave or move.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["MAX_PARTIES", "MAX_ELEMENTS", "MAX_RANK", "random_ring", "split", "xor_split", "triple", "triple_shapes", "bits",
           "node_ops"]

MAX_PARTIES = 16
"""Most shares one command makes."""
MAX_ELEMENTS = 1 << 24
"""Most elements of one tensor a command draws (128 MiB of int64)."""
MAX_RANK = 8
"""Most dimensions of a triple's shapes."""

_KINDS = ("mul", "matmul", "and")


def random_ring(shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of int64 values uniform over the whole ring, from ``secrets.token_bytes``."""
    n = math.prod(shape)
    if n == 0:
        return torch.zeros(shape, dtype=torch.int64)
    return torch.frombuffer(bytearray(secrets.token_bytes(8 * n)), dtype=torch.int64).reshape(shape)


def _parties(n: Any) -> int:
    if type(n) is not int or not 2 <= n <= MAX_PARTIES:
        raise ValueError(f"smpc: the number of shares must be an int in [2, {MAX_PARTIES}], got {n!r}")
    return n


def split(secret: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``n`` shares of ``secret`` (int64): ``n - 1`` uniform ones and the difference.

    Raises:
        TypeError: ``secret`` is not a local int64 tensor.
        ValueError: ``n`` is out of bounds, or ``secret`` is too large.
    """
    n = _parties(n)
    if type(secret) is not torch.Tensor or secret.dtype != torch.int64 or secret.device.type != "cpu":
        raise TypeError("smpc split: the secret must be an int64 CPU tensor (fix_precision() a float one first)")
    if secret.numel() > MAX_ELEMENTS:
        raise ValueError(f"smpc split: at most {MAX_ELEMENTS} elements, got {secret.numel()}")
    shape = tuple(secret.shape)
    shares = [random_ring(shape) for _ in range(n - 1)]
    last = secret.clone()
    for s in shares:
        last.sub_(s)  # int64 arithmetic wraps: the ring Z/2^64
    shares.append(last)
    return shares


def xor_split(secret: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``n`` XOR shares of an int64 tensor: ``n - 1`` uniform, one the XOR of all with it."""
    shares = [random_ring(tuple(secret.shape)) for _ in range(n - 1)]
    last = secret.clone()
    for s in shares:
        last.bitwise_xor_(s)
    shares.append(last)
    return shares


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_RANK or not all(
        type(d) is int and 0 <= d <= MAX_ELEMENTS for d in value
    ):
        raise ValueError(f"smpc: {what} must be a list of at most {MAX_RANK} sizes in [0, {MAX_ELEMENTS}]")
    shape = tuple(value)
    if math.prod(shape) > MAX_ELEMENTS:
        raise ValueError(f"smpc: {what} has more than {MAX_ELEMENTS} elements")
    return shape


def triple_shapes(kind: Any, shape_a: Any, shape_b: Any) -> tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Check a triple request; return ``(kind, shape_a, shape_b, shape_c)`` without allocating."""
    if kind not in _KINDS:
        raise ValueError(f"smpc triple: kind must be one of {_KINDS}, got {kind!r}")
    sa, sb = _shape(shape_a, "shape_a"), _shape(shape_b, "shape_b")
    op = {"mul": torch.mul, "matmul": torch.matmul, "and": torch.bitwise_and}[kind]
    if kind == "and" and sa != sb:
        raise ValueError(f"smpc triple: an 'and' triple needs equal shapes, got {list(sa)} and {list(sb)}")
    try:
        sc = tuple(op(torch.empty(sa, dtype=torch.int64, device="meta"),
                      torch.empty(sb, dtype=torch.int64, device="meta")).shape)
    except RuntimeError as exc:
        raise ValueError(f"smpc triple: shapes {list(sa)} and {list(sb)} do not fit {kind}: {exc}") from None
    if math.prod(sc) > MAX_ELEMENTS:
        raise ValueError(f"smpc triple: the product has more than {MAX_ELEMENTS} elements")
    return kind, sa, sb, sc


def triple(kind: str, shape_a: Any, shape_b: Any, n: int) -> list[torch.Tensor]:
    """Shares of a Beaver triple: ``[a_0..a_{n-1}, b_0.., c_0..]`` with ``c = a*b`` or ``a@b``."""
    n = _parties(n)
    kind, sa, sb, _ = triple_shapes(kind, shape_a, shape_b)
    a, b = random_ring(sa), random_ring(sb)
    if kind == "and":
        return xor_split(a, n) + xor_split(b, n) + xor_split(a & b, n)
    c = a * b if kind == "mul" else torch.matmul(a, b)
    return split(a, n) + split(b, n) + split(c, n)


def bits(shape: Any, n: int) -> list[torch.Tensor]:
    """Random bits ``r``: ``n`` XOR shares of them, then ``n`` additive shares."""
    n = _parties(n)
    r = random_ring(_shape(shape, "shape")) & 1
    return xor_split(r, n) + split(r, n)


def node_ops(node: Any) -> dict[str, Callable[..., Any]]:
    """The two commands as ``node.fedws_ops`` entries of ``node`` (a :class:`~fedws.node.Node`,
    untyped here so this module does not import it back): permission and budget checked first."""

    def check(n: int, elements: int, op: str) -> None:
        if node.enforce:
            node._require(node._frame.caller, "smpc")
        node.budget.check(8 * elements * n, node.store.nbytes, op, op=op)

    def split_op(secret: Any, n: Any) -> list[torch.Tensor]:
        n = _parties(n)
        if isinstance(secret, torch.Tensor):
            check(n, secret.numel(), "fedws.smpc.split")
        return split(secret, n)

    def triple_op(kind: Any, shape_a: Any, shape_b: Any, n: Any) -> list[torch.Tensor]:
        n = _parties(n)
        _, sa, sb, sc = triple_shapes(kind, shape_a, shape_b)
        check(n + 1, math.prod(sa) + math.prod(sb) + math.prod(sc), "fedws.smpc.triple")
        return triple(kind, shape_a, shape_b, n)

    def bits_op(shape: Any, n: Any) -> list[torch.Tensor]:
        n = _parties(n)
        check(2 * n + 1, math.prod(_shape(shape, "shape")), "fedws.smpc.bits")
        return bits(shape, n)

    return {"fedws.smpc.split": split_op, "fedws.smpc.triple": triple_op, "fedws.smpc.bits": bits_op}
