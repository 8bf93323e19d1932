"""Centralized evaluation: scoring a model on a held-out set the coordinator holds.

:func:`evaluate_metrics` runs the same :class:`~fedws.fl.metrics.Metric` sums a node runs
in federated evaluation, here over the coordinator's own tensors, so the central and the
federated figures are computed alike and can be put side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .metrics import Metric, MetricValue, combine

__all__ = ["evaluate", "evaluate_metrics"]


@torch.no_grad()
def evaluate_metrics(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    metrics: Sequence[Metric],
    batch_size: int = 1024,
) -> dict[str, MetricValue]:
    """``metrics`` of ``model`` on ``(x, y)``, batch by batch, the model in eval mode."""
    was_training = model.training
    model.eval()
    n = int(y.shape[0])
    totals: list[list[torch.Tensor]] = []
    counts: list[int] = []
    try:
        for lo in range(0, n, batch_size):
            out = model(x[lo : lo + batch_size])
            target = y[lo : lo + batch_size]
            totals.append([m.sums(out, target) for m in metrics])
            counts.append(int(target.shape[0]))
    finally:
        model.train(was_training)
    if not totals:
        return {}
    return combine(metrics, totals, counts)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int = 1024,
) -> tuple[float, float]:
    """Mean loss and accuracy (argmax of the output against integer labels)."""
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, int(y.shape[0])
    try:
        for lo in range(0, n, batch_size):
            out = model(x[lo : lo + batch_size])
            target = y[lo : lo + batch_size]
            total_loss += float(loss_fn(out, target)) * int(target.shape[0])
            correct += int((out.argmax(dim=1) == target).sum())
    finally:
        model.train(was_training)
    return total_loss / max(n, 1), correct / max(n, 1)
