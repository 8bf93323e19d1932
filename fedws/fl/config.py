"""FedAvgConfig: every knob of a federated training run, in one validated place."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .early_stopping import EarlyStopping
from .metrics import BUILTIN
from .sampling import SAMPLING_METHODS
from .strategies import get_strategy
from .strategy import Strategy

__all__ = ["FedAvgConfig"]


@dataclass(frozen=True)
class FedAvgConfig:
    """How a federated training run goes.

    Attributes:
        rounds: number of federated rounds (send, train locally, average).
        fraction: share of the known nodes selected each round (Flower's ``fraction_fit``).
        nodes_per_round: an exact count instead of ``fraction``; wins when both are set.
        min_nodes: a round fails unless at least this many nodes answered. Selection never
            picks fewer than this (if that many exist).
        local_epochs: passes over its shard each node makes per round.
        batch_size: local minibatch size.
        lr: learning rate of the local SGD.
        momentum: momentum of the local SGD (its state is not kept between rounds).
        keep_optimizer_state: keep each node's optimizer state (momentum, Adam moments, step
            count) on the node from one round to the next; False starts it afresh each round.
        round_timeout: seconds a round waits for the nodes; slower nodes are dropped.
        seed: seeds node selection and the order of the local minibatches, so a run is
            reproducible.
        data_tags: tags every training tensor on a node carries (``"#train"``).
        x_tag: the extra tag of the features tensor.
        y_tag: the extra tag of the labels tensor.
        secagg_threshold: with ``FedAvg(secure_aggregation=True)``, how many nodes must
            stay to unmask the sum (``n/2 < t <= n``; None: a strict majority).
        strategy: how answers become the next model: a name (``"fedavg"``, ``"fedadam"``,
            ... see :mod:`fedws.fl.strategies`) or a :class:`~fedws.fl.strategy.Strategy`.
        sampling: how nodes are picked: ``"uniform"``, ``"weighted"`` (by examples) or
            ``"round_robin"`` (see :mod:`fedws.fl.sampling`).
        early_stopping: stop on a metric and keep the best model (:class:`EarlyStopping`).
        evaluate_on_nodes: after every round, also evaluate the model on each node's
            held-out shard (tagged ``eval_tags`` plus ``x_tag`` / ``y_tag``); only sums leave.
        eval_tags: tags every held-out tensor on a node carries (``"#test"``).
        metrics: metric names (``"loss"``, ``"accuracy"``, ``"mse"``, ``"mae"``, ``"auc"``,
            ``"histograms"``); empty: by task (float targets: loss, MSE, MAE; labels: loss,
            accuracy). ``FedAvg(metrics=...)`` also takes user metrics.
    """

    rounds: int = 5
    fraction: float = 1.0
    nodes_per_round: int | None = None
    min_nodes: int = 1
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0
    keep_optimizer_state: bool = False
    round_timeout: float = 60.0
    seed: int = 0
    data_tags: tuple[str, ...] = field(default_factory=lambda: ("#train",))
    x_tag: str = "#x"
    y_tag: str = "#y"
    secagg_threshold: int | None = None
    strategy: str | Strategy = "fedavg"
    sampling: str = "uniform"
    early_stopping: EarlyStopping | None = None
    evaluate_on_nodes: bool = False
    eval_tags: tuple[str, ...] = field(default_factory=lambda: ("#test",))
    metrics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.nodes_per_round is not None and self.nodes_per_round < 1:
            raise ValueError(f"nodes_per_round must be >= 1, got {self.nodes_per_round}")
        if self.min_nodes < 1:
            raise ValueError(f"min_nodes must be >= 1, got {self.min_nodes}")
        if self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("local_epochs and batch_size must be >= 1")
        if self.lr <= 0 or self.round_timeout <= 0:
            raise ValueError("lr and round_timeout must be > 0")
        object.__setattr__(self, "data_tags", tuple(self.data_tags))
        get_strategy(self.strategy)  # an unknown name fails here, not in round 1
        if self.sampling not in SAMPLING_METHODS:
            raise ValueError(f"sampling must be one of {SAMPLING_METHODS}, got {self.sampling!r}")
        object.__setattr__(self, "eval_tags", tuple(self.eval_tags))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        unknown = [m for m in self.metrics if m not in BUILTIN]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}: use {BUILTIN} (user metrics go to FedAvg(metrics=...))")

    def nodes_to_select(self, available: int) -> int:
        """How many of ``available`` nodes a round selects."""
        wanted = self.nodes_per_round if self.nodes_per_round is not None else math.ceil(self.fraction * available)
        return min(available, max(wanted, self.min_nodes))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (saved with checkpoints)."""
        d = asdict(self)
        d["data_tags"] = list(self.data_tags)
        d["strategy"] = self.strategy if isinstance(self.strategy, str) else self.strategy.name
        d["early_stopping"] = None if self.early_stopping is None else self.early_stopping.to_dict()
        d["eval_tags"] = list(self.eval_tags)
        d["metrics"] = list(self.metrics)
        return d
