"""Client sampling: every method is seeded, deterministic and picks the right count."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedws as sy
from fedws.fl import FedAvg, FedAvgConfig
from fedws.fl.sampling import (
    sample_fraction,
    sample_nodes,
    sample_round_robin,
    sample_weighted,
    select_nodes,
)
from tests.fl.test_fl_fedavg import federation, make_model

NODES = [f"n{i}" for i in range(10)]


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 12),
    count=st.integers(1, 12),
    seed=st.integers(0, 99),
    r=st.integers(1, 50),
    method=st.sampled_from(["uniform", "weighted", "round_robin"]),
)
def test_every_method_picks_count_distinct_nodes_in_order_reproducibly(
    n: int, count: int, seed: int, r: int, method: str
) -> None:
    nodes = NODES[:n] + [f"m{i}" for i in range(max(0, n - 10))]
    weights = [float(i + 1) for i in range(len(nodes))]
    picked = select_nodes(method, nodes, count, seed=seed, round_number=r, weights=weights)
    assert len(picked) == min(count, len(nodes)) and len(set(picked)) == len(picked)
    assert picked == [x for x in nodes if x in picked]  # original order
    assert picked == select_nodes(method, nodes, count, seed=seed, round_number=r, weights=weights)


def test_uniform_is_sample_nodes() -> None:
    for r in range(1, 6):
        assert select_nodes("uniform", NODES, 3, seed=4, round_number=r) == sample_nodes(NODES, 3, seed=4, round_number=r)
    assert len({tuple(sample_nodes(NODES, 3, seed=4, round_number=r)) for r in range(1, 6)}) > 1


def test_fraction_rounds_up_and_keeps_a_minimum() -> None:
    assert len(sample_fraction(NODES, 0.25, seed=0, round_number=1)) == 3
    assert len(sample_fraction(NODES, 0.01, seed=0, round_number=1, minimum=2)) == 2
    assert sample_fraction(NODES, 1.0, seed=0, round_number=1) == NODES
    with pytest.raises(ValueError, match="fraction"):
        sample_fraction(NODES, 0.0, seed=0, round_number=1)


def test_round_robin_takes_everyone_in_turn() -> None:
    rounds = [sample_round_robin(NODES, 3, seed=0, round_number=r) for r in range(1, 11)]
    assert rounds[0] == ["n0", "n1", "n2"] and rounds[1] == ["n3", "n4", "n5"]
    assert rounds[3] == ["n0", "n1", "n9"]  # wraps around
    assert Counter(n for picks in rounds for n in picks) == Counter({n: 3 for n in NODES})
    assert sample_round_robin(NODES, 3, seed=1, round_number=1) == ["n1", "n2", "n3"]


def test_weighted_prefers_heavy_nodes_and_skips_weightless_ones() -> None:
    weights = [100.0] + [1.0] * 8 + [0.0]
    counts = Counter(n for r in range(1, 201) for n in sample_weighted(NODES, 2, weights, seed=0, round_number=r))
    assert counts["n0"] > 190  # drawn almost always
    assert counts["n9"] == 0
    assert sample_weighted(NODES, 9, weights, seed=0, round_number=1) == NODES[:9]
    with pytest.raises(ValueError, match="weights"):
        sample_weighted(NODES, 2, [1.0], seed=0, round_number=1)
    with pytest.raises(ValueError, match=">= 0"):
        sample_weighted(NODES, 2, [-1.0] * 10, seed=0, round_number=1)
    with pytest.raises(ValueError, match="unknown sampling"):
        select_nodes("bogus", NODES, 2, seed=0, round_number=1)


@pytest.mark.parametrize("method", ["round_robin", "weighted"])
def test_fedavg_samples_by_the_configured_method(hook: sy.TorchHook, method: str) -> None:
    workers = federation(hook, {"a": 40, "b": 40, "c": 40, "d": 200})
    cfg = FedAvgConfig(rounds=4, nodes_per_round=2, seed=3, sampling=method)
    history = FedAvg(make_model(), workers, cfg, progress=False).fit()
    picks = [r.nodes for r in history]
    assert all(len(p) == 2 for p in picks)
    if method == "round_robin":
        assert picks == [["a", "d"], ["b", "c"], ["a", "d"], ["b", "c"]]  # seed 3 starts at d
    else:
        assert sum("d" in p for p in picks[1:]) >= 2  # the big node, once its size is known
