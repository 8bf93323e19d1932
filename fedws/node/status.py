"""What a node tells about itself (``INFO "status"``): the numbers ``fedws status`` shows.

The answer is a flat map of plain values (strings, ints, floats, None), so a client reads it
without torch (``fedws status`` is a monitoring tool, it must start in a blink).

What a caller sees depends on the policy. Under the open (development) policy everyone sees
the whole node. Under a private policy a principal the operator granted ``status`` (every
principal without a ``may`` list has it) sees the whole node: objects, bytes, plans and
connections of every session. Any other principal sees only its own session's objects,
bytes and plans; the node-wide numbers are None, so one coordinator learns nothing of the
others' activity (``scope`` says which view it got).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..version import __version__
from .interpreter import StoredPlan
from .policy import Caller, Policy
from .store import ObjectStore

__all__ = ["STATUS_FIELDS", "node_status", "Started"]

STATUS_FIELDS = (
    "id", "version", "policy", "scope", "uptime_s", "principals", "connections",
    "objects", "bytes", "plans", "memory_budget", "memory_used",
)
"""The keys of a status map, in the order ``fedws status`` prints them."""


class Started:
    """When the node started (monotonic clock), for its uptime."""

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = time.monotonic()

    def uptime(self) -> float:
        return time.monotonic() - self.at


def node_status(
    node_id: str,
    store: ObjectStore,
    policy: Policy,
    *,
    caller: Caller | None,
    started: Started,
    budget: int,
    connections: Callable[[], dict[str, int]] | None,
) -> dict[str, Any]:
    """The status map for ``caller`` (None: the open policy, everything is visible)."""
    whole = caller is None or not policy.enforce or policy.allows(caller.principal, "status")
    with store.lock:
        if whole:
            ids = list(store.objects)
        else:
            ids = [i for i, owner in store.owners.items() if owner is caller]
        plans = sum(1 for i in ids if isinstance(store.objects.get(i), StoredPlan))
        nbytes = store.nbytes if whole else sum(store._sizes.get(i, 0) for i in ids)
    conns = connections() if (whole and connections is not None) else {}
    return {
        "id": node_id,
        "version": __version__,
        "policy": policy.mode,
        "scope": "node" if whole else "session",
        "uptime_s": round(started.uptime(), 3),
        "principals": len(conns) if whole else None,
        "connections": sum(conns.values()) if whole else None,
        "objects": len(ids),
        "bytes": nbytes,
        "plans": plans,
        "memory_budget": budget if whole else None,
        "memory_used": store.nbytes if whole else None,
    }
