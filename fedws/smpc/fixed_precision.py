"""FixedPrecisionTensor: real numbers as integers, so that they can be secret-shared.

A value ``v`` is held as the int64 ``round(v * base**precision_fractional)`` (PySyft 0.2's
defaults: base 10, 3 fractional digits, so 0.001 is the smallest step). Addition works on
the integers as they are; a product carries the scale twice and is divided back by it
("truncation": exact for local values, :meth:`AdditiveSharingTensor.truncate` for shared
ones). The integers live in the ring Z/2^64 and wrap around like the shares do, so keep
``|v| * scale**2`` well below 2**63 for products.

The child is a local int64 tensor, a pointer to one (``ptr.fix_precision()`` encodes on
the worker) or an :class:`~fedws.smpc.additive.AdditiveSharingTensor` (after ``share``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..client.worker import Worker
from ..exceptions import SMPCError
from ..pointers import PointerTensor
from .additive import AdditiveSharingTensor, PointerToShared

__all__ = ["FixedPrecisionTensor", "BASE", "PRECISION_FRACTIONAL", "encode", "TORCH_FUNCTIONS"]

BASE = 10
PRECISION_FRACTIONAL = 3


def encode(value: torch.Tensor, scale: int) -> torch.Tensor:
    """``round(value * scale)`` as int64 (runs on the worker for a pointer)."""
    with torch.no_grad():
        if value.is_floating_point():
            return (value.detach() * scale).round().long()
        return value.long() * scale


class FixedPrecisionTensor:
    """Fixed-point numbers over an int64 child (local, remote or secret-shared).

    Example:
        >>> x = torch.tensor([0.5, -1.25]).fix_precision()
        >>> (x * 2.0).float_precision()
        tensor([ 1.0000, -2.5000])
    """

    def __init__(self, child: Any, base: int = BASE, precision_fractional: int = PRECISION_FRACTIONAL) -> None:
        if not isinstance(base, int) or base < 2 or not isinstance(precision_fractional, int) or precision_fractional < 0:
            raise ValueError("fix_precision: base must be an int >= 2 and precision_fractional an int >= 0")
        self.child = child
        self.base = base
        self.precision_fractional = precision_fractional

    @classmethod
    def from_tensor(
        cls, value: torch.Tensor, base: int = BASE, precision_fractional: int = PRECISION_FRACTIONAL
    ) -> FixedPrecisionTensor:
        return cls(encode(value, base**precision_fractional), base, precision_fractional)

    @property
    def scale(self) -> int:
        return int(self.base**self.precision_fractional)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.child.shape)

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def __repr__(self) -> str:
        return f"FixedPrecisionTensor(base={self.base}, precision_fractional={self.precision_fractional})>{self.child!r}"

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: Any = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        """Torch functions called with a fixed-precision value (a model's layers): the ones
        :data:`TORCH_FUNCTIONS` names; others are refused clearly."""
        fn = TORCH_FUNCTIONS.get(func)
        if fn is None:
            raise SMPCError(f"{getattr(func, '__name__', func)} is not supported on fixed-precision values")
        return fn(*args, **(kwargs or {}))

    def __rmatmul__(self, other: Any) -> FixedPrecisionTensor:
        value, scaled = self._other(other)
        if value is NotImplemented:
            raise TypeError(f"matmul of {type(other).__name__} with a fixed-precision value")
        child = self.child
        product = child.__rmatmul__(value) if isinstance(child, AdditiveSharingTensor) else torch.matmul(value, child)
        return self._wrap(self._truncate(product, self.scale) if scaled else product)

    def _wrap(self, child: Any) -> FixedPrecisionTensor:
        return FixedPrecisionTensor(child, self.base, self.precision_fractional)

    # -- leaving fixed precision --------------------------------------------------------------

    def float_precision(self) -> Any:
        """The real values again: a float tensor (a pointer to one for a remote child)."""
        child = self.child
        if isinstance(child, AdditiveSharingTensor):
            raise SMPCError("float_precision() of a shared value: get() it first (that reconstructs it)")
        with torch.no_grad():
            return (child.to(torch.float64) / self.scale).to(torch.float32)

    float_prec = float_precision

    def get(self) -> FixedPrecisionTensor:
        """Bring the child back: reconstructs a shared value, or gets a remote one."""
        return self._wrap(self.child.get())

    def share(self, *owners: Worker, crypto_provider: Worker | None = None, **_: Any) -> Any:
        """Secret-share the encoded integers among ``owners``.

        A local child is split here; a remote one is split by the worker that holds it, and
        the result is a :class:`PointerToShared` whose ``get()`` gives the shared value.
        """
        child = self.child
        if isinstance(child, AdditiveSharingTensor):
            raise SMPCError("this value is already shared")
        if isinstance(child, PointerTensor):
            shared = AdditiveSharingTensor.from_pointer(child, owners, crypto_provider)
            return PointerToShared(self._wrap(shared), child.location)
        return self._wrap(AdditiveSharingTensor.from_tensor(child, owners, crypto_provider))

    def copy(self) -> FixedPrecisionTensor:
        child = self.child
        return self._wrap(child.copy() if isinstance(child, AdditiveSharingTensor) else child.clone())

    # -- arithmetic -------------------------------------------------------------------------

    def _other(self, other: Any) -> tuple[Any, bool]:
        """``other`` in this encoding, and whether it carries the scale (False: a public int)."""
        if isinstance(other, FixedPrecisionTensor):
            if (other.base, other.precision_fractional) != (self.base, self.precision_fractional):
                raise SMPCError("fixed-precision values with different precisions")
            return other.child, True
        if isinstance(other, bool):
            raise TypeError("bool operand of a fixed-precision value")
        if isinstance(other, int):
            return other, False
        if isinstance(other, float):
            return int(round(other * self.scale)), True
        if isinstance(other, torch.Tensor) and not isinstance(other, PointerTensor):
            if other.is_floating_point():
                return encode(other, self.scale), True
            return other.long(), False
        return NotImplemented, False

    def _scaled(self, other: Any) -> Any:
        value, scaled = self._other(other)
        if value is NotImplemented or scaled:
            return value
        return value * self.scale

    def _truncate(self, value: Any, divisor: int) -> Any:
        if isinstance(value, AdditiveSharingTensor):
            return value.truncate(divisor)
        return torch.div(value, divisor, rounding_mode="floor")

    def __add__(self, other: Any) -> Any:
        value = self._scaled(other)
        return NotImplemented if value is NotImplemented else self._wrap(self.child + value)

    __radd__ = __add__

    def __sub__(self, other: Any) -> Any:
        value = self._scaled(other)
        return NotImplemented if value is NotImplemented else self._wrap(self.child - value)

    def __rsub__(self, other: Any) -> Any:
        value = self._scaled(other)
        return NotImplemented if value is NotImplemented else self._wrap(-self.child + value)

    def __neg__(self) -> FixedPrecisionTensor:
        return self._wrap(-self.child)

    def __mul__(self, other: Any) -> Any:
        value, scaled = self._other(other)
        if value is NotImplemented:
            return NotImplemented
        product = self.child * value if not isinstance(value, AdditiveSharingTensor) else value * self.child
        return self._wrap(self._truncate(product, self.scale) if scaled else product)

    __rmul__ = __mul__

    def mul(self, other: Any) -> Any:
        return self * other

    def matmul(self, other: Any) -> FixedPrecisionTensor:
        value, scaled = self._other(other)
        if value is NotImplemented:
            raise TypeError(f"matmul of a fixed-precision value with {type(other).__name__}")
        child = self.child
        product: Any
        if isinstance(child, AdditiveSharingTensor):
            product = child.matmul(value)
        elif isinstance(value, AdditiveSharingTensor):
            product = value.__rmatmul__(child)
        else:
            product = torch.matmul(child, value)
        return self._wrap(self._truncate(product, self.scale) if scaled else product)

    mm = matmul
    __matmul__ = matmul

    def __truediv__(self, other: Any) -> Any:
        if isinstance(other, int) and not isinstance(other, bool):
            if other <= 0:
                raise SMPCError("a fixed-precision value is divided by a positive public number")
            return self._wrap(self._truncate(self.child, other))
        if isinstance(other, float):
            return self * (1.0 / other)
        return NotImplemented

    def sum(self, *args: Any, **kwargs: Any) -> FixedPrecisionTensor:
        return self._wrap(self.child.sum(*args, **kwargs))

    def view(self, *shape: Any) -> FixedPrecisionTensor:
        return self._wrap(self.child.view(*shape))

    def reshape(self, *shape: Any) -> FixedPrecisionTensor:
        return self._wrap(self.child.reshape(*shape))

    def t(self) -> FixedPrecisionTensor:
        return self._wrap(self.child.t())

    def _compare(self, other: Any, name: str) -> Any:
        """A shared comparison gives shared 1.0/0.0 in this encoding; a local one a bool tensor."""
        value = self._scaled(other)
        if value is NotImplemented:
            raise TypeError(f"cannot compare a fixed-precision value with {type(other).__name__}")
        bits = getattr(self.child, name)(value)
        if isinstance(bits, AdditiveSharingTensor):
            return self._wrap(bits * self.scale)
        return bits

    def __gt__(self, other: Any) -> Any:
        return self._compare(other, "__gt__")

    def __lt__(self, other: Any) -> Any:
        return self._compare(other, "__lt__")

    def __ge__(self, other: Any) -> Any:
        return self._compare(other, "__ge__")

    def __le__(self, other: Any) -> Any:
        return self._compare(other, "__le__")

    def __eq__(self, other: object) -> Any:
        return self._compare(other, "__eq__")

    def __ne__(self, other: object) -> Any:
        return self._compare(other, "__ne__")

    __hash__ = object.__hash__

    def relu(self) -> FixedPrecisionTensor:
        child = self.child
        return self._wrap(child.relu() if isinstance(child, AdditiveSharingTensor) else child.clamp(min=0))

    def max(self, dim: int | None = None) -> Any:
        """The largest value, or ``(values, indices)`` along ``dim`` (indices are plain ints)."""
        child = self.child
        if dim is None:
            return self._wrap(child.max() if isinstance(child, AdditiveSharingTensor) else child.max().view(1))
        values, indices = child.max(dim)
        return self._wrap(values), indices


def _linear(x: Any, weight: Any, bias: Any = None) -> Any:
    out = x.matmul(weight.t())
    return out if bias is None else out + bias


def _relu(x: Any, inplace: bool = False) -> Any:
    return x.relu()


def _matmul(a: Any, b: Any) -> Any:
    return a.matmul(b) if isinstance(a, FixedPrecisionTensor) else b.__rmatmul__(a)


TORCH_FUNCTIONS: dict[Any, Callable[..., Any]] = {
    F.linear: _linear,
    F.relu: _relu,
    torch.relu: _relu,
    torch.matmul: _matmul,
    torch.add: lambda a, b: a + b,
    torch.sub: lambda a, b: a - b,
    torch.mul: lambda a, b: a * b,
    torch.sum: lambda a, *args, **kwargs: a.sum(*args, **kwargs),
}
"""What torch functions do with fixed-precision arguments (a model's layers call these)."""
