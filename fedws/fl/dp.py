"""Differential privacy for federated training: local and central DP-FedAvg, and accounting.

Two places the Gaussian mechanism can run (:class:`DPConfig` ``mode``):

* ``"local"``: each node clips its update (trained model minus the model it was sent) to
  L2 norm ``clip`` and adds ``N(0, (noise_multiplier * clip)^2)`` to every entry itself,
  with the node command ``fedws.dp.clip_and_noise`` (:mod:`fedws.node.dp_ops`), from its own
  CSPRNG-seeded generator, before anything leaves. Nothing depends on the coordinator's
  honesty; a node whose policy requires DP (``dp.always``) charges the release to the
  principal's budget there and refuses it past the budget.
* ``"central"`` (McMahan et al. 2018, DP-FedAvg): the coordinator is trusted with the
  individual updates; it clips each to ``clip``, averages them with equal weights and adds
  ``N(0, (noise_multiplier * clip / m)^2)`` to the average of ``m`` updates.

:class:`Privacy` keeps the accounting: Opacus's RDP accountant, one step per round. Central
DP: sampling rate ``q = sampled / total`` nodes, epsilon at ``delta`` for the model each
round releases. Local DP: each node's releases are full-participation Gaussian steps; the
epsilon reported is that of the node that took part most often (the worst one).
The coordinator's own noise (central) comes from a generator seeded from :mod:`secrets`.
"""

from __future__ import annotations

import math
import secrets
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..protocol.codec import ObjRef
from ..protocol.ids import new_id
from ..protocol.messages import Kind

if TYPE_CHECKING:
    from .local_training import LocalRun

__all__ = [
    "DPConfig",
    "Privacy",
    "clip_update",
    "update_norm",
    "central_dp_average",
    "epsilon_for",
    "start_dp_release",
    "dp_sgd_step",
]

MODES = ("local", "central")


@dataclass(frozen=True)
class DPConfig:
    """Differential privacy of a federated run.

    Attributes:
        mode: ``"local"`` (each node clips and noises its own update) or ``"central"``
            (the coordinator clips each update and noises the average).
        clip: the L2 bound ``C`` of one node's update (the mechanism's sensitivity).
        noise_multiplier: ``z``; the noise has standard deviation ``z * C`` (local) or
            ``z * C / m`` on the average of ``m`` updates (central).
        delta: the delta epsilon is reported at.
    """

    mode: str = "central"
    clip: float = 1.0
    noise_multiplier: float = 1.1
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"DPConfig mode must be one of {MODES}, got {self.mode!r}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"DPConfig clip must be > 0, got {self.clip}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"DPConfig noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"DPConfig delta must be in (0, 1), got {self.delta}")


# -- the pure arithmetic --------------------------------------------------------------------


def update_norm(update: dict[str, torch.Tensor]) -> float:
    """The L2 norm of a whole update (every floating-point entry taken as one vector)."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(v.detach().double())) ** 2 for v in update.values()))


def clip_update(update: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """``update`` scaled down (never up) so its joint L2 norm is at most ``clip`` (float64)."""
    norm = update_norm(update)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: v.detach().double() * scale for k, v in update.items()}


def central_dp_average(
    updates: list[dict[str, torch.Tensor]], clip: float, noise_multiplier: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """DP-FedAvg's server step: the equal-weight mean of the clipped updates, plus Gaussian
    noise of standard deviation ``noise_multiplier * clip / len(updates)`` (float64).

    Equal weights keep one node's influence on the average at ``clip / m`` whatever its
    example count claims.
    """
    if not updates:
        raise ValueError("central_dp_average needs at least one update")
    m = len(updates)
    clipped = [clip_update(u, clip) for u in updates]
    sigma = noise_multiplier * clip / m
    out = {}
    for key in updates[0]:
        mean = torch.stack([c[key] for c in clipped]).sum(0) / m
        if sigma > 0:
            mean = mean + torch.normal(0.0, sigma, size=mean.shape, generator=generator, dtype=torch.float64)
        out[key] = mean
    return out


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``steps`` sampled Gaussian steps (Opacus's RDP accountant)."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


class Privacy:
    """One run's DP: the coordinator's generator and the accountant of every round."""

    def __init__(self, config: DPConfig) -> None:
        self.config = config
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))  # the OS CSPRNG
        self.history: list[tuple[float, float, int]] = []  # (z, q, steps), Opacus's format
        self.participations: dict[str, int] = {}

    def account(self, sampled: list[str], total: int) -> float:
        """Record one round that sampled ``sampled`` of ``total`` nodes; the epsilon so far."""
        cfg = self.config
        if cfg.mode == "local":
            for wid in sampled:
                self.participations[wid] = self.participations.get(wid, 0) + 1
            worst = max(self.participations.values(), default=0)
            return epsilon_for(cfg.noise_multiplier, 1.0, worst, cfg.delta)
        if cfg.noise_multiplier <= 0:
            return math.inf
        q = len(sampled) / total
        if self.history and self.history[-1][:2] == (cfg.noise_multiplier, q):
            z, q, n = self.history[-1]
            self.history[-1] = (z, q, n + 1)
        else:
            self.history.append((cfg.noise_multiplier, q, 1))
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        acc.history = list(self.history)
        return float(acc.get_epsilon(delta=cfg.delta))

    def aggregate(
        self, global_state: dict[str, torch.Tensor], updates: list[tuple[dict[str, torch.Tensor], int]]
    ) -> dict[str, torch.Tensor]:
        """The new global state from the nodes' answers.

        Local mode: ``updates`` are the nodes' noised deltas; their example-weighted mean is
        added to the global model (post-processing, no privacy cost). Central mode: they are
        the trained states; the deltas are clipped, averaged and noised here.
        """
        cfg = self.config
        keys = float_keys(global_state)
        if cfg.mode == "local":
            total = sum(n for _, n in updates)
            delta = {k: torch.stack([u[k].detach().double() * (n / total) for u, n in updates]).sum(0) for k in keys}
        else:
            deltas = [{k: u[k].detach().double() - global_state[k].double() for k in keys} for u, _ in updates]
            delta = central_dp_average(deltas, cfg.clip, cfg.noise_multiplier, self.generator)
        out = dict(global_state)
        for k in keys:
            out[k] = (global_state[k].double() + delta[k]).to(global_state[k].dtype)
        return out


def float_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The entries an update covers: floating-point ones (integer buffers stay global)."""
    return [k for k, v in state.items() if v.dtype.is_floating_point]


def start_dp_release(run: LocalRun, global_state: dict[str, torch.Tensor], config: DPConfig) -> None:
    """Queue the node's local-DP release after its training; extend ``run.futures`` with it.

    One ``fedws.dp.clip_and_noise`` command over the trained floating-point state (its
    reference, inline, is the global state the node was sent), then a get of each result.
    The node runs a connection's requests in order, so this sees the trained model.
    """
    worker = run.data.worker
    state = run.model.state_dict(keep_vars=True)
    keys = float_keys(global_state)
    ids = [new_id() for _ in keys]
    refs = [ObjRef(state[k].id_at_location) for k in keys]
    worker.submit(
        Kind.CMD, "fedws.dp.clip_and_noise",
        [refs, config.clip, config.noise_multiplier, [global_state[k] for k in keys]], {}, ids,
    )
    futures: list[Future[Any]] = []
    for i in ids:
        _, fut = worker.submit(Kind.GET, i, True, want_value=True)
        assert fut is not None
        futures.append(fut)
    run.state_keys = keys
    run.futures.extend(futures)


def dp_sgd_step(
    model: torch.nn.Module,
    loss_fn: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
    lr: float,
) -> torch.Tensor:
    """One DP-SGD step (Abadi et al. 2016) on local tensors: per-example gradients by
    ``torch.func`` (``vmap`` over ``grad``), each clipped to L2 norm ``clip`` over all
    parameters, summed, Gaussian noise of std ``noise_multiplier * clip`` added, divided by
    the batch size, and an SGD update of ``lr``. Returns the batch's mean loss.

    ``loss_fn(output, target)`` must reduce by mean (it is called on one example at a time).
    """
    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))  # type: ignore[no-any-return]

    per_example = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    batch = x.shape[0]
    norms = torch.sqrt(sum((per_example[n].reshape(batch, -1).double() ** 2).sum(1) for n in names))
    scale = (clip / (norms + 1e-12)).clamp(max=1.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n not in params:
                continue
            g = (per_example[n].double() * scale.view(-1, *([1] * (per_example[n].dim() - 1)))).sum(0)
            if noise_multiplier > 0:
                g = g + torch.normal(0.0, noise_multiplier * clip, size=g.shape, generator=generator,
                                     dtype=torch.float64)
            p.add_((g / batch).to(p.dtype), alpha=-lr)
        return loss_fn(model(x), y).detach()  # type: ignore[no-any-return]
