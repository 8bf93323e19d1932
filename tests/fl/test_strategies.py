"""Strategies: property tests of every aggregation function, then the strategies in a run.

The pure functions get hypothesis tests (permutation invariance, agreement on equal
updates, robustness to one poisoned update, dtypes and shapes kept); the end-to-end tests
train a tiny model for a few rounds on VirtualWorkers and real node processes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedws as sy
from fedws.fl import (
    EarlyStopping,
    FedAdam,
    FedAvg,
    FedAvgConfig,
    FedAvgStrategy,
    FedProx,
    FitResult,
    Krum,
    Strategy,
    WeightedAverageStrategy,
    get_strategy,
    load_checkpoint,
    train_federated,
)
from fedws.fl.aggregate import StateDict, fedavg
from fedws.fl.strategies import (
    STRATEGIES,
    adaptive_step,
    coordinate_median,
    fedavgm_step,
    fedmedian,
    fedtrimmedavg,
    krum,
    krum_select,
    trimmed_mean,
)
from fedws.fl.strategy import EvaluateResult
from tests.fl.test_fl_fedavg import FAST, TEST, blobs, federation, make_model, shard

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = settings(max_examples=40, deadline=None)

floats = st.floats(min_value=-100, max_value=100, allow_nan=False, width=32)


@st.composite
def state_dicts(draw: st.DrawFn, min_n: int = 1, max_n: int = 7) -> list[dict[str, torch.Tensor]]:
    """``n`` state dicts with the same keys and shapes: a float matrix, a float vector, an int counter."""
    n = draw(st.integers(min_n, max_n))
    rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    states = []
    for _ in range(n):
        w = draw(st.lists(floats, min_size=rows * cols, max_size=rows * cols))
        b = draw(st.lists(floats, min_size=cols, max_size=cols))
        c = draw(st.integers(0, 1000))
        states.append(
            {
                "w": torch.tensor(w, dtype=torch.float32).reshape(rows, cols),
                "b": torch.tensor(b, dtype=torch.float64),
                "count": torch.tensor(c, dtype=torch.int64),
            }
        )
    return states


def close(a: StateDict, b: StateDict, atol: float = 1e-4) -> bool:
    """Equal up to float rounding; integer entries (``num_batches_tracked``) are averaged in
    float64 and rounded, so a sum landing on a .5 tie may round either way: within 1."""
    return a.keys() == b.keys() and all(
        torch.allclose(a[k].double(), b[k].double(), atol=max(atol, 1.0) if not a[k].is_floating_point() else atol,
                       rtol=1e-5)
        for k in a
    )


def same_layout(out: StateDict, ref: StateDict) -> bool:
    return list(out) == list(ref) and all(
        out[k].shape == ref[k].shape and out[k].dtype == ref[k].dtype for k in ref
    )


Aggregator = Callable[[Sequence[StateDict]], dict[str, torch.Tensor]]

AGGREGATORS: dict[str, Aggregator] = {
    "fedavg": lambda states: fedavg([(s, 1) for s in states]),
    "median": fedmedian,
    "trimmed_mean": lambda states: fedtrimmedavg(states, 0.2),
    "multikrum": lambda states: krum(states, f=0, m=len(states) - 2) if len(states) > 2 else fedmedian(states),
}


# -- properties every aggregation function has --------------------------------------------------


@pytest.mark.parametrize("name", list(AGGREGATORS))
@SETTINGS
@given(states=state_dicts(), data=st.data())
def test_permutation_invariant(name: str, states: list[dict[str, torch.Tensor]], data: st.DataObject) -> None:
    agg = AGGREGATORS[name]
    shuffled = data.draw(st.permutations(states))
    assert close(agg(states), agg(shuffled))


@pytest.mark.parametrize("name", list(AGGREGATORS))
@SETTINGS
@given(states=state_dicts(max_n=1), n=st.integers(1, 6))
def test_equal_updates_give_that_update(name: str, states: list[dict[str, torch.Tensor]], n: int) -> None:
    out = AGGREGATORS[name]([states[0]] * n)
    assert close(out, states[0], atol=1e-5)


@pytest.mark.parametrize("name", list(AGGREGATORS))
@SETTINGS
@given(states=state_dicts())
def test_shapes_and_dtypes_kept(name: str, states: list[dict[str, torch.Tensor]]) -> None:
    out = AGGREGATORS[name](states)
    assert same_layout(out, states[0])


@pytest.mark.parametrize("name", list(AGGREGATORS))
@SETTINGS
@given(states=state_dicts(min_n=3))
def test_the_result_lies_within_the_updates(name: str, states: list[dict[str, torch.Tensor]]) -> None:
    out = AGGREGATORS[name](states)
    for k in ("w", "b"):
        stacked = torch.stack([s[k].double() for s in states])
        assert bool((out[k].double() >= stacked.min(0).values - 1e-4).all())
        assert bool((out[k].double() <= stacked.max(0).values + 1e-4).all())


@SETTINGS
@given(states=state_dicts(), data=st.data())
def test_inputs_are_not_modified(states: list[dict[str, torch.Tensor]], data: st.DataObject) -> None:
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    for agg in AGGREGATORS.values():
        agg(states)
    fedavgm_step(states[0], states[-1], None)
    adaptive_step(states[0], states[-1], None, None)
    assert all(close(a, b, atol=0) for a, b in zip(states, before))


# -- robustness to one poisoned update -------------------------------------------------------


def poisoned(states: list[dict[str, torch.Tensor]], sign: float) -> list[dict[str, torch.Tensor]]:
    bad = {k: (torch.full_like(v, sign * 1e9) if v.dtype.is_floating_point else v.clone()) for k, v in states[0].items()}
    return [*states, bad]


@pytest.mark.parametrize(
    "name, aggregate",
    [
        ("median", fedmedian),
        ("trimmed_mean", lambda s: fedtrimmedavg(s, 0.25)),
        ("krum", lambda s: krum(s, f=1)),
        ("multikrum", lambda s: krum(s, f=1, m=2)),
    ],
)
@SETTINGS
@given(states=state_dicts(min_n=4, max_n=6), sign=st.sampled_from([1.0, -1.0]))
def test_robust_to_one_huge_poisoned_update(
    name: str, aggregate: Aggregator, states: list[dict[str, torch.Tensor]], sign: float
) -> None:
    out = aggregate(poisoned(states, sign))
    for k in ("w", "b"):  # stays within the honest updates' range
        honest = torch.stack([s[k].double() for s in states])
        assert bool((out[k].double() >= honest.min(0).values - 1e-3).all())
        assert bool((out[k].double() <= honest.max(0).values + 1e-3).all())


def test_the_mean_is_not_robust() -> None:
    honest = [{"w": torch.zeros(2)} for _ in range(4)]
    bad = poisoned(honest, 1.0)
    assert fedavg([(s, 1) for s in bad])["w"].abs().max() > 1e8  # what the robust ones defend against
    assert krum_select(bad, f=1, m=4) == [0, 1, 2, 3]


def test_median_and_trimmed_mean_by_hand() -> None:
    vals = [torch.tensor([1.0, 10.0]), torch.tensor([3.0, 20.0]), torch.tensor([2.0, 30.0]), torch.tensor([100.0, 0.0])]
    assert coordinate_median(vals).tolist() == [2.5, 15.0]
    assert trimmed_mean(vals, 0.25).tolist() == [2.5, 15.0]
    assert trimmed_mean(vals, 0.0).tolist() == [26.5, 15.0]
    assert coordinate_median([torch.tensor([1, 2]), torch.tensor([2, 4])]).dtype == torch.int64


def test_bad_arguments_are_refused() -> None:
    states = [{"w": torch.zeros(1)} for _ in range(3)]
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean([torch.zeros(1)], 0.5)
    with pytest.raises(ValueError, match="2f \\+ 2"):
        krum_select(states, f=1)
    with pytest.raises(ValueError, match="keys"):
        fedmedian([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}])
    with pytest.raises(ValueError, match="unknown strategy"):
        get_strategy("fedbogus")
    with pytest.raises(ValueError, match="unknown strategy"):
        FedAvgConfig(strategy="fedbogus")
    with pytest.raises(ValueError, match="sampling"):
        FedAvgConfig(sampling="bogus")


# -- server optimizers -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
@SETTINGS
@given(states=state_dicts(min_n=2, max_n=2), rounds=st.integers(1, 3))
def test_adaptive_with_eta_zero_keeps_the_model(kind: Any, states: list[dict[str, torch.Tensor]], rounds: int) -> None:
    current, average = states
    m = v = None
    model = current
    for _ in range(rounds):
        model, m, v = adaptive_step(model, average, m, v, kind=kind, eta=0.0)
    assert close(model, {k: (current[k] if current[k].dtype.is_floating_point else average[k]) for k in current}, atol=0)
    assert same_layout(model, current)


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
@SETTINGS
@given(states=state_dicts(min_n=2, max_n=2))
def test_adaptive_steps_towards_the_average(kind: Any, states: list[dict[str, torch.Tensor]]) -> None:
    current, average = states
    new, _, _ = adaptive_step(current, average, None, None, kind=kind, eta=0.01)
    for k in ("w", "b"):
        delta = average[k].double() - current[k].double()
        moved = new[k].double() - current[k].double()
        assert bool((moved * delta >= -1e-6).all())  # never away from the average
        assert bool((moved.abs() <= 0.01 + 1e-4).all())  # |step| <= eta on the first round


@SETTINGS
@given(states=state_dicts(min_n=2, max_n=2))
def test_fedavgm_without_momentum_is_fedavg(states: list[dict[str, torch.Tensor]]) -> None:
    current, average = states
    new, velocity = fedavgm_step(current, average, None, server_lr=1.0, momentum=0.0)
    assert close(new, average, atol=1e-4) and same_layout(new, current)
    again, _ = fedavgm_step(new, average, velocity, server_lr=1.0, momentum=0.0)
    assert close(again, average, atol=1e-4)


def test_fedavgm_momentum_accumulates() -> None:
    current, average = {"w": torch.tensor([1.0])}, {"w": torch.tensor([0.0])}
    new, v = fedavgm_step(current, average, None, momentum=0.5)
    assert new["w"].item() == 0.0 and v["w"].item() == 1.0
    newer, v = fedavgm_step(new, {"w": torch.tensor([0.0])}, v, momentum=0.5)
    assert newer["w"].item() == -0.5  # momentum carries past the average


# -- strategy objects --------------------------------------------------------------------------


def results_of(states: list[dict[str, torch.Tensor]], counts: list[int]) -> list[FitResult]:
    return [FitResult(f"n{i}", s, c, {"train_loss": 1.0}) for i, (s, c) in enumerate(zip(states, counts))]


def test_every_named_strategy_aggregates_and_keeps_the_layout() -> None:
    states = [{"w": torch.randn(2, 3), "n": torch.tensor(i)} for i in range(5)]
    current = {"w": torch.zeros(2, 3), "n": torch.tensor(0)}
    for name in STRATEGIES:
        strategy = get_strategy(name)
        assert strategy.name == name and get_strategy(strategy) is strategy
        out = strategy.aggregate_fit(1, results_of(states, [1, 2, 3, 4, 5]), current)
        assert same_layout(out, current), name


def test_fedavg_strategy_is_the_weighted_mean() -> None:
    states = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([3.0])}]
    out = FedAvgStrategy().aggregate_fit(1, results_of(states, [1, 2]), states[0])
    assert out["w"].item() == 2.0


def test_fedprox_sends_mu_and_a_schedule_in_the_round_config() -> None:
    strategy = FedProx(mu=0.1, on_fit_config=lambda r: {"lr": 0.1 / r})
    assert strategy.configure_fit(2, ["a", "b"]) == {
        "a": {"lr": 0.05, "proximal_mu": 0.1},
        "b": {"lr": 0.05, "proximal_mu": 0.1},
    }
    assert Strategy().configure_fit(1, ["a"]) == {"a": {}}


def test_aggregate_evaluate_weights_by_examples() -> None:
    results = [EvaluateResult("a", 1, {"acc": 1.0, "mse": 2.0}), EvaluateResult("b", 3, {"acc": 0.0})]
    assert Strategy().aggregate_evaluate(1, results) == {"acc": 0.25, "mse": 2.0}


# -- in a run ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fedmedian", "fedadam"])
def test_strategies_train_on_every_transport(make_worker: Any, name: str) -> None:
    workers, keep = [], []
    for i, wid in enumerate(["alice", "bob", "carol"]):
        w = make_worker(wid)
        keep += [t.send(w) for t in shard(*blobs(80, seed=i))]
        workers.append(w)
    model = make_model()
    history = FedAvg(model, workers, FedAvgConfig(**FAST), test_data=TEST, strategy=name, progress=False).fit()
    assert [r.nodes for r in history] == [["alice", "bob", "carol"]] * 3
    assert history[-1].test_accuracy is not None and history[-1].test_accuracy > 0.6


def test_strategy_from_the_config_and_train_federated(hook: sy.TorchHook) -> None:
    workers = federation(hook, {"a": 60, "b": 60, "c": 60, "d": 60, "e": 60})
    cfg = FedAvgConfig(**{**FAST, "rounds": 2}, strategy=Krum(f=1, m=2))
    history = train_federated(make_model(), workers, cfg, test_data=TEST, progress=False)
    assert len(history) == 2 and history[-1].test_accuracy > 0.6
    assert cfg.to_dict()["strategy"] == "krum"


class Recorder(WeightedAverageStrategy):
    """A user strategy: FedAvg that records what its hook was given."""

    def __init__(self) -> None:
        super().__init__(on_fit_config=lambda r: {"round": r})
        self.seen: list[tuple[int, list[str]]] = []

    def aggregate_fit(self, round_number: int, results: Sequence[FitResult], current: StateDict) -> dict[str, Any]:
        assert all(r.metrics["train_loss"] > 0 and r.num_examples == 50 for r in results)
        self.seen.append((round_number, sorted(r.node_id for r in results)))
        return super().aggregate_fit(round_number, results, current)


def test_a_user_strategy_sees_every_round(hook: sy.TorchHook) -> None:
    workers = federation(hook, {"alice": 50, "bob": 50})
    recorder = Recorder()
    trainer = FedAvg(make_model(), workers, FedAvgConfig(**FAST), strategy=recorder, progress=False)
    trainer.fit()
    assert recorder.seen == [(r, ["alice", "bob"]) for r in (1, 2, 3)]
    assert trainer.fit_configs == {"alice": {"round": 3}, "bob": {"round": 3}}


@pytest.mark.parametrize("trusted", [False, True], ids=["coordinator", "trusted"])
def test_fedadam_with_eta_zero_keeps_the_model(hook: sy.TorchHook, trusted: bool) -> None:
    workers = federation(hook, {"alice": 50, "bob": 50})
    aggregator = sy.VirtualWorker(hook, id="secure") if trusted else None
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    FedAvg(model, workers, FedAvgConfig(rounds=2), strategy=FedAdam(eta=0.0), aggregator=aggregator, progress=False).fit()
    assert close(model.state_dict(), before, atol=0)


def test_robust_strategies_refuse_a_trusted_aggregator(hook: sy.TorchHook) -> None:
    workers = federation(hook, {"alice": 50, "bob": 50})
    with pytest.raises(ValueError, match="weighted average"):
        FedAvg(make_model(), workers, strategy="fedmedian", aggregator=sy.VirtualWorker(hook, id="secure"))


# -- early stopping and the best model -------------------------------------------------------


def test_early_stopping_stops_and_restores_the_best_model(
    hook: sy.TorchHook, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    workers = federation(hook, {"alice": 60, "bob": 60})
    stop = EarlyStopping("test_accuracy", patience=1, mode="max", min_delta=1.0, checkpoint_dir=tmp_path)
    model = make_model()
    with caplog.at_level(logging.INFO, logger="fedws.fl"):
        history = FedAvg(model, workers, FedAvgConfig(**{**FAST, "rounds": 10}, early_stopping=stop),
                         test_data=TEST, progress=False).fit()
    assert len(history) == 2 and stop.best_round == 1 and stop.stopped_round == 2  # nothing beats +1.0
    assert "early stop after round 2" in caplog.text
    best = load_checkpoint(tmp_path)
    assert best is not None and best.round == 1
    assert close(model.state_dict(), best.state, atol=0)  # the model is round 1's, restored


def test_early_stopping_by_hand() -> None:
    from fedws.fl.history import RoundMetrics

    stop = EarlyStopping("train_loss", patience=2, mode="min")
    state = {"w": torch.zeros(1)}
    losses = [1.0, 0.5, 0.6, 0.4, 0.45, 0.5]
    stops = [stop.update(RoundMetrics(round=i + 1, train_loss=x), state) for i, x in enumerate(losses)]
    assert stops == [False, False, False, False, False, True]
    assert stop.best == 0.4 and stop.best_round == 4
    with pytest.raises(ValueError, match="test_loss"):
        EarlyStopping().update(RoundMetrics(round=1, train_loss=1.0), state)
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="up")  # type: ignore[arg-type]
