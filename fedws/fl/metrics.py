"""Evaluation metrics as sums: computed where the data is, added up anywhere.

A :class:`Metric` splits into two halves so that federated evaluation can keep every
example on its node. ``sums(output, target)`` runs on the node (traced into the evaluation
plan, so only allowlisted torch ops) and returns a tensor of *sums* over the examples it is
given — correct predictions, squared errors, per-bin counts. Sums add up: the coordinator
adds the nodes' sums and calls ``value(total, n)`` once, which weights every node by its
number of examples, exactly as one computation over the union of the shards would. The
same metric run on the coordinator's own test set (:func:`fedws.fl.evaluate.evaluate_metrics`)
gives the central figure.

Built-ins, by name: ``"loss"``, ``"accuracy"``, ``"mse"``, ``"mae"``, ``"auc"`` (binary,
from per-node score histograms: no per-example score leaves a node) and ``"histograms"``
(PySyft's ``histogram_predictions`` and ``histogram_target``). Nothing here does I/O.

Example:
    >>> top2 = Metric("top2", lambda out, y: (out.topk(2, dim=1).indices == y[:, None]).sum())
    >>> FedAvg(model, workers, config, metrics=["loss", "accuracy", top2])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import torch
import torch.nn.functional as F

__all__ = [
    "Metric",
    "MetricValue",
    "accuracy",
    "loss",
    "mse",
    "mae",
    "auc",
    "histograms",
    "auc_from_histograms",
    "resolve_metrics",
    "default_metric_names",
    "combine",
    "BUILTIN",
]

MetricValue: TypeAlias = float | list[float] | list[int]
"""What a metric reports: a number, or a list of counts (histograms)."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _mean(total: torch.Tensor, n: int) -> float:
    return float(total.sum()) / max(n, 1)


@dataclass(frozen=True, eq=False)
class Metric:
    """A metric that adds up across nodes.

    Attributes:
        name: the key it is reported under.
        sums: ``sums(output, target) -> tensor`` of sums over the examples given. It runs on
            the nodes inside the evaluation plan: allowlisted torch ops only, and its result
            must have the same shape whatever the number of examples.
        value: ``value(total, n)``: the figure from the sums of all nodes (``total``) and the
            number of examples behind them. Default: ``total.sum() / n`` (a mean per example).
    """

    name: str
    sums: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    value: Callable[[torch.Tensor, int], MetricValue] = _mean


def _as_float64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


def loss(loss_fn: LossFn = F.cross_entropy) -> Metric:
    """Mean of ``loss_fn`` (a mean-reduced loss) per example."""

    def sums(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _as_float64(loss_fn(out, y).detach()) * y.shape[0]

    return Metric("loss", sums)


def accuracy() -> Metric:
    """Share of examples whose argmax output is the integer label."""
    return Metric("accuracy", lambda out, y: (out.argmax(dim=1) == y).sum())


def _error_sums(out: torch.Tensor, y: torch.Tensor, power: int) -> torch.Tensor:
    diff = _as_float64(out.reshape(y.shape)) - _as_float64(y)
    err = diff.abs() if power == 1 else diff * diff
    # [sum of errors, number of entries]: a mean over every output entry, like F.mse_loss.
    return torch.stack([err.sum(), torch.ones_like(err).sum()])


def _ratio(total: torch.Tensor, n: int) -> float:
    return float(total[0]) / max(float(total[1]), 1.0)


def mse() -> Metric:
    """Mean squared error over every output entry (the output reshaped as the target)."""
    return Metric("mse", lambda out, y: _error_sums(out, y, 2), _ratio)


def mae() -> Metric:
    """Mean absolute error over every output entry."""
    return Metric("mae", lambda out, y: _error_sums(out, y, 1), _ratio)


def _positive_score(out: torch.Tensor) -> torch.Tensor:
    """The score of the positive class: softmax column 1 of two logits, else the sigmoid."""
    if out.dim() == 2 and out.shape[1] == 2:
        return torch.softmax(out, dim=1)[:, 1]
    return torch.sigmoid(out.reshape(-1))


def auc_from_histograms(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """ROC AUC from score histograms (bin ``i`` of both holds the same score range).

    A positive above a negative counts 1, the two in one bin count 1/2 (the trapezoid), so
    the error against the exact AUC is at most half the share of pairs that share a bin.
    Returns NaN when one class is absent.
    """
    p_total, n_total = float(sum(positives)), float(sum(negatives))
    if p_total == 0 or n_total == 0:
        return float("nan")
    area, neg_below = 0.0, 0.0
    for p, n in zip(positives, negatives):
        area += float(p) * (neg_below + 0.5 * float(n))
        neg_below += float(n)
    return area / (p_total * n_total)


def auc(bins: int = 100, score: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Metric:
    """Binary ROC AUC from ``bins`` equal score bins over [0, 1] (labels 0/1).

    Each node returns two histograms — positives and negatives per score bin — never a
    score. ``score(output)`` maps the output to [0, 1] (default: softmax of two logits, or
    the sigmoid of one).
    """
    if bins < 1:
        raise ValueError(f"auc needs bins >= 1, got {bins}")
    to_score = score or _positive_score

    def sums(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = to_score(out).reshape(-1)
        b = (s * bins).floor().clamp(0, bins - 1).long()
        pos = torch.bincount(b, weights=_as_float64(y.reshape(-1)), minlength=bins)
        every = torch.bincount(b, minlength=bins).to(torch.float64)
        return torch.stack([pos, every - pos])

    def value(total: torch.Tensor, n: int) -> float:
        return auc_from_histograms(total[0].tolist(), total[1].tolist())

    return Metric("auc", sums, value)


def _counts(total: torch.Tensor, n: int) -> list[int]:
    return [int(round(v)) for v in total.tolist()]


def histograms(nr_bins: int = 10) -> list[Metric]:
    """PySyft's evaluation histograms: predicted classes and targets, classes ``0..nr_bins-1``.

    Values outside that range are not counted (as ``np.histogram`` with a range).
    """
    if nr_bins < 1:
        raise ValueError(f"histograms need nr_bins >= 1, got {nr_bins}")

    def hist(values: torch.Tensor) -> torch.Tensor:
        return torch.histc(values.to(torch.float64), bins=nr_bins, min=-0.5, max=nr_bins - 0.5)

    return [
        Metric("histogram_predictions", lambda out, y: hist(out.argmax(dim=1)), _counts),
        Metric("histogram_target", lambda out, y: hist(y), _counts),
    ]


BUILTIN = ("loss", "accuracy", "mse", "mae", "auc", "histograms")
"""The names :func:`resolve_metrics` knows."""


def default_metric_names(target_dtype: torch.dtype) -> tuple[str, ...]:
    """The metrics of a task, read from its targets: regression (float targets) reports
    loss, MSE and MAE; classification (integer labels) loss and accuracy."""
    if target_dtype.is_floating_point:
        return ("loss", "mse", "mae")
    return ("loss", "accuracy")


def resolve_metrics(
    metrics: Sequence[str | Metric] | None,
    *,
    loss_fn: LossFn = F.cross_entropy,
    target_dtype: torch.dtype = torch.int64,
    nr_bins: int = 10,
    auc_bins: int = 100,
) -> list[Metric]:
    """Metric objects for names (``"loss"``, ``"accuracy"``, ...) and user metrics.

    ``None`` or empty picks by task (:func:`default_metric_names`).

    Raises:
        ValueError: an unknown name, or two metrics reporting under one name.
    """
    chosen: Sequence[str | Metric] = metrics or default_metric_names(target_dtype)
    out: list[Metric] = []
    for m in chosen:
        if isinstance(m, Metric):
            out.append(m)
        elif m == "loss":
            out.append(loss(loss_fn))
        elif m == "accuracy":
            out.append(accuracy())
        elif m == "mse":
            out.append(mse())
        elif m == "mae":
            out.append(mae())
        elif m == "auc":
            out.append(auc(auc_bins))
        elif m == "histograms":
            out.extend(histograms(nr_bins))
        else:
            raise ValueError(f"unknown metric {m!r}: use one of {BUILTIN} or a Metric")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ValueError(f"two metrics report under one name: {names}")
    return out


def combine(metrics: Sequence[Metric], totals: Sequence[Sequence[torch.Tensor]], counts: Sequence[int]) -> dict[str, MetricValue]:
    """The figures of several shards together: their sums added, weighted by nothing but
    their example counts (``totals[k][i]``: shard ``k``'s sums for ``metrics[i]``)."""
    n = int(sum(counts))
    out: dict[str, MetricValue] = {}
    for i, m in enumerate(metrics):
        parts = [t[i].detach().to("cpu") for t in totals]
        total = parts[0].to(torch.float64).clone()
        for p in parts[1:]:
            total = total + p.to(torch.float64)
        out[m.name] = m.value(total, n)
    return out
