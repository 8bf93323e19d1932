"""Comparing shared values: the sign bit of a difference, computed on shares.

``x < y`` is the most significant bit of ``x - y`` in Z/2^64 (right while ``|x - y| <
2**63``). To get that bit without opening anything but uniformly masked values:

1. **A2B**: the arithmetic shares ``s_0 + ... + s_{n-1}`` are added as binary numbers,
   each party's share being its own XOR-sharing (it holds ``s_i``, the others 0). Each
   addition is a Kogge-Stone carry-lookahead adder on XOR shares: XOR and shifts are
   local, an AND takes a binary Beaver triple (``a & b = c``, XOR-shared, drawn on the
   crypto provider's node: ``fedws.smpc.triple`` kind ``"and"``) and opens ``x ^ a`` and
   ``y ^ b`` — uniform, since ``a`` and ``b`` are. 1 + 6 AND rounds per addition.
2. **B2A**: the top bit's XOR shares become additive ones with a random bit ``r`` the
   crypto provider shares both ways (``fedws.smpc.bits``): open ``c = bit ^ r`` (a uniform
   bit), then ``bit = c + r - 2cr``, linear in the shares of ``r``.

Who sees what: as for multiplication (:mod:`.beaver`): parties and coordinator see only
masked openings; the crypto provider sees only its random values. The result is a shared
0/1 value; nothing about the inputs is revealed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..client.worker import Worker
from ..pointers import PointerTensor
from .beaver import request_triple
from .ring import gather, move_all, remote_results, send_value

__all__ = ["open_xor", "and_shares", "add_binary", "msb", "bit_to_arithmetic"]

Shares = list[torch.Tensor]


def _ptrs(shares: Sequence[torch.Tensor]) -> list[PointerTensor]:
    out = [s for s in shares if isinstance(s, PointerTensor)]
    if len(out) != len(shares):
        raise TypeError("every share is a pointer to a party's tensor")
    return out


def _where(shares: Sequence[torch.Tensor]) -> list[Worker]:
    return [p.location for p in _ptrs(shares)]


def open_xor(*groups: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """XOR each group's shares together (one round trip for all groups): only for masks."""
    flat = [p for g in groups for p in _ptrs(g)]
    values = gather(flat)
    out, i = [], 0
    for g in groups:
        acc = values[i].clone()
        for v in values[i + 1:i + len(g)]:
            acc.bitwise_xor_(v)
        out.append(acc)
        i += len(g)
    return out


def and_shares(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], provider: Worker) -> Shares:
    """XOR shares of ``x & y`` from XOR shares of ``x`` and ``y`` (a binary Beaver triple)."""
    parties = _where(xs)
    shape = tuple(xs[0].shape)
    a, b, c = request_triple(provider, "and", shape, shape, parties)
    e, d = open_xor([x ^ ai for x, ai in zip(xs, a)], [y ^ bi for y, bi in zip(ys, b)])
    out: Shares = []
    for i, (w, ai, bi, ci) in enumerate(zip(parties, a, b, c)):
        z = ci ^ (send_value(e, w) & bi) ^ (ai & send_value(d, w))
        if i == 0:
            z = z ^ send_value(e & d, w)
        out.append(z)
    return out


def _each(fn: Callable[..., torch.Tensor], *lists: Sequence[torch.Tensor]) -> Shares:
    return [fn(*items) for items in zip(*lists)]


def add_binary(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], provider: Worker) -> Shares:
    """XOR shares of ``x + y`` (mod 2^64) from XOR shares of ``x`` and ``y`` (Kogge-Stone)."""
    g = and_shares(xs, ys, provider)  # generate
    p0 = _each(lambda x, y: x ^ y, xs, ys)  # propagate
    p = p0
    for k in (1, 2, 4, 8, 16, 32):
        # g = g ^ (p & (g << k)) and p = p & (p << k): both ANDs in one round
        lhs = _each(lambda pi: torch.stack([pi, pi]), p)
        rhs = _each(lambda gi, pi, k=k: torch.stack([gi << k, pi << k]), g, p)
        both = and_shares(lhs, rhs, provider)
        g = _each(lambda gi, bi: gi ^ bi[0], g, both)
        p = _each(lambda bi: bi[1], both)
    return _each(lambda pi, gi: pi ^ (gi << 1), p0, g)


def bit_to_arithmetic(bits: Sequence[torch.Tensor], provider: Worker) -> Shares:
    """Additive shares of a bit (0/1) from its XOR shares, with a random bit of ``provider``."""
    parties = _where(bits)
    n = len(parties)
    shape = tuple(bits[0].shape)
    made = remote_results(provider, "fedws.smpc.bits", [list(shape), n], [shape] * (2 * n), parties[0].owner)
    moved = move_all(made, [parties[i % n] for i in range(2 * n)])
    r_xor, r_add = moved[:n], moved[n:]
    (c,) = open_xor([b ^ r for b, r in zip(bits, r_xor)])
    sign = 1 - 2 * c
    out: Shares = []
    for i, (w, r) in enumerate(zip(parties, r_add)):
        z = r * send_value(sign, w)
        if i == 0:
            z = z + send_value(c, w)
        out.append(z)
    return out


def msb(shares: Sequence[torch.Tensor], provider: Worker) -> Shares:
    """Additive shares of the most significant bit of the shared value (1: negative)."""
    n = len(shares)
    zeros = [s * 0 for s in shares]

    def own(i: int) -> Shares:  # party i's share as an XOR sharing: it holds it, others 0
        return [shares[j] if j == i else zeros[j] for j in range(n)]

    acc = own(0)
    for i in range(1, n):
        acc = add_binary(acc, own(i), provider)
    top = [(s >> 63) & 1 for s in acc]
    return bit_to_arithmetic(top, provider)

