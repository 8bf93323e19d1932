# ruff: noqa: B018, UP008, UP032  (the tutorial's cells, as written)
"""PySyft 0.2 "Part 09 - Intro to Encrypted Programs", cell by cell, with ``import fedws as sy``.

The workers are the tutorial's (``bob``, ``alice``, ``bill``, ``crypto_provider``), on both
transports; real nodes are linked with ``add_worker`` first (their operator's peer list),
which in-process workers of one federation will not need. Every cell runs as written
(comparisons use fedws's own protocol, not SecureNN: see fedws.smpc.compare).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

import fedws as sy


@pytest.fixture
def workers(make_worker: Callable[..., sy.Worker], transport: str) -> dict[str, Any]:
    bob, alice, bill, crypto_provider = (make_worker(i) for i in ("bob", "alice", "bill", "crypto_provider"))
    every = (bob, alice, bill, crypto_provider)
    for a in every:
        for b in every:
            if a is not b:
                a.add_worker(b)
    return {"bob": bob, "alice": alice, "bill": bill, "crypto_provider": crypto_provider, "transport": transport}


def test_step1_and_2_encrypt_decrypt_add_by_hand() -> None:
    Q = 1234567891011
    x = 25

    def encrypt(x: int) -> tuple[int, int, int]:
        share_a = random.randint(-Q, Q)
        share_b = random.randint(-Q, Q)
        share_c = (x - share_a - share_b) % Q
        return (share_a, share_b, share_c)

    encrypt(x)

    def decrypt(*shares: int) -> int:
        return sum(shares) % Q

    a, b, c = encrypt(25)
    assert decrypt(a, b, c) == 25
    decrypt(a, b)
    x3 = encrypt(25)
    y3 = encrypt(5)

    def add(x: Any, y: Any) -> list[int]:
        z = list()
        z.append((x[0] + y[0]) % Q)
        z.append((x[1] + y[1]) % Q)
        z.append((x[2] + y[2]) % Q)
        return z

    assert decrypt(*add(x3, y3)) == 30


def test_step3_smpc_using_fedws(workers: dict[str, Any]) -> None:
    bob, alice, bill = workers["bob"], workers["alice"], workers["bill"]
    # Basic Encryption/Decryption
    x = torch.tensor([25])
    x
    encrypted_x = x.share(bob, alice, bill)
    assert encrypted_x.get().tolist() == [25]

    # Introspecting the Encrypted Values
    if workers["transport"] == "virtual":  # `_objects` is the in-process worker's store
        assert bob._objects == {}
        x = torch.tensor([25]).share(bob, alice, bill)
        bobs_share = list(bob._objects.values())[0]
        bobs_share
        alices_share = list(alice._objects.values())[0]
        alices_share
        bills_share = list(bill._objects.values())[0]
        bills_share
        assert (bobs_share + alices_share + bills_share).tolist() == [25]

    # Encrypted Arithmetic
    x = torch.tensor([25]).share(bob, alice)
    y = torch.tensor([5]).share(bob, alice)
    z = x + y
    assert z.get().tolist() == [30]
    z = x - y
    assert z.get().tolist() == [20]


def test_encrypted_multiplication_and_matmul(workers: dict[str, Any]) -> None:
    bob, alice = workers["bob"], workers["alice"]
    crypto_provider = workers["crypto_provider"]
    x = torch.tensor([25]).share(bob, alice, crypto_provider=crypto_provider)
    y = torch.tensor([5]).share(bob, alice, crypto_provider=crypto_provider)
    # multiplication
    z = x * y
    assert z.get().tolist() == [125]

    x = torch.tensor([[1, 2], [3, 4]]).share(bob, alice, crypto_provider=crypto_provider)
    y = torch.tensor([[2, 0], [0, 2]]).share(bob, alice, crypto_provider=crypto_provider)
    # matrix multiplication
    z = x.mm(y)
    assert z.get().tolist() == [[2, 4], [6, 8]]


def test_encrypted_comparison_and_max(workers: dict[str, Any]) -> None:
    bob, alice = workers["bob"], workers["alice"]
    crypto_provider = workers["crypto_provider"]
    x = torch.tensor([25]).share(bob, alice, crypto_provider=crypto_provider)
    y = torch.tensor([5]).share(bob, alice, crypto_provider=crypto_provider)
    z = x > y
    assert z.get().tolist() == [1]
    z = x <= y
    assert z.get().tolist() == [0]
    z = x == y
    assert z.get().tolist() == [0]
    z = x == y + 20
    assert z.get().tolist() == [1]

    # You can also perform max operations
    x = torch.tensor([2, 3, 4, 1]).share(bob, alice, crypto_provider=crypto_provider)
    assert x.max().get().tolist() == [4]
    x = torch.tensor([[2, 3], [4, 1]]).share(bob, alice, crypto_provider=crypto_provider)
    max_values, max_ids = x.max(dim=0)
    assert max_values.get().tolist() == [4, 3]
