"""The torch methods of secure computation: ``Tensor.fix_precision/fix_prec/share`` and
``nn.Module.fix_precision/share/float_precision`` (and ``get`` of a shared model).

:func:`install` adds them to ``torch.Tensor`` (``fedws.hook`` calls it with the rest of
its patching); they apply to pointers too, which are tensors: ``ptr.fix_precision()``
encodes on the worker, ``ptr.share(...)`` splits there.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from ..client.worker import Worker
from ..exceptions import SMPCError
from ..pointers import PointerTensor
from .additive import AdditiveSharingTensor, PointerToShared
from .fixed_precision import BASE, PRECISION_FRACTIONAL, FixedPrecisionTensor
from .module import module_fix_precision, module_float_precision, module_share, wrap_module_get

__all__ = ["install", "fix_precision", "share"]


def fix_precision(
    tensor: torch.Tensor, base: int = BASE, precision_fractional: int = PRECISION_FRACTIONAL, **_: Any
) -> FixedPrecisionTensor:
    """``x.fix_precision()``: encode as integers (``round(x * base**precision_fractional)``)."""
    return FixedPrecisionTensor.from_tensor(tensor, base, precision_fractional)


def share(tensor: torch.Tensor, *owners: Worker, crypto_provider: Worker | None = None, **_: Any) -> Any:
    """``x.share(bob, alice, crypto_provider=carol)``: additive shares of an integer tensor.

    A local tensor is split here, from the OS CSPRNG; a pointer's data is split on its
    worker (a :class:`PointerToShared` is returned). Floats must be ``fix_precision()``-ed.

    Raises:
        SMPCError: a float tensor, or parties that could reconstruct alone.
    """
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise SMPCError(f"share() of a {tensor.dtype} tensor: call fix_precision() first (shares are int64)")
    if isinstance(tensor, PointerTensor):
        ptr = tensor if tensor._dtype() == torch.int64 else cast(PointerTensor, tensor.long())
        return PointerToShared(AdditiveSharingTensor.from_pointer(ptr, owners, crypto_provider), ptr.location)
    return AdditiveSharingTensor.from_tensor(tensor.long(), owners, crypto_provider)


_installed = False


def install() -> None:
    """Add the methods to ``torch.Tensor`` and ``nn.Module`` (once; after ``Module.get``
    exists, which the shared-model ``get`` wraps)."""
    global _installed
    if _installed:
        return
    torch.Tensor.fix_precision = fix_precision  # type: ignore[attr-defined]
    torch.Tensor.fix_prec = fix_precision  # type: ignore[attr-defined]
    torch.Tensor.share = share  # type: ignore[attr-defined]
    nn.Module.fix_precision = module_fix_precision  # type: ignore[attr-defined]
    nn.Module.fix_prec = module_fix_precision  # type: ignore[attr-defined]
    nn.Module.share = module_share  # type: ignore[attr-defined]
    nn.Module.float_precision = module_float_precision  # type: ignore[attr-defined]
    nn.Module.get = wrap_module_get(getattr(nn.Module, "get", None))  # type: ignore[attr-defined]
    if not hasattr(torch.Tensor, "copy"):  # PySyft's x.copy(), which Part 10 calls on pointers
        torch.Tensor.copy = _copy  # type: ignore[attr-defined]
    _installed = True


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    """``x.copy()``: a clone (made on the worker for a pointer), unless fedws has its own."""
    return tensor.clone()
