"""Object and message ids.

Ids are drawn by the coordinator so a pointer to a result exists before the node runs
anything. They come from a private generator seeded from the OS, so a user calling
``random.seed`` or ``torch.manual_seed`` can never make two processes draw the same ids.
"""

from __future__ import annotations

import os
import random
from contextvars import ContextVar

__all__ = ["new_id", "planned_result_ids"]

_rng = random.Random(int.from_bytes(os.urandom(16), "little"))
_getrandbits = _rng.getrandbits

# Ids a node was told to store the results of the running command under. When a node runs
# an op on a pointer it holds, the pointer layer takes its result ids from here, so the
# result has the same id all down a pointer chain (what the seed tutorial shows).
planned_result_ids: ContextVar[list[int] | None] = ContextVar("planned_result_ids", default=None)


def new_id() -> int:
    """Return a fresh random 63-bit object id (fits a signed int64 everywhere)."""
    return _getrandbits(63) or 1


def after_fork() -> None:
    """Reseed after ``os.fork`` so parent and child do not share an id stream."""
    _rng.seed(int.from_bytes(os.urandom(16), "little"))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=after_fork)
