"""Multiplying two shared values with a Beaver triple (SPDZ's online phase).

The crypto provider draws ``a``, ``b`` and ``c = a*b`` (or ``a @ b``) on its own node,
from its own CSPRNG, and keeps only their shares (``fedws.smpc.triple``, see
:mod:`fedws.node.random_shares`). The coordinator holds pointers to those shares and moves
each party's to that party node to node, so it never holds a triple, nor even one share.

Then, with ``x`` and ``y`` shared among the parties:

1. each party computes its shares of ``e = x - a`` and ``d = y - b``;
2. the coordinator opens ``e`` and ``d`` by summing the parties' shares of them (the masks
   are uniform: ``a`` and ``b`` are uniform and the coordinator never sees them), and sends
   them to every party;
3. each party computes its share ``z_i = c_i + e*b_i + a_i*d``, and party 0 adds ``e*d``;
   the shares of ``z`` sum to ``x*y``.

Who sees what: the parties see their own shares and ``e``, ``d``; the crypto provider sees
the triple; the coordinator sees ``e`` and ``d``. ``x`` is revealed only to someone who
knows ``a`` as well as ``e`` — the crypto provider colluding with a party or the
coordinator — which is the trust SPDZ with a dealer asks for (PySyft's too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..client.worker import Worker
from ..node.random_shares import triple_shapes
from ..pointers import PointerTensor
from .ring import gather, move_all, remote_results, send_value

__all__ = ["request_triple", "beaver_product", "open_shares"]

_OPS: dict[str, Callable[..., Any]] = {"mul": torch.mul, "matmul": torch.matmul}


def request_triple(
    provider: Worker, kind: str, shape_a: Sequence[int], shape_b: Sequence[int], parties: Sequence[Worker]
) -> tuple[list[PointerTensor], list[PointerTensor], list[PointerTensor]]:
    """Shares of a fresh triple for ``parties``, moved from ``provider`` to each of them.

    Returns ``(a_shares, b_shares, c_shares)``, one pointer per party, each on its party.
    """
    n = len(parties)
    _, sa, sb, sc = triple_shapes(kind, list(shape_a), list(shape_b))
    shapes = [sa] * n + [sb] * n + [sc] * n
    made = remote_results(provider, "fedws.smpc.triple", [kind, list(sa), list(sb), n], shapes, parties[0].owner)
    ptrs = move_all(made, [parties[i % n] for i in range(3 * n)])
    return ptrs[:n], ptrs[n:2 * n], ptrs[2 * n:]


def open_shares(shares: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum the parties' shares of a masked value (this reveals it: use only on masks)."""
    ptrs = [s for s in shares if isinstance(s, PointerTensor)]
    if len(ptrs) != len(shares):
        raise TypeError("open_shares: every share is a pointer to a party's tensor")
    values = gather(ptrs)
    out = values[0].clone()
    for v in values[1:]:
        out.add_(v)
    return out


def beaver_product(
    xs: Sequence[PointerTensor], ys: Sequence[PointerTensor], provider: Worker, kind: str
) -> list[torch.Tensor]:
    """Shares of ``x * y`` (``kind="mul"``) or ``x @ y`` (``"matmul"``), one per party, from
    the parties' shares ``xs`` and ``ys`` (in the same party order) and a triple of ``provider``."""
    parties = [p.location for p in xs]
    op = _OPS[kind]
    shape_x, shape_y = tuple(xs[0].shape), tuple(ys[0].shape)
    a, b, c = request_triple(provider, kind, shape_x, shape_y, parties)
    e = open_shares([xi - ai for xi, ai in zip(xs, a)])
    d = open_shares([yi - bi for yi, bi in zip(ys, b)])
    ed = op(e, d)
    out = []
    for i, (w, ai, bi, ci) in enumerate(zip(parties, a, b, c)):
        zi = ci + op(send_value(e, w), bi) + op(ai, send_value(d, w))
        if i == 0:
            zi = zi + send_value(ed, w)
        out.append(zi)
    return out
