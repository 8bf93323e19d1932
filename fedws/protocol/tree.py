"""One walker for nested request values: lists, tuples, dicts and sets of leaves.

Commands, plans and replies nest their arguments. Every layer that rewrites them (refs to
stored objects, pointers to refs, registers to values) uses :func:`tree_map`, so they agree
on what a container is: exactly ``list``, ``tuple``, ``dict`` and ``set``. Subclasses
(``torch.Size``, named tuples) are leaves. The depth is bounded, so a hostile nesting cannot
overflow the stack of whoever walks it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ..exceptions import DecodeError

__all__ = ["tree_map", "tree_leaves", "MAX_DEPTH"]

# Deeper than any argument torch takes; shallow enough for Python's recursion limit.
MAX_DEPTH = 64


def tree_map(fn: Callable[[Any], Any], obj: Any, *, max_depth: int = MAX_DEPTH) -> Any:
    """``obj`` with every leaf replaced by ``fn(leaf)``; containers keep their type.

    Raises:
        DecodeError: the value nests deeper than ``max_depth``.
    """

    def walk(x: Any, depth: int) -> Any:
        t = type(x)
        if t is list or t is tuple or t is dict or t is set:
            if depth >= max_depth:
                raise DecodeError(f"value nests deeper than {max_depth} levels")
            if t is list:
                return [walk(v, depth + 1) for v in x]
            if t is tuple:
                return tuple(walk(v, depth + 1) for v in x)
            if t is dict:
                return {k: walk(v, depth + 1) for k, v in x.items()}
            return {walk(v, depth + 1) for v in x}
        return fn(x)

    return walk(obj, 0)


def tree_leaves(obj: Any, *, max_depth: int = MAX_DEPTH) -> Iterator[Any]:
    """The leaves of ``obj`` in order (dict values, not keys)."""
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        x, depth = stack.pop()
        t = type(x)
        if t is list or t is tuple or t is dict or t is set:
            if depth >= max_depth:
                raise DecodeError(f"value nests deeper than {max_depth} levels")
            items = list(x.values()) if t is dict else list(x)
            stack.extend((v, depth + 1) for v in reversed(items))
        else:
            yield x
