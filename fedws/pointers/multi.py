"""MultiPointerTensor: the same tensor sent to several workers (``x.send(bob, alice)``)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..exceptions import LocationError
from .tensor import PointerTensor

__all__ = ["MultiPointerTensor"]

Binary = Callable[[Any, Any], Any]


class MultiPointerTensor:
    """One pointer per worker, used as one value.

    Arithmetic applies to every child (with another MultiPointerTensor, child by child on
    the same worker); any tensor method does too (``mp.sum()``). ``get()`` returns the
    values as a list, or their sum with ``sum_results=True``.

    Attributes:
        children: the pointers, by worker id.
    """

    def __init__(self, children: Sequence[PointerTensor]) -> None:
        self.children: dict[str, PointerTensor] = {p.location.id: p for p in children}

    def get(self, sum_results: bool = False) -> Any:
        """Bring every child's value back (deleting it remotely): a list, or their sum."""
        values = [p.get() for p in self.children.values()]
        if sum_results:
            total = values[0]
            for v in values[1:]:
                total = total + v
            return total
        return values

    def _map(self, fn: Binary, other: Any = None) -> MultiPointerTensor:
        out = []
        for wid, p in self.children.items():
            if isinstance(other, MultiPointerTensor):
                if wid not in other.children:
                    raise LocationError(f"the other MultiPointerTensor has nothing on worker {wid!r}")
                o = other.children[wid]
            else:
                o = other
            out.append(fn(p, o))
        return MultiPointerTensor(out)

    def _reflected(self, op: Binary, other: Any) -> MultiPointerTensor:
        return self._map(lambda p, o: op(o, p), other)

    def __getattr__(self, name: str) -> Callable[..., MultiPointerTensor]:
        """Any tensor method applies to every child: ``mp.sum()``, ``mp.view(-1)``."""
        if name.startswith("_") or not callable(getattr(torch.Tensor, name, None)):
            raise AttributeError(f"MultiPointerTensor has no attribute {name!r}")

        def method(*args: Any, **kwargs: Any) -> MultiPointerTensor:
            return self._map(lambda p, _: getattr(p, name)(*args, **kwargs))

        return method

    def __repr__(self) -> str:
        inner = "\n\t-> ".join(f"{wid}: {p!r}" for wid, p in self.children.items())
        return f"[MultiPointerTensor]\n\t-> {inner}"

    # -- operators, child by child ----------------------------------------------------------

    def __add__(self, other: Any) -> MultiPointerTensor:
        return self._map(operator.add, other)

    def __radd__(self, other: Any) -> MultiPointerTensor:
        return self._reflected(operator.add, other)

    def __sub__(self, other: Any) -> MultiPointerTensor:
        return self._map(operator.sub, other)

    def __rsub__(self, other: Any) -> MultiPointerTensor:
        return self._reflected(operator.sub, other)

    def __mul__(self, other: Any) -> MultiPointerTensor:
        return self._map(operator.mul, other)

    def __rmul__(self, other: Any) -> MultiPointerTensor:
        return self._reflected(operator.mul, other)

    def __truediv__(self, other: Any) -> MultiPointerTensor:
        return self._map(operator.truediv, other)

    def __rtruediv__(self, other: Any) -> MultiPointerTensor:
        return self._reflected(operator.truediv, other)

    def __floordiv__(self, other: Any) -> MultiPointerTensor:
        return self._map(operator.floordiv, other)

    def __rfloordiv__(self, other: Any) -> MultiPointerTensor:
        return self._reflected(operator.floordiv, other)

    def __mod__(self, other: Any) -> MultiPointerTensor:
        return self._map(operator.mod, other)

    def __rmod__(self, other: Any) -> MultiPointerTensor:
        return self._reflected(operator.mod, other)

    def __pow__(self, other: Any) -> MultiPointerTensor:
        return self._map(operator.pow, other)

    def __rpow__(self, other: Any) -> MultiPointerTensor:
        return self._reflected(operator.pow, other)

    def __matmul__(self, other: Any) -> MultiPointerTensor:
        return self._map(operator.matmul, other)

    def __rmatmul__(self, other: Any) -> MultiPointerTensor:
        return self._reflected(operator.matmul, other)

    def __and__(self, other: Any) -> MultiPointerTensor:
        return self._map(operator.and_, other)

    def __rand__(self, other: Any) -> MultiPointerTensor:
        return self._reflected(operator.and_, other)

    def __or__(self, other: Any) -> MultiPointerTensor:
        return self._map(operator.or_, other)

    def __ror__(self, other: Any) -> MultiPointerTensor:
        return self._reflected(operator.or_, other)

    def __xor__(self, other: Any) -> MultiPointerTensor:
        return self._map(operator.xor, other)

    def __rxor__(self, other: Any) -> MultiPointerTensor:
        return self._reflected(operator.xor, other)

    def __eq__(self, other: Any) -> MultiPointerTensor:  # type: ignore[override]
        return self._map(operator.eq, other)

    def __ne__(self, other: Any) -> MultiPointerTensor:  # type: ignore[override]
        return self._map(operator.ne, other)

    __hash__ = object.__hash__  # defining __eq__ would otherwise make it unhashable

    def __lt__(self, other: Any) -> MultiPointerTensor:
        return self._map(operator.lt, other)

    def __le__(self, other: Any) -> MultiPointerTensor:
        return self._map(operator.le, other)

    def __gt__(self, other: Any) -> MultiPointerTensor:
        return self._map(operator.gt, other)

    def __ge__(self, other: Any) -> MultiPointerTensor:
        return self._map(operator.ge, other)

    def __neg__(self) -> MultiPointerTensor:
        return self._map(lambda p, _: -p)

    def __pos__(self) -> MultiPointerTensor:
        return self._map(lambda p, _: +p)

    def __abs__(self) -> MultiPointerTensor:
        return self._map(lambda p, _: abs(p))

    def __invert__(self) -> MultiPointerTensor:
        return self._map(lambda p, _: ~p)
