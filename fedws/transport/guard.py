"""Keeping a node reachable for honest coordinators: limits on handshakes, per address.

Two small bookkeeping classes with no I/O (a clock is passed in, so tests need no sleeps);
:class:`~fedws.transport.server.FrameServer` consults them:

- :class:`PendingHandshakes` caps the TCP connections from one address that have not
  finished the WebSocket handshake. A client that opens hundreds of connections and never
  speaks used to hold every file descriptor the node had; past the cap, its next
  connection is closed at once and other addresses are not affected.
- :class:`FailureLimiter` counts wrong or missing tokens per address. After
  ``max_failures`` within ``window`` seconds the address is refused (HTTP 429, the token not
  even checked) for ``cooldown`` seconds, and each burst is logged once, not per attempt.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["PendingHandshakes", "FailureLimiter", "Verdict"]


class PendingHandshakes:
    """Connections per address that are open but not past the handshake yet.

    Args:
        per_address: the most one address may have pending; the next is refused.
    """

    def __init__(self, per_address: int = 64) -> None:
        if per_address < 1:
            raise ValueError("per_address must be at least 1")
        self.per_address = per_address
        self._pending: dict[str, int] = {}
        self._capped: set[str] = set()  # addresses at the cap whose refusals were logged
        self.refused = 0

    def begin(self, address: str) -> bool:
        """A connection from ``address`` arrived; False: refuse it (over the cap)."""
        count = self._pending.get(address, 0)
        if count >= self.per_address:
            self.refused += 1
            return False
        self._pending[address] = count + 1
        return True

    def end(self, address: str) -> None:
        """A connection ``begin`` accepted finished its handshake (or failed or closed)."""
        count = self._pending.get(address, 0) - 1
        if count < self.per_address:
            self._capped.discard(address)
        if count > 0:
            self._pending[address] = count
        else:
            self._pending.pop(address, None)

    def first_refusal(self, address: str) -> bool:
        """Whether this refusal of ``address`` is the first of its burst (log it, not the rest)."""
        if address in self._capped:
            return False
        self._capped.add(address)
        return True

    def pending(self, address: str) -> int:
        return self._pending.get(address, 0)


@dataclass
class _Record:
    failures: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0
    refused_while_blocked: int = 0


@dataclass(frozen=True)
class Verdict:
    """What :meth:`FailureLimiter.failed` decided about one failure.

    Attributes:
        log: the first failure of a burst, or the one that blocks the address: log it (and
            only it).
        blocked: the address is now refused for the cool-down.
        failures: failures of this address within the window, this one included.
    """

    log: bool
    blocked: bool
    failures: int


class FailureLimiter:
    """Wrong tokens per address: after too many, refuse the address for a while.

    Args:
        max_failures: failures within ``window`` that block the address.
        window: seconds the failures are counted over.
        cooldown: seconds a blocked address is refused without checking its token.
        max_addresses: addresses remembered at most (the least recently failing are
            forgotten), so a flood of addresses cannot grow the table without bound.
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        max_failures: int = 10,
        window: float = 10.0,
        cooldown: float = 30.0,
        *,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.cooldown = cooldown
        self.max_addresses = max_addresses
        self.clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def blocked_for(self, address: str) -> float:
        """Seconds ``address`` stays refused (0: it may try); counts a refused attempt."""
        record = self._records.get(address)
        if record is None:
            return 0.0
        left = record.blocked_until - self.clock()
        if left <= 0:
            return 0.0
        record.refused_while_blocked += 1
        return left

    def failed(self, address: str) -> Verdict:
        """``address`` presented a wrong or missing token."""
        now = self.clock()
        record = self._records.pop(address, None) or _Record()
        self._records[address] = record  # most recently failing last
        while len(self._records) > self.max_addresses:
            self._records.popitem(last=False)
        failures = record.failures
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        first_of_burst = not failures
        failures.append(now)
        if len(failures) >= self.max_failures:
            failures.clear()
            record.blocked_until = now + self.cooldown
            record.refused_while_blocked = 0
            return Verdict(log=True, blocked=True, failures=self.max_failures)
        return Verdict(log=first_of_burst, blocked=False, failures=len(failures))
