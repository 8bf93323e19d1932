"""The Strategy hooks: what the round loop asks of whoever decides how a round goes.

:class:`fedws.fl.FedAvg` runs the rounds (send, train on every node at once, wait, drop the
slow); a :class:`Strategy` decides the three things that vary between federated learning
algorithms, in the manner of Flower's strategies:

- :meth:`Strategy.configure_fit` — what each selected node is told for this round (a
  learning-rate schedule, FedProx's ``"proximal_mu"``);
- :meth:`Strategy.aggregate_fit` — how the nodes' trained models become the next global
  model (a weighted mean, a median, Krum, a server optimizer step);
- :meth:`Strategy.aggregate_evaluate` — how the nodes' evaluation metrics become one set.

A user strategy is a subclass overriding any of them. The arithmetic lives in pure
functions (:mod:`fedws.fl.strategies`), so it is tested without a network.

Round-config contract (between a strategy and the local training step): ``configure_fit``
returns, per node id, a dict of plain JSON-able values for that node's round. Reserved key:

- ``"proximal_mu"`` (float): FedProx's proximal term; the local step adds
  ``mu / 2 * ||w - w_global||^2`` to its loss, ``w_global`` being the model the round
  started from. Absent or 0: plain local training.

Any other key (say ``"lr"`` for a schedule) is for the training step to read if it wants. :attr:`fedws.fl.FedAvg.fit_configs`
holds the current round's dicts.

Example:
    >>> class Halve(Strategy):
    ...     def aggregate_fit(self, round_number, results, current):
    ...         return {k: (current[k] + results[0].state[k]) / 2 for k in current}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch

from .aggregate import StateDict, fedavg, fedavg_weights

__all__ = ["FitResult", "EvaluateResult", "Strategy", "WeightedAverageStrategy", "FitConfigFn"]

FitConfigFn = Callable[[int], Mapping[str, Any]]


class FitResult(NamedTuple):
    """One node's answer to a training round.

    Attributes:
        node_id: the node.
        state: its trained model's state dict (local tensors).
        num_examples: the examples its shard holds (the FedAvg weight).
        metrics: what it reported, e.g. ``{"train_loss": 0.31}``.
    """

    node_id: str
    state: StateDict
    num_examples: int
    metrics: Mapping[str, float]


class EvaluateResult(NamedTuple):
    """One node's answer to an evaluation round: example count and its metrics."""

    node_id: str
    num_examples: int
    metrics: Mapping[str, float]


class Strategy:
    """Base class of every strategy; override the hooks you need.

    Args:
        on_fit_config: ``round_number -> dict`` sent to every selected node that round
            (Flower's ``on_fit_config_fn``), e.g. ``lambda r: {"lr": 0.1 * 0.9 ** r}``.
    """

    #: the name :func:`fedws.fl.strategies.get_strategy` knows it by (saved in checkpoints).
    name: ClassVar[str] = "custom"

    def __init__(self, *, on_fit_config: FitConfigFn | None = None) -> None:
        self.on_fit_config = on_fit_config

    def configure_fit(self, round_number: int, nodes: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Per selected node id, the round config it trains with (see the module docstring)."""
        base = dict(self.on_fit_config(round_number)) if self.on_fit_config is not None else {}
        return {node: dict(base) for node in nodes}

    def aggregate_fit(
        self, round_number: int, results: Sequence[FitResult], current: StateDict
    ) -> dict[str, torch.Tensor]:
        """The next global model from the nodes' trained models.

        Args:
            round_number: 1-based.
            results: one per node that answered, in no promised order.
            current: the global model the nodes started from (server optimizers step
                from it). Do not modify it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement aggregate_fit")

    def aggregate_evaluate(self, round_number: int, results: Sequence[EvaluateResult]) -> dict[str, float]:
        """Every numeric metric averaged over the nodes, weighted by their example counts.

        A metric only some nodes report is averaged over those nodes.
        """
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for r in results:
            for key, value in r.metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    sums[key] = sums.get(key, 0.0) + float(value) * r.num_examples
                    counts[key] = counts.get(key, 0) + r.num_examples
        return {k: sums[k] / counts[k] for k in sums if counts[k] > 0}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class WeightedAverageStrategy(Strategy):
    """A strategy that needs only the example-weighted average of the nodes' models.

    Such a strategy also works with a trusted aggregator (``FedAvg(..., aggregator=)``):
    the average is computed there and only :meth:`apply_average` runs on the coordinator,
    which never sees an individual model. FedAvg, FedProx, FedAvgM and the adaptive
    server optimizers (FedAdam, FedYogi, FedAdagrad) are all of this kind.
    """

    name: ClassVar[str] = "fedavg"

    def aggregate_fit(
        self, round_number: int, results: Sequence[FitResult], current: StateDict
    ) -> dict[str, torch.Tensor]:
        average = fedavg([(r.state, r.num_examples) for r in results])
        return self.apply_average(round_number, current, average)

    def apply_average(self, round_number: int, current: StateDict, average: StateDict) -> dict[str, torch.Tensor]:
        """The next global model from the weighted average; plain FedAvg takes it as is."""
        return dict(average)

    @staticmethod
    def weights(results: Sequence[FitResult]) -> list[float]:
        """Each result's share of the average (its examples over the total)."""
        return fedavg_weights([r.num_examples for r in results])
