"""State: the tensors a plan carries with it (model weights, biases, constants)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import overload

import torch

__all__ = ["State"]


class State:
    """The tensors a plan owns, handed to a function plan as its last argument.

    They travel with the plan when it is sent, live on the worker next to it, and keep
    whatever the plan does to them in place (an in-place SGD step persists between runs).
    Given as a dict (PySyft's ``state={"bias": t}``), each tensor is read by its name.

    Example:
        >>> @sy.func2plan(args_shape=[(1,)], state={"bias": torch.tensor([1])})
        ... def plan_abs(x, state):
        ...     bias = state.read("bias")
        ...     return x.abs() + bias
    """

    def __init__(self, tensors: Iterable[torch.Tensor] | Mapping[str, torch.Tensor] = ()) -> None:
        self.names: list[str] = []
        if isinstance(tensors, Mapping):
            self.names = [str(k) for k in tensors]
            tensors = list(tensors.values())
        self.tensors: list[torch.Tensor] = list(tensors)
        for t in self.tensors:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"plan state holds tensors only, got {type(t).__name__}")

    @overload
    def read(self) -> tuple[torch.Tensor, ...]: ...

    @overload
    def read(self, name: str) -> torch.Tensor: ...

    def read(self, name: str | None = None) -> tuple[torch.Tensor, ...] | torch.Tensor:
        """The state tensors in the order they were given, or the one called ``name``.

        Raises:
            KeyError: no state tensor has that name.
        """
        if name is None:
            return tuple(self.tensors)
        try:
            return self.tensors[self.names.index(name)]
        except ValueError:
            raise KeyError(f"the plan state has no tensor {name!r} (it has {self.names})") from None

    def __iadd__(self, names: Iterable[str]) -> State:
        """PySyft's ``self.state += ['fc1', 'fc2']`` in a ``Plan`` subclass: nothing to do,
        a plan's parameters and buffers are its state already."""
        return self

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{tuple(t.shape)}" for t in self.tensors)
        return f"<State [{shapes}]>"
