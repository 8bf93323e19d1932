"""``fedws.dp.clip_and_noise``: a model update made differentially private on its node.

Local differential privacy must not depend on the coordinator's honesty, so the clipping
and the noise happen where the data is, before anything leaves:

    fedws.dp.clip_and_noise(values, clip, noise_multiplier, reference=None)

``values`` is a tensor or a list of tensors the caller owns (a trained model's state);
``reference``, inline tensors of the same shapes (the model the node was sent). The result
(one tensor per value) is ``clip_to(values - reference, clip) + N(0, (z * clip)^2)``, the
noise drawn from the node's generator (seeded from the OS CSPRNG; see
:func:`fedws.node.policy.clip_and_noise`), the whole list being one Gaussian release.

Under a private policy the release rule of the node (its :class:`~fedws.node.policy.DPRule`)
governs what this may release. When an input is private (derived from the data the node
serves), the command:

* is refused unless the node has a DP rule and the caller's principal the ``dp`` permission;
* uses ``z = max(noise_multiplier, rule.noise_multiplier)``: a caller can ask for more noise,
  never less than the operator's rule;
* charges one release to the principal's budget (Opacus's RDP accountant, as ``get(dp=True)``)
  and is refused past it (:class:`~fedws.exceptions.PrivacyBudgetExceededError`);
* stores its results as released (not private): they are what may leave, and a later
  ``get`` does not charge them again.

An update of non-private values (open nodes, the outputs of an approved plan) is clipped
and noised the same way and charged nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .policy import clip_and_noise

__all__ = ["MAX_TENSORS", "node_ops"]

MAX_TENSORS = 4096
"""Most tensors one update may hold."""


def _positive(value: Any, what: str, *, zero: bool = False) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ValueError(f"fedws.dp.clip_and_noise: {what} must be a finite number {'>=' if zero else '>'} 0, "
                         f"got {value!r}")
    return float(value)


def _tensors(value: Any, what: str) -> list[Any]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not 1 <= len(items) <= MAX_TENSORS:
        raise ValueError(f"fedws.dp.clip_and_noise: {what} must hold 1 to {MAX_TENSORS} tensors, got {len(items)}")
    return items


def _check(items: list[Any], refs: list[Any] | None) -> None:
    """Type and shape errors before anything is allocated or charged."""
    for t in items:
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.is_sparse or t.device.type != "cpu":
            raise TypeError("fedws.dp.clip_and_noise: values must be dense floating-point CPU tensors")
    if refs is not None and (
        len(refs) != len(items)
        or not all(isinstance(r, torch.Tensor) and r.shape == t.shape and r.dtype.is_floating_point for r, t in zip(refs, items))
    ):
        raise TypeError("fedws.dp.clip_and_noise: reference must hold one floating-point tensor of the same shape per value")


def node_ops(node: Any) -> dict[str, Callable[..., Any]]:
    """The command as a ``node.fedws_ops`` entry of ``node`` (a :class:`~fedws.node.Node`,
    untyped here so this module does not import it back)."""

    def clip_and_noise_op(values: Any, clip: Any, noise_multiplier: Any, reference: Any = None) -> Any:
        items = _tensors(values, "values")
        refs = None if reference is None else _tensors(reference, "reference")
        c = _positive(clip, "clip")
        z = _positive(noise_multiplier, "noise_multiplier", zero=True)
        _check(items, refs)
        nbytes = sum(8 * t.numel() for t in items)
        node.budget.check(2 * nbytes, node.store.nbytes, "fedws.dp.clip_and_noise", op="fedws.dp.clip_and_noise")
        state = node._frame
        released: dict[str, Any] | None = None
        if node.enforce and state.tainted:  # a private value: the node's release rule decides
            rule = node.policy.dp
            if rule is None:
                raise node._deny(
                    f"worker {node.id!r} has no differentially private release rule: its private values "
                    "cannot leave through fedws.dp.clip_and_noise"
                )
            node._require(state.caller, "dp")
            z = max(z, rule.noise_multiplier)
            eps = node.accountant.charge(state.caller.principal, worker=node.id)
            released = {"epsilon": round(eps, 6), "delta": rule.delta, "noise_multiplier": z}
        out = clip_and_noise(items, c, z, refs)
        if released is not None:
            state.dp_released = True  # the results are the release: _cmd_checked stores them as not private
            if node.audit.enabled:
                node.audit.released(state.caller, -1, sum(t.numel() * t.element_size() for t in out),
                                    "dp-update", **released)
        return out[0] if len(out) == 1 else out  # one result id takes one tensor

    return {"fedws.dp.clip_and_noise": clip_and_noise_op}
