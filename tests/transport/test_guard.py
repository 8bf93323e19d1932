"""The handshake guards with no I/O: a fake clock, addresses as strings."""

from __future__ import annotations

import pytest

from fedws.transport.guard import FailureLimiter, PendingHandshakes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pending_handshakes_are_capped_per_address_only() -> None:
    guard = PendingHandshakes(per_address=3)
    assert all(guard.begin("10.0.0.9") for _ in range(3))
    assert not guard.begin("10.0.0.9")
    assert guard.first_refusal("10.0.0.9") and not guard.first_refusal("10.0.0.9")  # logged once
    assert guard.begin("10.0.0.1")  # another address is not affected
    guard.end("10.0.0.9")
    assert guard.begin("10.0.0.9")  # a finished handshake frees a place
    for _ in range(4):
        guard.end("10.0.0.9")
    assert guard.pending("10.0.0.9") == 0
    with pytest.raises(ValueError):
        PendingHandshakes(0)


def test_wrong_tokens_block_the_address_for_a_cooldown_and_log_once_per_burst() -> None:
    clock = Clock()
    limiter = FailureLimiter(max_failures=10, window=10.0, cooldown=30.0, clock=clock)
    verdicts = [limiter.failed("10.0.0.9") for _ in range(10)]
    assert [v.log for v in verdicts] == [True] + [False] * 8 + [True]  # burst start, block
    assert verdicts[-1].blocked and not any(v.blocked for v in verdicts[:-1])
    assert limiter.blocked_for("10.0.0.9") == pytest.approx(30.0)
    assert limiter.blocked_for("10.0.0.1") == 0.0  # others may try
    clock.now += 29.0
    assert limiter.blocked_for("10.0.0.9") == pytest.approx(1.0)
    clock.now += 1.5
    assert limiter.blocked_for("10.0.0.9") == 0.0  # cool-down over
    assert limiter.failed("10.0.0.9").log  # a new burst is logged again


def test_failures_outside_the_window_do_not_add_up() -> None:
    clock = Clock()
    limiter = FailureLimiter(max_failures=3, window=10.0, cooldown=30.0, clock=clock)
    for _ in range(10):
        assert not limiter.failed("10.0.0.9").blocked
        clock.now += 6.0  # at most 2 failures in any 10 s
    assert limiter.blocked_for("10.0.0.9") == 0.0


def test_the_table_of_addresses_is_bounded() -> None:
    limiter = FailureLimiter(max_addresses=100, clock=Clock())
    for i in range(1000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter._records) == 100
