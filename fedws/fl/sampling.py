"""Which nodes take part in a round: seeded draws, so runs are reproducible.

Every sampler depends only on its arguments and ``(seed, round_number)``, never on a global
random state, so resuming a run from a checkpoint selects the same nodes the uninterrupted
run would have. Each returns the chosen nodes in their original order.

- :func:`sample_nodes` — ``count`` nodes uniformly at random (the default, ``"uniform"``);
- :func:`sample_fraction` — a share of the nodes, uniformly;
- :func:`sample_weighted` — ``count`` nodes, each drawn with probability proportional to a
  weight such as its number of examples (Efraimidis & Spirakis 2006);
- :func:`sample_round_robin` — consecutive blocks of ``count``, in turn, so every node
  takes part equally often.

:func:`select_nodes` picks one by name (``FedAvgConfig(sampling=...)``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TypeVar

__all__ = [
    "SAMPLING_METHODS",
    "sample_nodes",
    "sample_fraction",
    "sample_weighted",
    "sample_round_robin",
    "select_nodes",
]

T = TypeVar("T")

SAMPLING_METHODS = ("uniform", "weighted", "round_robin")


def sample_nodes(nodes: Sequence[T], count: int, *, seed: int, round_number: int) -> list[T]:
    """Pick ``count`` of ``nodes`` without replacement, in their original order.

    The draw depends only on ``(seed, round_number)``, so resuming a run from a checkpoint
    selects the same nodes the uninterrupted run would have.
    """
    if count >= len(nodes):
        return list(nodes)
    rng = random.Random(f"{seed}:{round_number}")
    chosen = set(rng.sample(range(len(nodes)), count))
    return [n for i, n in enumerate(nodes) if i in chosen]


def sample_fraction(
    nodes: Sequence[T], fraction: float, *, seed: int, round_number: int, minimum: int = 1
) -> list[T]:
    """``ceil(fraction * len(nodes))`` nodes (at least ``minimum``), drawn like :func:`sample_nodes`."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    count = max(math.ceil(fraction * len(nodes)), minimum)
    return sample_nodes(nodes, count, seed=seed, round_number=round_number)


def sample_weighted(
    nodes: Sequence[T], count: int, weights: Sequence[float], *, seed: int, round_number: int
) -> list[T]:
    """``count`` nodes without replacement, the likelier the larger their weight.

    Each node draws the key ``u ** (1 / w)`` with ``u`` uniform in (0, 1) and the largest
    keys win, which is sampling proportional to ``w`` one node at a time. A node of weight
    0 is only taken when fewer than ``count`` nodes have a positive weight.

    Raises:
        ValueError: ``weights`` is not one non-negative finite number per node.
    """
    if len(weights) != len(nodes):
        raise ValueError(f"sample_weighted: {len(weights)} weights for {len(nodes)} nodes")
    for w in weights:
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"sample_weighted: weights must be finite and >= 0, got {w}")
    if count >= len(nodes):
        return list(nodes)
    rng = random.Random(f"{seed}:{round_number}:weighted")
    keys = []
    for i, w in enumerate(weights):
        u = rng.random() or 1e-300
        keys.append((u ** (1.0 / w) if w > 0 else -1.0 + u * 1e-9, -i))
    chosen = {-i for _, i in sorted(keys, reverse=True)[:count]}
    return [n for i, n in enumerate(nodes) if i in chosen]


def sample_round_robin(nodes: Sequence[T], count: int, *, seed: int, round_number: int) -> list[T]:
    """Round ``r`` takes the ``count`` nodes after those of round ``r - 1``, wrapping around.

    ``seed`` shifts where round 1 starts. Over ``len(nodes)`` rounds every node takes part
    exactly ``count`` times.
    """
    n = len(nodes)
    if count >= n:
        return list(nodes)
    start = ((round_number - 1) * count + seed) % n
    chosen = {(start + k) % n for k in range(count)}
    return [node for i, node in enumerate(nodes) if i in chosen]


def select_nodes(
    method: str,
    nodes: Sequence[T],
    count: int,
    *,
    seed: int,
    round_number: int,
    weights: Sequence[float] | None = None,
) -> list[T]:
    """Select ``count`` nodes by ``method`` (one of :data:`SAMPLING_METHODS`).

    ``weights`` (one per node) is needed by ``"weighted"`` and ignored by the others.

    Raises:
        ValueError: an unknown method, or ``"weighted"`` without weights.
    """
    if method == "uniform":
        return sample_nodes(nodes, count, seed=seed, round_number=round_number)
    if method == "round_robin":
        return sample_round_robin(nodes, count, seed=seed, round_number=round_number)
    if method == "weighted":
        if weights is None:
            raise ValueError("weighted sampling needs one weight per node")
        return sample_weighted(nodes, count, weights, seed=seed, round_number=round_number)
    raise ValueError(f"unknown sampling method {method!r}; known: {', '.join(SAMPLING_METHODS)}")
