"""History: what each federated round did, for printing, plotting and checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
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
        test_accuracy: its accuracy there (None without a test set, or for a task without
            accuracy: a regression reports ``test_metrics["mse"]`` instead).
        nodes: ids of the nodes whose update went into the average.
        dropped: node id -> why it was left out of this round.
        num_examples: training examples behind the average.
        seconds: wall time of the round.
        epsilon: privacy spent so far at the run's ``DPConfig.delta`` (None without DP).
        test_metrics: every metric on the coordinator's test set (centralized evaluation).
        federated_metrics: every metric over the nodes' held-out shards together (federated
            evaluation: their sums added, so weighted by example counts).
        node_metrics: node id -> its own figures and ``num_examples``.
        eval_dropped: node id -> why it is missing from the federated evaluation.
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
    test_metrics: dict[str, Any] = field(default_factory=dict)
    federated_metrics: dict[str, Any] = field(default_factory=dict)
    node_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_dropped: dict[str, str] = field(default_factory=dict)


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
    def metric(self, name: str, *, federated: bool = False) -> list[Any]:
        """``name`` per round, central (default) or federated; None where a round lacks it."""
        return [(r.federated_metrics if federated else r.test_metrics).get(name) for r in self.rounds]

    def node_metric(self, node: str, name: str) -> list[Any]:
        """One node's own ``name`` per round (None where it was not evaluated)."""
        return [r.node_metrics.get(node, {}).get(name) for r in self.rounds]

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": [asdict(r) for r in self.rounds]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        # Older checkpoints lack the evaluation fields (their defaults apply); fields this
        # version does not know are skipped rather than failing a resume.
        known = {f.name for f in fields(RoundMetrics)}
        return cls([RoundMetrics(**{k: v for k, v in r.items() if k in known}) for r in data.get("rounds", [])])

    def __repr__(self) -> str:
        if not self.rounds:
            return "History(0 rounds)"
        last = self.rounds[-1]
        scores = {**last.federated_metrics, **last.test_metrics}
        if last.test_accuracy is not None or not scores:
            score = f"test_accuracy={last.test_accuracy}"
        else:
            name = next(iter(scores))
            score = f"{name}={scores[name]}"
        return f"History({len(self)} rounds, last train_loss={last.train_loss}, {score})"
