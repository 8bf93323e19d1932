"""State: the tensors a plan carries with it (model weights, biases, constants)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

__all__ = ["State"]


class State:
    """The tensors a plan owns, handed to a function plan as its last argument.

    They travel with the plan when it is sent, live on the worker next to it, and keep
    whatever the plan does to them in place (an in-place SGD step persists between runs).

    Example:
        >>> @sy.func2plan(args_shape=[(1,)], state=(torch.tensor([1]),))
        ... def plan_abs(x, state):
        ...     bias, = state.read()
        ...     return x.abs() + bias
    """

    def __init__(self, tensors: Iterable[torch.Tensor] = ()) -> None:
        self.tensors: list[torch.Tensor] = list(tensors)
        for t in self.tensors:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"plan state holds tensors only, got {type(t).__name__}")

    def read(self) -> tuple[torch.Tensor, ...]:
        """The state tensors, in the order they were given."""
        return tuple(self.tensors)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{tuple(t.shape)}" for t in self.tensors)
        return f"<State [{shapes}]>"
