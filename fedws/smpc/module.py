"""``nn.Module`` methods of secure computation: ``fix_precision``, ``share``, ``get`` of a
shared model, ``float_precision``; and torch functions on fixed-precision values.

``model.fix_precision()`` puts a :class:`FixedPrecisionTensor` in place of each parameter
(in the module's ``_parameters``: they are not torch tensors, which is why modules are
not offered as tensor subclasses here: nothing on the coordinator needs one). Layers call
``F.linear``/``F.relu`` on them; torch hands those calls to
:meth:`FixedPrecisionTensor.__torch_function__` (a tensor-like type, see
:data:`fedws.smpc.fixed_precision.TORCH_FUNCTIONS`), which runs them as
fixed-point operations on shares. So a model shared with ``model.share(bob, alice,
crypto_provider=carol)`` evaluates shared inputs (PySyft's encrypted inference).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..client.worker import Worker
from ..exceptions import SMPCError
from .fixed_precision import BASE, PRECISION_FRACTIONAL, FixedPrecisionTensor

__all__ = ["module_fix_precision", "module_share", "module_float_precision", "wrap_module_get"]


def _params(module: nn.Module) -> list[tuple[nn.Module, str, Any]]:
    return [(m, name, p) for m in module.modules() for name, p in m._parameters.items() if p is not None]


def module_fix_precision(
    module: nn.Module, base: int = BASE, precision_fractional: int = PRECISION_FRACTIONAL, **_: Any
) -> nn.Module:
    """``model.fix_precision()``: every parameter as fixed-point integers; returns the model."""
    for m, name, p in _params(module):
        if isinstance(p, FixedPrecisionTensor):
            continue
        if not isinstance(p, torch.Tensor) or p.device.type == "meta":
            raise SMPCError("fix_precision() of a model: get() it first (its parameters are remote)")
        m._parameters[name] = FixedPrecisionTensor.from_tensor(p.detach(), base, precision_fractional)  # type: ignore[assignment]
    return module


def module_share(module: nn.Module, *owners: Worker, crypto_provider: Worker | None = None, **_: Any) -> nn.Module:
    """``model.share(bob, alice, crypto_provider=carol)``: share every fixed-point parameter."""
    for _m, _name, p in _params(module):
        if not isinstance(p, FixedPrecisionTensor):
            raise SMPCError("share() of a model: call fix_precision() on it first")
    for m, name, p in _params(module):
        m._parameters[name] = p.share(*owners, crypto_provider=crypto_provider)
    return module


def module_float_precision(module: nn.Module) -> nn.Module:
    """``model.float_precision()``: real-valued Parameters again (after ``get()``)."""
    for m, name, p in _params(module):
        if isinstance(p, FixedPrecisionTensor):
            m._parameters[name] = nn.Parameter(p.float_precision())
    return module


def wrap_module_get(get: Callable[[nn.Module], nn.Module] | None) -> Callable[[nn.Module], nn.Module]:
    """``model.get()`` that also reconstructs shared parameters, then does what ``get`` did."""

    def module_get(module: nn.Module) -> nn.Module:
        for m, name, p in _params(module):
            if isinstance(p, FixedPrecisionTensor) and not isinstance(p.child, torch.Tensor):
                m._parameters[name] = p.get()  # type: ignore[assignment]
        return get(module) if get is not None else module

    module_get.__doc__ = get.__doc__ if get is not None else module_get.__doc__
    return module_get
