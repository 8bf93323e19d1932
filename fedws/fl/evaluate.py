"""Scoring a model on a local held-out set (the coordinator's own test data)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["evaluate"]


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
