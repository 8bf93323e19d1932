"""A node's status as a typed record: what ``worker.info()`` and ``fedws status`` show.

Imports nothing but the standard library, so ``fedws status`` reads a node without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["NodeStatus"]

_INTS = ("principals", "connections", "objects", "bytes", "plans", "memory_budget", "memory_used")


@dataclass(frozen=True)
class NodeStatus:
    """One node as it describes itself (``INFO "status"``).

    ``scope`` is ``"node"`` when the caller sees the whole node, ``"session"`` when a private
    node shows it only its own session's objects, bytes and plans (then the node-wide
    numbers — principals, connections, memory budget — are None). See
    :mod:`fedws.node.status` for who sees what.

    Attributes:
        uptime_s: seconds since the node started.
        principals: distinct principals connected now; connections: open connections.
        objects, bytes, plans: what is held (in the caller's scope).
        memory_budget, memory_used: the node's budget and the bytes it holds, in bytes.
        url: where it was reached (None for an in-process node).
    """

    id: str
    version: str
    policy: str
    scope: str
    uptime_s: float
    principals: int | None
    connections: int | None
    objects: int
    bytes: int
    plans: int
    memory_budget: int | None
    memory_used: int | None
    url: str | None = None

    @classmethod
    def from_wire(cls, value: Any, url: str | None = None) -> NodeStatus:
        """Check a node's answer before trusting it (a node is just a server someone runs).

        Raises:
            ValueError: not a status map of the expected types.
        """
        if not isinstance(value, dict):
            raise ValueError(f"a node status must be a map, got {type(value).__name__}")
        out: dict[str, Any] = {}
        for key in ("id", "version", "policy", "scope"):
            v = value.get(key)
            if not isinstance(v, str):
                raise ValueError(f"node status field {key!r} must be a string, got {type(v).__name__}")
            out[key] = v[:200]
        up = value.get("uptime_s")
        if not isinstance(up, int | float) or isinstance(up, bool):
            raise ValueError("node status field 'uptime_s' must be a number")
        out["uptime_s"] = float(up)
        for key in _INTS:
            v = value.get(key)
            if v is not None and (type(v) is not int or v < 0):
                raise ValueError(f"node status field {key!r} must be a count, got {v!r:.40}")
            if v is None and key in ("objects", "bytes", "plans"):
                raise ValueError(f"node status field {key!r} is missing")
            out[key] = v
        return cls(**out, url=url)

    def as_dict(self) -> dict[str, Any]:
        """Plain values (for ``fedws status --json``)."""
        return dict(self.__dict__)
