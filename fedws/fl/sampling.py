"""Which nodes take part in a round: a seeded draw, so runs are reproducible."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

__all__ = ["sample_nodes"]

T = TypeVar("T")


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
