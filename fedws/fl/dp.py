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
* ``"distributed"`` (needs ``secure_aggregation``): central DP's guarantee without trusting
  the coordinator with any update. Each node clips its delta to ``clip`` and adds its share
  of the noise, ``N(0, (noise_multiplier * clip)^2 / t)``, before masking it (the
  ``fedws.secagg.mask`` command does both on the node, in one step, so the weakly noised
  update is never stored); the coordinator unmasks only the sum of ``m >= t`` survivors'
  updates (``t``: the secure sum's threshold, the fewest it ever unmasks), whose noise has
  std ``noise_multiplier * clip * sqrt(m / t) >= noise_multiplier * clip``. The accountant
  charges the effective multiplier ``noise_multiplier * sqrt(m / t)`` per round (sampling
  rate as central). Equal weights, as central DP: one node moves the sum by ``clip`` at
  most. Why ``1/sqrt(t)`` and not ``1/sqrt(n)``: nodes that drop out after masking take
  their noise with them; sizing the shares for the fewest survivors the sum can have keeps
  the promised noise whatever the dropouts. The guarantee assumes the survivors add their
  share (honest nodes); a node does not rely on that for itself — see below.

Local DP with ``secure_aggregation``: each node adds the *full* ``noise_multiplier * clip``
before masking (weighted by its example count after the noise: post-processing). The
epsilon reported is the local one (each node's own release stands alone), although the sum
the coordinator sees carries ``sqrt(m)`` times that noise: local DP is the mode for nodes
that trust nobody else's noise.

A node's release rule (:class:`~fedws.node.policy.DPRule`, issue [2/7]) governs what it
masks: a private update is masked only with noise of at least the rule's multiplier, is
charged to the principal's budget as one release, and an unnoised masked release of
private values is refused (:mod:`fedws.node.secagg`). A node that raises the noise makes
the epsilon reported here an over-estimate, never an under-estimate.

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
    "check_dp_combination",
]

MODES = ("local", "central", "distributed")


@dataclass(frozen=True)
class DPConfig:
    """Differential privacy of a federated run.

    Attributes:
        mode: ``"local"`` (each node clips and noises its own update), ``"central"``
            (the coordinator clips each update and noises the average) or
            ``"distributed"`` (each node adds a share of central DP's noise before secure
            aggregation masks it; needs ``secure_aggregation``).
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
        self.round_noise: float | None = None  # distributed: this round's effective multiplier

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps so a resumed run goes on spending, not from epsilon 0."""
        return {"history": [list(h) for h in self.history], "participations": dict(self.participations)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [(float(z), float(q), int(n)) for z, q, n in state.get("history", [])]
        self.participations = {str(k): int(v) for k, v in state.get("participations", {}).items()}

    @property
    def epsilon(self) -> float:
        """The epsilon spent so far (0 before the first round)."""
        cfg = self.config
        if cfg.mode == "local":
            return epsilon_for(cfg.noise_multiplier, 1.0, max(self.participations.values(), default=0), cfg.delta)
        if not self.history:
            return 0.0
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        acc.history = list(self.history)
        return float(acc.get_epsilon(delta=cfg.delta))

    def account(self, sampled: list[str], total: int) -> float:
        """Record one round that sampled ``sampled`` of ``total`` nodes; the epsilon so far."""
        cfg = self.config
        if cfg.mode == "local":
            for wid in sampled:
                self.participations[wid] = self.participations.get(wid, 0) + 1
            return self.epsilon
        z = cfg.noise_multiplier if self.round_noise is None else self.round_noise
        self.round_noise = None
        if z <= 0:
            return math.inf
        q = len(sampled) / total
        if self.history and self.history[-1][:2] == (z, q):
            z, q, n = self.history[-1]
            self.history[-1] = (z, q, n + 1)
        else:
            self.history.append((z, q, 1))
        return self.epsilon

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


def check_dp_combination(config: DPConfig, secure_aggregation: bool) -> None:
    """Refuse the DP modes that do not fit how the updates are aggregated."""
    if secure_aggregation and config.mode == "central":
        raise ValueError("FedAvg: central DP clips each update on the coordinator, which secure aggregation "
                         "hides from it: use DPConfig(mode='distributed') (each node adds its share of the "
                         "noise before masking) or mode='local'")
    if not secure_aggregation and config.mode == "distributed":
        raise ValueError("FedAvg: DPConfig(mode='distributed') needs secure_aggregation: each node's share of "
                         "the noise is too small to protect an update the coordinator would see alone")


def secure_dp_aggregate(
    privacy: Privacy,
    runs: list[LocalRun],
    global_state: dict[str, torch.Tensor],
    *,
    neighbours: int | None,
    threshold: int | None,
    timeout: float,
    round_number: int,
) -> dict[str, torch.Tensor]:
    """One round's new global state from updates clipped, noised and masked on the nodes.

    Local mode: each node adds the full noise and weights its noised delta by its example
    count; distributed mode: each adds ``1/sqrt(t)`` of the noise, weight 1, and the
    effective multiplier of the sum is left in ``privacy.round_noise`` for :meth:`Privacy.account`.
    """
    from .secagg import SecureAggregation

    cfg = privacy.config
    keys = float_keys(global_state)
    workers = [r.data.worker for r in runs]
    agg = SecureAggregation(workers, threshold, neighbours=neighbours, timeout=timeout, round_number=round_number)
    z = cfg.noise_multiplier if cfg.mode == "local" else cfg.noise_multiplier / math.sqrt(agg.t)
    agg.advertise_keys()
    agg.share_keys()
    updates = {}
    for r in runs:
        state = r.model.state_dict(keep_vars=True)
        updates[r.data.worker.id] = [state[k] for k in keys]
    weights = {r.data.worker.id: float(r.data.num_examples) if cfg.mode == "local" else 1.0 for r in runs}
    agg.collect_masked(updates, weights, (cfg.clip, z, [global_state[k] for k in keys]))
    total = agg.unmask()
    if cfg.mode == "distributed":
        privacy.round_noise = z * math.sqrt(len(total.survivors))
    out = dict(global_state)
    for k, v in zip(keys, total.tensors):
        out[k] = (global_state[k].double() + v / total.total_weight).to(global_state[k].dtype)
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
