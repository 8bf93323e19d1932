"""Secure multi-party computation (PySyft 0.2's Parts 09–10): fixed precision, additive
secret sharing over Z/2^64, Beaver-triple multiplication with a crypto provider.

See :mod:`.additive` for who sees what.
"""

from __future__ import annotations

from .additive import AdditiveSharingTensor, PointerToShared
from .fixed_precision import FixedPrecisionTensor
from .torch_methods import install

__all__ = ["AdditiveSharingTensor", "FixedPrecisionTensor", "PointerToShared", "install"]
