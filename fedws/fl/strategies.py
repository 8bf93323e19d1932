"""Strategies beyond FedAvg: pure aggregation functions and the strategies built on them.

Pure functions (state dicts or tensors in, tensors out, no I/O, inputs never modified):

- :func:`coordinate_median` / :func:`fedmedian` — coordinate-wise median (Yin et al. 2018);
- :func:`trimmed_mean` / :func:`fedtrimmedavg` — drop the ``beta`` share of largest and
  smallest values per coordinate, average the rest (Yin et al. 2018);
- :func:`krum_select` / :func:`krum` — Krum and multi-Krum (Blanchard et al. 2017);
- :func:`fedavgm_step` — server momentum on the pseudo-gradient (Hsu et al. 2019);
- :func:`adaptive_step` — FedAdam, FedYogi, FedAdagrad (Reddi et al. 2021).

The weighted mean is :func:`fedws.fl.aggregate.fedavg`. Every function computes in float64
and casts back to each entry's dtype (integers rounded, bools by majority), so shapes and
dtypes are kept. Server optimizers only move floating-point entries; other entries (a
BatchNorm's ``num_batches_tracked``) take the average.

Strategies are selectable by name (:data:`STRATEGIES`, :func:`get_strategy`) or object.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch

from .aggregate import StateDict, validate_updates
from .strategy import FitConfigFn, FitResult, Strategy, WeightedAverageStrategy

__all__ = [
    "coordinate_median",
    "fedmedian",
    "trimmed_mean",
    "fedtrimmedavg",
    "krum_select",
    "krum",
    "fedavgm_step",
    "adaptive_step",
    "FedAvgStrategy",
    "FedProx",
    "FedAvgM",
    "FedAdam",
    "FedYogi",
    "FedAdagrad",
    "FedMedian",
    "FedTrimmedAvg",
    "Krum",
    "STRATEGIES",
    "get_strategy",
    "strategy_names",
]

Adaptive = Literal["adam", "yogi", "adagrad"]


# -- helpers ------------------------------------------------------------------------------


def _wide(value: torch.Tensor) -> torch.Tensor:
    if value.dtype.is_complex:
        raise ValueError("robust aggregation of complex tensors is not defined")
    return value.detach().to(torch.float64)


def _cast_back(total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return total.to(dtype)
    if dtype == torch.bool:
        return total >= 0.5
    return total.round().to(dtype)


def _stack(values: Sequence[torch.Tensor]) -> torch.Tensor:
    if not values:
        raise ValueError("aggregation needs at least one value")
    return torch.stack([_wide(v) for v in values])


def _check_states(states: Sequence[StateDict]) -> None:
    validate_updates([(s, 1) for s in states])


# -- robust aggregation -------------------------------------------------------------------


def coordinate_median(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The median of each coordinate over ``values`` (mean of the two middle ones when even).

    One update of any magnitude moves no coordinate past the other updates' range.

    Example:
        >>> coordinate_median([torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([1e9])])
        tensor([2.])
    """
    stacked, _ = _stack(values).sort(dim=0)
    n = stacked.shape[0]
    median = (stacked[(n - 1) // 2] + stacked[n // 2]) / 2
    return _cast_back(median, values[0].dtype)


def fedmedian(states: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """:func:`coordinate_median` of every entry of the state dicts (FedMedian)."""
    _check_states(states)
    return {k: coordinate_median([s[k] for s in states]) for k in states[0]}


def trimmed_mean(values: Sequence[torch.Tensor], beta: float) -> torch.Tensor:
    """Per coordinate, drop the ``floor(beta * n)`` largest and smallest values, average the rest.

    Raises:
        ValueError: ``beta`` not in [0, 0.5), or it would trim every value.
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed mean: beta must be in [0, 0.5), got {beta}")
    stacked, _ = _stack(values).sort(dim=0)
    n = stacked.shape[0]
    cut = int(beta * n)
    if n - 2 * cut < 1:
        raise ValueError(f"trimmed mean: beta={beta} trims all {n} values")
    return _cast_back(stacked[cut : n - cut].mean(dim=0), values[0].dtype)


def fedtrimmedavg(states: Sequence[StateDict], beta: float = 0.2) -> dict[str, torch.Tensor]:
    """:func:`trimmed_mean` of every entry of the state dicts."""
    _check_states(states)
    return {k: trimmed_mean([s[k] for s in states], beta) for k in states[0]}


def krum_select(states: Sequence[StateDict], f: int, m: int = 1) -> list[int]:
    """Indices of the ``m`` updates Krum trusts most (Blanchard et al. 2017).

    Each update is scored by the summed squared distance to its ``n - f - 2`` nearest
    other updates; with at most ``f`` byzantine updates among ``n > 2f + 2``, the
    lowest-scored ones are close to the honest majority. Equal scores are broken by the
    updates' values, so the choice does not depend on the order the nodes answered in.

    Raises:
        ValueError: ``n <= 2f + 2`` (Krum's guarantee needs more updates), or ``m`` not
            in ``[1, n]``.
    """
    _check_states(states)
    n = len(states)
    if f < 0:
        raise ValueError(f"krum: f must be >= 0, got {f}")
    if n <= 2 * f + 2:
        raise ValueError(f"krum: {n} updates cannot tolerate f={f} byzantine ones (needs n > 2f + 2)")
    if not 1 <= m <= n:
        raise ValueError(f"krum: m must be in [1, {n}], got {m}")
    keys = list(states[0])
    flat = [torch.cat([_wide(s[k]).flatten() for k in keys]) for s in states]
    distances = [[float((a - b).pow(2).sum()) for b in flat] for a in flat]  # pairwise, order-free
    neighbours = n - f - 2
    scores = [sum(sorted(d for j, d in enumerate(row) if j != i)[:neighbours]) for i, row in enumerate(distances)]

    def compare(i: int, j: int) -> int:  # equal scores: the smaller vector first, not the lower index
        if scores[i] != scores[j]:
            return -1 if scores[i] < scores[j] else 1
        differ = (flat[i] != flat[j]).nonzero()
        if len(differ) == 0:
            return (i > j) - (i < j)
        at = int(differ[0, 0])
        return -1 if flat[i][at] < flat[j][at] else 1

    return sorted(range(n), key=functools.cmp_to_key(compare))[:m]


def krum(states: Sequence[StateDict], f: int, m: int = 1) -> dict[str, torch.Tensor]:
    """The unweighted mean of the ``m`` updates :func:`krum_select` picks (Krum when m=1)."""
    chosen = krum_select(states, f, m)
    return {
        k: _cast_back(torch.stack([_wide(states[i][k]) for i in chosen]).mean(dim=0), states[0][k].dtype)
        for k in states[0]
    }


# -- server optimizers --------------------------------------------------------------------


def fedavgm_step(
    current: StateDict,
    average: StateDict,
    velocity: StateDict | None,
    *,
    server_lr: float = 1.0,
    momentum: float = 0.9,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One step of server momentum (FedAvgM, Hsu et al. 2019).

    The pseudo-gradient is ``current - average``; ``v = momentum * v + g`` and the new
    model is ``current - server_lr * v``. With ``server_lr=1, momentum=0`` it is FedAvg.

    Returns:
        ``(new_state, new_velocity)``; the velocity is float64, for floating entries only.
    """
    new: dict[str, torch.Tensor] = {}
    new_velocity: dict[str, torch.Tensor] = {}
    for key, avg in average.items():
        cur = current[key]
        if not cur.dtype.is_floating_point:
            new[key] = avg.detach().clone()
            continue
        grad = _wide(cur) - _wide(avg)
        v = grad if velocity is None or key not in velocity else momentum * velocity[key] + grad
        new_velocity[key] = v
        new[key] = (_wide(cur) - server_lr * v).to(cur.dtype)
    return new, new_velocity


def adaptive_step(
    current: StateDict,
    average: StateDict,
    m: StateDict | None,
    v: StateDict | None,
    *,
    kind: Adaptive = "adam",
    eta: float = 0.1,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One step of an adaptive server optimizer (Reddi et al. 2021, Algorithm 2).

    With ``delta = average - current``: ``m = beta1 * m + (1 - beta1) * delta`` and

    - adam:    ``v = beta2 * v + (1 - beta2) * delta^2``
    - yogi:    ``v = v - (1 - beta2) * delta^2 * sign(v - delta^2)``
    - adagrad: ``v = v + delta^2``

    then ``new = current + eta * m / (sqrt(v) + tau)``. ``m`` starts at 0 and ``v`` at
    ``tau^2`` (the paper's ``v_{-1} >= tau^2``); ``tau`` bounds the adaptivity.

    Returns:
        ``(new_state, m, v)``; the moments are float64, for floating entries only.
    """
    if kind not in ("adam", "yogi", "adagrad"):
        raise ValueError(f"adaptive_step: unknown kind {kind!r}")
    new: dict[str, torch.Tensor] = {}
    new_m: dict[str, torch.Tensor] = {}
    new_v: dict[str, torch.Tensor] = {}
    for key, avg in average.items():
        cur = current[key]
        if not cur.dtype.is_floating_point:
            new[key] = avg.detach().clone()
            continue
        wide_cur = _wide(cur)
        delta = _wide(avg) - wide_cur
        m_prev = m[key] if m is not None and key in m else torch.zeros_like(delta)
        v_prev = v[key] if v is not None and key in v else torch.full_like(delta, tau * tau)
        m_new = beta1 * m_prev + (1 - beta1) * delta
        sq = delta * delta
        if kind == "adam":
            v_new = beta2 * v_prev + (1 - beta2) * sq
        elif kind == "yogi":
            v_new = v_prev - (1 - beta2) * sq * torch.sign(v_prev - sq)
        else:
            v_new = v_prev + sq
        new_m[key], new_v[key] = m_new, v_new
        new[key] = (wide_cur + eta * m_new / (v_new.sqrt() + tau)).to(cur.dtype)
    return new, new_m, new_v


# -- strategies ---------------------------------------------------------------------------


class FedAvgStrategy(WeightedAverageStrategy):
    """FedAvg (McMahan et al. 2017): the example-weighted mean. The default."""

    name: ClassVar[str] = "fedavg"


class FedProx(WeightedAverageStrategy):
    """FedProx (Li et al. 2020): FedAvg on the server, a proximal term on the nodes.

    Every node is told ``{"proximal_mu": mu}`` in its round config; the local training
    step adds ``mu / 2 * ||w - w_global||^2`` to its loss (see :mod:`fedws.fl.strategy`).
    """

    name: ClassVar[str] = "fedprox"

    def __init__(self, mu: float = 0.01, *, on_fit_config: FitConfigFn | None = None) -> None:
        super().__init__(on_fit_config=on_fit_config)
        if mu < 0:
            raise ValueError(f"FedProx: mu must be >= 0, got {mu}")
        self.mu = mu

    def configure_fit(self, round_number: int, nodes: Sequence[str]) -> dict[str, dict[str, Any]]:
        configs = super().configure_fit(round_number, nodes)
        for c in configs.values():
            c["proximal_mu"] = self.mu
        return configs

    def __repr__(self) -> str:
        return f"FedProx(mu={self.mu})"


class FedAvgM(WeightedAverageStrategy):
    """FedAvg with server momentum (:func:`fedavgm_step`); the velocity lives here."""

    name: ClassVar[str] = "fedavgm"

    def __init__(
        self, server_lr: float = 1.0, momentum: float = 0.9, *, on_fit_config: FitConfigFn | None = None
    ) -> None:
        super().__init__(on_fit_config=on_fit_config)
        self.server_lr, self.momentum = server_lr, momentum
        self.velocity: dict[str, torch.Tensor] | None = None

    def apply_average(self, round_number: int, current: StateDict, average: StateDict) -> dict[str, torch.Tensor]:
        new, self.velocity = fedavgm_step(
            current, average, self.velocity, server_lr=self.server_lr, momentum=self.momentum
        )
        return new

    def __repr__(self) -> str:
        return f"FedAvgM(server_lr={self.server_lr}, momentum={self.momentum})"


class FedAdam(WeightedAverageStrategy):
    """Adam on the server (:func:`adaptive_step`); the moments live here.

    Args:
        eta: server learning rate.
        beta1, beta2: moment decay rates.
        tau: adaptivity bound (larger: closer to FedAvgM).
    """

    name: ClassVar[str] = "fedadam"
    kind: ClassVar[Adaptive] = "adam"

    def __init__(
        self,
        eta: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        *,
        on_fit_config: FitConfigFn | None = None,
    ) -> None:
        super().__init__(on_fit_config=on_fit_config)
        if eta < 0 or tau <= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1:
            raise ValueError("need eta >= 0, tau > 0 and beta1, beta2 in [0, 1)")
        self.eta, self.beta1, self.beta2, self.tau = eta, beta1, beta2, tau
        self.m: dict[str, torch.Tensor] | None = None
        self.v: dict[str, torch.Tensor] | None = None

    def apply_average(self, round_number: int, current: StateDict, average: StateDict) -> dict[str, torch.Tensor]:
        new, self.m, self.v = adaptive_step(
            current, average, self.m, self.v,
            kind=self.kind, eta=self.eta, beta1=self.beta1, beta2=self.beta2, tau=self.tau,
        )
        return new

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eta={self.eta}, beta1={self.beta1}, beta2={self.beta2}, tau={self.tau})"


class FedYogi(FedAdam):
    """Yogi on the server: like FedAdam, with a second moment that grows more slowly."""

    name: ClassVar[str] = "fedyogi"
    kind: ClassVar[Adaptive] = "yogi"


class FedAdagrad(FedAdam):
    """Adagrad on the server (``beta2`` is unused)."""

    name: ClassVar[str] = "fedadagrad"
    kind: ClassVar[Adaptive] = "adagrad"


class FedMedian(Strategy):
    """Coordinate-wise median (:func:`fedmedian`); ignores example counts."""

    name: ClassVar[str] = "fedmedian"

    def aggregate_fit(
        self, round_number: int, results: Sequence[FitResult], current: StateDict
    ) -> dict[str, torch.Tensor]:
        return fedmedian([r.state for r in results])


class FedTrimmedAvg(Strategy):
    """Coordinate-wise trimmed mean (:func:`fedtrimmedavg`), trimming ``beta`` at each end."""

    name: ClassVar[str] = "trimmed_mean"

    def __init__(self, beta: float = 0.2, *, on_fit_config: FitConfigFn | None = None) -> None:
        super().__init__(on_fit_config=on_fit_config)
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def aggregate_fit(
        self, round_number: int, results: Sequence[FitResult], current: StateDict
    ) -> dict[str, torch.Tensor]:
        return fedtrimmedavg([r.state for r in results], self.beta)

    def __repr__(self) -> str:
        return f"FedTrimmedAvg(beta={self.beta})"


class Krum(Strategy):
    """Krum (``m=1``) or multi-Krum (``m>1``) tolerating ``f`` byzantine nodes (:func:`krum`).

    A round needs more than ``2f + 2`` answers, else it fails with a ValueError.
    """

    name: ClassVar[str] = "krum"

    def __init__(self, f: int = 1, m: int = 1, *, on_fit_config: FitConfigFn | None = None) -> None:
        super().__init__(on_fit_config=on_fit_config)
        if f < 0 or m < 1:
            raise ValueError(f"krum: need f >= 0 and m >= 1, got f={f}, m={m}")
        self.f, self.m = f, m

    def aggregate_fit(
        self, round_number: int, results: Sequence[FitResult], current: StateDict
    ) -> dict[str, torch.Tensor]:
        return krum([r.state for r in results], self.f, min(self.m, len(results)))

    def __repr__(self) -> str:
        return f"Krum(f={self.f}, m={self.m})"


STRATEGIES: Mapping[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvgStrategy, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedMedian, FedTrimmedAvg, Krum)
}


def strategy_names() -> list[str]:
    """The names :func:`get_strategy` accepts."""
    return sorted(STRATEGIES)


def get_strategy(spec: str | Strategy) -> Strategy:
    """A strategy object: ``spec`` itself, or a new one with default arguments by name.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
        TypeError: neither a name nor a :class:`Strategy`.
    """
    if isinstance(spec, Strategy):
        return spec
    if isinstance(spec, str):
        key = spec.strip().lower().replace("-", "_")
        if key not in STRATEGIES:
            raise ValueError(f"unknown strategy {spec!r}; known: {', '.join(strategy_names())}")
        return STRATEGIES[key]()
    raise TypeError(f"strategy must be a name or a Strategy, got {type(spec).__name__}")
