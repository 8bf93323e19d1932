"""fedws.fl.partition: every index exactly once, the promised sizes, the same split per seed."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedws.fl.partition import dirichlet, iid, quantity_skew, shards, split_counts

clients = st.integers(min_value=1, max_value=12)
sizes = st.integers(min_value=0, max_value=300)
seeds = st.integers(min_value=0, max_value=2**32)
alphas = st.floats(min_value=0.01, max_value=100.0)
label_lists = st.lists(st.integers(min_value=0, max_value=9), max_size=300)


def assert_exact_cover(parts: list[list[int]], n: int) -> None:
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))  # every index once, none twice, none missing


@settings(max_examples=60, deadline=None)
@given(sizes, clients, seeds)
def test_iid_covers_and_balances(n: int, k: int, seed: int) -> None:
    parts = iid(n, k, seed=seed)
    assert len(parts) == k
    assert_exact_cover(parts, n)
    lens = [len(p) for p in parts]
    assert max(lens) - min(lens) <= 1
    assert parts == iid(n, k, seed=seed)


@settings(max_examples=60, deadline=None)
@given(label_lists, clients, alphas, seeds)
def test_dirichlet_covers_and_is_deterministic(labels: list[int], k: int, alpha: float, seed: int) -> None:
    parts = dirichlet(labels, k, alpha, seed=seed)
    assert len(parts) == k
    assert_exact_cover(parts, len(labels))
    assert parts == dirichlet(labels, k, alpha, seed=seed)
    assert parts == dirichlet(torch.tensor(labels, dtype=torch.long), k, alpha, seed=seed)  # tensors too


@settings(max_examples=60, deadline=None)
@given(label_lists, clients, st.integers(min_value=1, max_value=5), seeds)
def test_shards_cover_and_sizes(labels: list[int], k: int, per: int, seed: int) -> None:
    parts = shards(labels, k, per, seed=seed)
    assert len(parts) == k
    assert_exact_cover(parts, len(labels))
    lens = [len(p) for p in parts]
    assert max(lens) - min(lens) <= per
    assert parts == shards(labels, k, per, seed=seed)


@settings(max_examples=60, deadline=None)
@given(sizes, clients, alphas, seeds, st.integers(min_value=0, max_value=20))
def test_quantity_skew_covers_and_respects_min_size(n: int, k: int, alpha: float, seed: int, min_size: int) -> None:
    if min_size * k > n:
        with pytest.raises(ValueError):
            quantity_skew(n, k, alpha, seed=seed, min_size=min_size)
        return
    parts = quantity_skew(n, k, alpha, seed=seed, min_size=min_size)
    assert len(parts) == k
    assert_exact_cover(parts, n)
    assert all(len(p) >= min_size for p in parts)
    assert parts == quantity_skew(n, k, alpha, seed=seed, min_size=min_size)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=20))
def test_split_counts_sum_to_total(total: int, weights: list[float]) -> None:
    counts = split_counts(total, weights)
    assert sum(counts) == total and len(counts) == len(weights) and min(counts) >= 0
    s = sum(weights)
    if s > 0:  # largest remainder: each count within one of its exact share
        assert all(abs(c - total * w / s) < 1 for c, w in zip(counts, weights))


def test_small_alpha_skews_labels_and_large_alpha_does_not() -> None:
    labels = [i % 10 for i in range(2000)]

    def classes_per_client(alpha: float) -> float:
        parts = dirichlet(labels, 5, alpha, seed=1)
        # classes holding at least 5% of a client's examples
        return sum(
            sum(1 for c in Counter(labels[i] for i in p).values() if c >= 0.05 * len(p)) for p in parts if p
        ) / 5

    assert classes_per_client(0.05) < 4
    assert classes_per_client(1000.0) == 10


def test_shards_give_each_client_few_labels() -> None:
    labels = [i % 10 for i in range(1000)]
    parts = shards(labels, 5, shards_per_client=2, seed=0)
    assert all(len({labels[i] for i in p}) <= 2 for p in parts)


def test_seeds_differ_and_bad_arguments_are_refused() -> None:
    assert iid(100, 3, seed=1) != iid(100, 3, seed=2)
    with pytest.raises(ValueError):
        iid(10, 0)
    with pytest.raises(ValueError):
        dirichlet([0, 1], 2, alpha=0.0)
    with pytest.raises(ValueError):
        shards([0, 1], 2, shards_per_client=0)
