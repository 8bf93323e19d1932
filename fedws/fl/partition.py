"""Partitioners for experiments: which examples each client gets, as pure functions.

Each returns one list of example indices per client. Every index of the dataset appears
exactly once across the clients, and the same ``seed`` gives the same split. They take
sizes and labels, not data, so they are tested without torch or a network, as
flwr-datasets' partitioners are; the result feeds ``dataset.federate(workers, partition=...)``.

- :func:`iid`: shuffled, near-equal parts.
- :func:`dirichlet`: label skew; each class is split across clients by proportions drawn
  from Dirichlet(``alpha``) (small ``alpha``: each client sees few classes).
- :func:`shards`: sort by label, cut into ``num_clients * shards_per_client`` shards, deal
  each client ``shards_per_client`` of them (McMahan et al., 2017).
- :func:`quantity_skew`: the amount varies: part sizes drawn from Dirichlet(``alpha``).

Example:
    >>> from fedws.fl.partition import dirichlet
    >>> parts = dirichlet(labels, num_clients=3, alpha=0.5, seed=0)
    >>> fd = sy.BaseDataset(x, labels).federate((alice, bob, carol), partition=parts)
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["iid", "dirichlet", "shards", "quantity_skew", "split_counts"]


def _check(num_clients: int, alpha: float | None = None) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")


def _labels(labels: Iterable[Any]) -> list[int]:
    tolist = getattr(labels, "tolist", None)  # a tensor or array: one conversion, not n
    return [int(v) for v in (tolist() if tolist is not None else labels)]


def split_counts(total: int, weights: Sequence[float]) -> list[int]:
    """Integer counts summing to ``total``, proportional to ``weights`` (largest remainder).

    Ties go to the lower index, so the result is deterministic. All-zero weights: even.
    """
    if total < 0:
        raise ValueError("total must be >= 0")
    s = float(sum(weights))
    if s <= 0:
        weights, s = [1.0] * len(weights), float(len(weights))
    exact = [total * w / s for w in weights]
    counts = [int(e) for e in exact]
    rest = total - sum(counts)
    order = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[:rest]:
        counts[i] += 1
    return counts


def _cut(indices: list[int], counts: Sequence[int]) -> list[list[int]]:
    out, start = [], 0
    for c in counts:
        out.append(indices[start : start + c])
        start += c
    return out


def _dirichlet(rng: random.Random, alpha: float, k: int) -> list[float]:
    draws = [rng.gammavariate(alpha, 1.0) for _ in range(k)]
    s = sum(draws)
    if s <= 0:  # every draw underflowed (tiny alpha): all mass on one client
        draws = [0.0] * k
        draws[rng.randrange(k)] = 1.0
        s = 1.0
    return [d / s for d in draws]


def iid(num_examples: int, num_clients: int, seed: int | None = None) -> list[list[int]]:
    """Shuffled indices cut into parts whose sizes differ by at most one."""
    _check(num_clients)
    indices = list(range(num_examples))
    random.Random(seed).shuffle(indices)
    return _cut(indices, split_counts(num_examples, [1.0] * num_clients))


def dirichlet(labels: Iterable[Any], num_clients: int, alpha: float, seed: int | None = None) -> list[list[int]]:
    """Label skew: each class's examples split by proportions drawn from Dirichlet(alpha).

    Args:
        labels: one integer label per example (a list or a tensor).
        num_clients: how many parts.
        alpha: concentration; large is close to IID, small gives each client few classes.
        seed: the same seed, the same split.
    """
    _check(num_clients, alpha)
    ys = _labels(labels)
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(ys):
        by_class.setdefault(y, []).append(i)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for y in sorted(by_class):
        members = by_class[y]
        rng.shuffle(members)
        counts = split_counts(len(members), _dirichlet(rng, alpha, num_clients))
        for part, chunk in zip(parts, _cut(members, counts)):
            part.extend(chunk)
    for part in parts:
        rng.shuffle(part)
    return parts


def shards(
    labels: Iterable[Any], num_clients: int, shards_per_client: int = 2, seed: int | None = None
) -> list[list[int]]:
    """Pathological non-IID: label-sorted shards, ``shards_per_client`` dealt to each client.

    Shard sizes differ by at most one, so client sizes differ by at most ``shards_per_client``.
    """
    _check(num_clients)
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be at least 1, got {shards_per_client}")
    ys = _labels(labels)
    rng = random.Random(seed)
    n_shards = num_clients * shards_per_client
    order = sorted(range(len(ys)), key=lambda i: (ys[i], i))
    pieces = _cut(order, split_counts(len(ys), [1.0] * n_shards))
    deal = list(range(n_shards))
    rng.shuffle(deal)
    return [
        [i for s in deal[c * shards_per_client : (c + 1) * shards_per_client] for i in pieces[s]]
        for c in range(num_clients)
    ]


def quantity_skew(
    num_examples: int, num_clients: int, alpha: float, seed: int | None = None, min_size: int = 0
) -> list[list[int]]:
    """Quantity skew: shuffled indices cut into parts sized by Dirichlet(alpha) proportions.

    ``min_size`` examples go to every client first (it must fit: ``min_size * num_clients
    <= num_examples``); the rest is split by the drawn proportions.
    """
    _check(num_clients, alpha)
    if min_size < 0 or min_size * num_clients > num_examples:
        raise ValueError(f"min_size {min_size} x {num_clients} clients does not fit {num_examples} examples")
    rng = random.Random(seed)
    indices = list(range(num_examples))
    rng.shuffle(indices)
    extra = split_counts(num_examples - min_size * num_clients, _dirichlet(rng, alpha, num_clients))
    return _cut(indices, [min_size + e for e in extra])
