"""FedAvg arithmetic, without a network: fedws.fl.aggregate is pure."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedws.fl.aggregate import fedavg, fedavg_weights, validate_updates


def _state(value: float, shape: tuple[int, ...] = (2, 3)) -> dict[str, torch.Tensor]:
    return {"w": torch.full(shape, value), "b": torch.full((shape[0],), -value)}


def test_weights_follow_sample_counts() -> None:
    out = fedavg([(_state(0.0), 1), (_state(3.0), 2)])
    assert torch.allclose(out["w"], torch.full((2, 3), 2.0))
    assert torch.allclose(out["b"], torch.full((2,), -2.0))


def test_zero_weight_update_is_ignored() -> None:
    out = fedavg([(_state(5.0), 0), (_state(1.0), 10)])
    assert torch.equal(out["w"], torch.full((2, 3), 1.0))


def test_result_keeps_key_order_and_dtype() -> None:
    a = {"z": torch.zeros(2, dtype=torch.float16), "a": torch.tensor([1, 3])}
    b = {"a": torch.tensor([3, 5]), "z": torch.ones(2, dtype=torch.float16)}
    out = fedavg([(a, 1), (b, 1)])
    assert list(out) == ["z", "a"]
    assert out["z"].dtype == torch.float16 and torch.equal(out["z"], torch.full((2,), 0.5, dtype=torch.float16))
    assert out["a"].dtype == torch.int64 and out["a"].tolist() == [2, 4]  # integers are rounded


def test_inputs_are_not_modified() -> None:
    a, b = _state(1.0), _state(2.0)
    fedavg([(a, 1), (b, 1)])
    assert torch.equal(a["w"], torch.ones(2, 3)) and torch.equal(b["w"], torch.full((2, 3), 2.0))


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ([], "at least one update"),
        ([(_state(1.0), 1), ({"w": torch.ones(2, 3)}, 1)], r"update 1 does not have the keys.*missing \['b'\]"),
        ([(_state(1.0), 1), (_state(1.0, (3, 2)), 1)], r"update 1: 'w' has shape \(3, 2\), update 0 has \(2, 3\)"),
        ([(_state(1.0), 1), ({"w": torch.ones(2, 3, dtype=torch.float64), "b": torch.ones(2)}, 1)], "dtype"),
        ([(_state(1.0), 1), ({"w": [1.0], "b": torch.ones(2)}, 1)], "not a tensor"),
        ([(_state(1.0), 0), (_state(2.0), 0)], "0 examples"),
        ([(_state(1.0), -1), (_state(2.0), 3)], "negative"),
    ],
)
def test_bad_updates_are_refused_clearly(updates: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fedavg(updates)


def test_validate_accepts_matching_updates() -> None:
    validate_updates([(_state(1.0), 3), (_state(2.0), 4)])


finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(values=st.lists(finite, min_size=6, max_size=6), copies=st.integers(1, 5), counts=st.data())
def test_average_of_identical_states_is_that_state(values: list[float], copies: int, counts: st.DataObject) -> None:
    state = {"w": torch.tensor(values).reshape(2, 3)}
    ns = counts.draw(st.lists(st.integers(1, 1000), min_size=copies, max_size=copies))
    out = fedavg([(state, n) for n in ns])
    assert torch.allclose(out["w"], state["w"], rtol=1e-6, atol=1e-4)


@settings(max_examples=50, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=6), counts=st.data())
def test_weights_are_respected(values: list[float], counts: st.DataObject) -> None:
    ns = counts.draw(st.lists(st.integers(0, 1000), min_size=len(values), max_size=len(values)))
    if sum(ns) == 0:
        ns[0] = 1
    out = fedavg([({"w": torch.tensor([v], dtype=torch.float64)}, n) for v, n in zip(values, ns)])
    expected = sum(v * n for v, n in zip(values, ns)) / sum(ns)
    assert out["w"].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    weights = fedavg_weights(ns)
    assert sum(weights) == pytest.approx(1.0)
    assert min(values) - 1e-9 <= out["w"].item() <= max(values) + 1e-9
