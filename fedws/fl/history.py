"""History: what each federated round did, for printing, plotting and checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RoundMetrics", "History"]


@dataclass
class RoundMetrics:
    """One round.

    Attributes:
        round: 1-based round number.
        train_loss: mean local training loss over every example seen this round, weighted
            by sample counts (None if no node reported it).
        test_loss: loss of the averaged model on the coordinator's held-out test set.
        test_accuracy: its accuracy there (None without a test set).
        nodes: ids of the nodes whose update went into the average.
        dropped: node id -> why it was left out of this round.
        num_examples: training examples behind the average.
        seconds: wall time of the round.
        epsilon: privacy spent so far at the run's ``DPConfig.delta`` (None without DP).
    """

    round: int
    train_loss: float | None
    test_loss: float | None = None
    test_accuracy: float | None = None
    nodes: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    num_examples: int = 0
    seconds: float = 0.0
    epsilon: float | None = None


class History:
    """The rounds of a run, in order. Iterable; ``history[-1]`` is the last round."""

    def __init__(self, rounds: list[RoundMetrics] | None = None) -> None:
        self.rounds: list[RoundMetrics] = list(rounds or [])

    def append(self, metrics: RoundMetrics) -> None:
        self.rounds.append(metrics)

    def __len__(self) -> int:
        return len(self.rounds)

    def __iter__(self) -> Iterator[RoundMetrics]:
        return iter(self.rounds)

    def __getitem__(self, index: int) -> RoundMetrics:
        return self.rounds[index]

    @property
    def train_losses(self) -> list[float | None]:
        return [r.train_loss for r in self.rounds]

    @property
    def test_accuracies(self) -> list[float | None]:
        return [r.test_accuracy for r in self.rounds]

    @property
    def test_losses(self) -> list[float | None]:
        return [r.test_loss for r in self.rounds]

    @property
    def epsilons(self) -> list[float | None]:
        return [r.epsilon for r in self.rounds]

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": [asdict(r) for r in self.rounds]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        return cls([RoundMetrics(**r) for r in data.get("rounds", [])])

    def __repr__(self) -> str:
        if not self.rounds:
            return "History(0 rounds)"
        last = self.rounds[-1]
        return f"History({len(self)} rounds, last train_loss={last.train_loss}, test_accuracy={last.test_accuracy})"
