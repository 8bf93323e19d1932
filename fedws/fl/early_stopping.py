"""Early stopping on a round metric, keeping the best model seen.

After every round :class:`fedws.fl.FedAvg` hands the round's metrics and the global model
to :meth:`EarlyStopping.update`; it answers whether to stop. The best model is kept in
memory and, with ``checkpoint_dir``, saved there as a regular checkpoint
(:func:`fedws.fl.checkpoint.save_checkpoint`, readable with ``load_checkpoint``), so the
model worth deploying survives the run even when later rounds got worse.

Example:
    >>> stop = EarlyStopping("test_loss", patience=3, mode="min", checkpoint_dir="best/")
    >>> FedAvg(model, nodes, FedAvgConfig(rounds=50, early_stopping=stop), test_data=(x, y)).fit()
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .checkpoint import save_checkpoint
from .history import History, RoundMetrics

__all__ = ["EarlyStopping", "metric_value"]


def metric_value(metrics: RoundMetrics, name: str) -> float | None:
    """The round's value of ``name``: an attribute (``test_loss``, ``test_accuracy``,
    ``train_loss``) or an entry of a ``metrics`` / ``federated_metrics`` dict if the
    round has one. None when the round did not measure it."""
    value = getattr(metrics, name, None)
    if value is None:
        for holder in ("metrics", "federated_metrics", "federated"):
            extra = getattr(metrics, holder, None)
            if isinstance(extra, Mapping) and name in extra:
                value = extra[name]
                break
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


@dataclass
class EarlyStopping:
    """Stop once ``metric`` has not improved for ``patience`` rounds in a row.

    Attributes:
        metric: the round metric watched (see :func:`metric_value`).
        patience: rounds without improvement tolerated before stopping.
        mode: ``"min"`` (a loss) or ``"max"`` (an accuracy).
        min_delta: an improvement must beat the best by more than this.
        checkpoint_dir: save the best model there (a checkpoint directory).
        restore_best: load the best model into the trained model when the run ends.
        best: the best value so far; ``best_round`` its round; ``best_state`` its model.
        stopped_round: the round after which the run stopped early (None: it did not).

    It keeps state (the best so far): use a new one for each run.
    """

    metric: str = "test_loss"
    patience: int = 3
    mode: Literal["min", "max"] = "min"
    min_delta: float = 0.0
    checkpoint_dir: str | os.PathLike[str] | None = None
    restore_best: bool = True
    best: float | None = field(default=None, init=False)
    best_round: int | None = field(default=None, init=False)
    best_state: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False)
    stopped_round: int | None = field(default=None, init=False)
    _waited: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")

    def improved(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta``."""
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(
        self,
        metrics: RoundMetrics,
        state: Mapping[str, torch.Tensor],
        history: History | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> bool:
        """Record a finished round; True means stop now.

        Raises:
            ValueError: the round did not measure ``metric`` (say ``test_loss`` without
                ``test_data``), or measured NaN.
        """
        value = metric_value(metrics, self.metric)
        if value is None or math.isnan(value):
            raise ValueError(
                f"early stopping watches {self.metric!r}, which round {metrics.round} did not report "
                f"(got {value}); pass test_data or choose another metric"
            )
        if self.improved(value):
            self.best, self.best_round, self._waited = value, metrics.round, 0
            self.best_state = {k: v.detach().clone() for k, v in state.items()}
            if self.checkpoint_dir is not None:
                save_checkpoint(self.checkpoint_dir, self.best_state, metrics.round, history, config)
            return False
        self._waited += 1
        if self._waited >= self.patience:
            self.stopped_round = metrics.round
            return True
        return False

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values (saved with a run's config)."""
        return {
            "metric": self.metric,
            "patience": self.patience,
            "mode": self.mode,
            "min_delta": self.min_delta,
            "checkpoint_dir": None if self.checkpoint_dir is None else os.fspath(self.checkpoint_dir),
            "restore_best": self.restore_best,
        }
