"""Shares are uniform over the ring and independent of the secret, and come from a CSPRNG.

Statistical tests (chi-square on high and low bits, Kolmogorov-Smirnov) over many draws,
at alpha about 1e-4; a test of the tests shows they reject a biased sharing.
"""

from __future__ import annotations

import secrets

import pytest
import torch
from smpc_stats import (
    CHI2_15_CRITICAL,
    KS_C,
    assert_same_distribution,
    assert_uniform,
    chi2_top_nibble,
    ks_two_sample,
)

from fedws.node import random_shares
from fedws.smpc import ring

N = 20_000


@pytest.mark.parametrize("secret", [0, 25, -(10**6), 2**62])
@pytest.mark.parametrize("n", [2, 3])
def test_each_local_share_is_uniform_whatever_the_secret(secret: int, n: int) -> None:
    shares = ring.split_local(torch.full((N,), secret, dtype=torch.int64), n)
    for share in shares:  # the last one (the difference) too
        assert_uniform(share)


def test_a_workers_share_is_independent_of_the_secret_over_many_draws() -> None:
    """One scalar shared 4000 times: the first party's shares of 0 and of 10^9 alike."""
    draws = 4000
    for index in (0, 1):
        small = torch.stack([ring.split_local(torch.tensor(0), 2)[index] for _ in range(draws)])
        large = torch.stack([ring.split_local(torch.tensor(10**9), 2)[index] for _ in range(draws)])
        assert_uniform(small)
        assert_uniform(large)
        assert_same_distribution(small, large)


def test_the_checks_reject_a_biased_sharing() -> None:
    """Shares like PySyft's tutorial ``random.randint(-Q, Q)`` with a small Q are not uniform
    over the ring and carry the secret: the statistics here see it."""
    q = 2**40
    small = torch.randint(-q, q, (N,), dtype=torch.int64)
    assert chi2_top_nibble(small) > CHI2_15_CRITICAL
    other = 10**12 - torch.randint(-q, q, (N,), dtype=torch.int64)  # the second share of 10^12
    assert ks_two_sample(small, other) > KS_C


def test_local_shares_come_from_secrets_not_torchs_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = secrets.token_bytes

    def token_bytes(n: int) -> bytes:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(ring.secrets, "token_bytes", token_bytes)
    secret = torch.arange(10, dtype=torch.int64)
    torch.manual_seed(0)
    first = ring.split_local(secret, 3)
    torch.manual_seed(0)
    second = ring.split_local(secret, 3)
    assert calls == [80, 80, 80, 80]  # n - 1 = 2 random shares per split, 8 bytes an element
    assert not torch.equal(first[0], second[0])  # a seeded torch does not reproduce them


def test_node_shares_come_from_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = secrets.token_bytes

    def token_bytes(n: int) -> bytes:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(random_shares.secrets, "token_bytes", token_bytes)
    random_shares.split(torch.zeros(4, dtype=torch.int64), 2)
    random_shares.triple("matmul", [2, 3], [3, 5], 2)
    # split: 1 share; triple: a, b, then one random share of each of a, b, c
    assert calls == [32, 48, 120, 48, 120, 80]


@pytest.mark.parametrize("secret", [0, 7, -(2**50)])
def test_node_split_shares_are_uniform(secret: int) -> None:
    for share in random_shares.split(torch.full((N,), secret, dtype=torch.int64), 3):
        assert_uniform(share)


def test_node_split_shares_are_independent_of_the_secret() -> None:
    small = random_shares.split(torch.zeros(N, dtype=torch.int64), 2)
    large = random_shares.split(torch.full((N,), 10**12, dtype=torch.int64), 2)
    for a, b in zip(small, large):
        assert_same_distribution(a, b)


def test_triple_shares_are_uniform_and_c_independent_of_a_and_b() -> None:
    parts = random_shares.triple("mul", [N], [N], 2)
    for p in parts:
        assert_uniform(p)


def test_and_triple_and_bit_shares_are_uniform() -> None:
    for p in random_shares.triple("and", [N], [N], 2):
        assert_uniform(p)
    made = random_shares.bits([N], 2)
    for p in made[:1] + made[2:3]:  # one XOR share, one additive share of the bits
        assert_uniform(p)
