"""A coordinator that scales: streaming aggregation, rounds that touch only the sampled
nodes, and work of dropped nodes cancelled (VirtualWorkers; tiny model, seconds)."""

from __future__ import annotations

import gc
from collections import Counter
from concurrent.futures import Future
from typing import Any

import pytest
import torch
from torch import nn

import fedws as sy
from fedws.client.session import Session
from fedws.fl import FedAvg, FedAvgConfig
from fedws.fl import fedavg as fedavg_module
from fedws.fl.aggregate import RunningAverage, fedavg
from fedws.fl.strategy import WeightedAverageStrategy
from fedws.transport.inproc import InprocLink

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def node(hook: sy.TorchHook, name: str, seed: int, cls: type[sy.VirtualWorker] = sy.VirtualWorker) -> sy.VirtualWorker:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 2, (12,), generator=g)
    return cls(hook, id=name, data=[x.tag("#train", "#x"), y.tag("#train", "#y")])


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 2)


# -- RunningAverage ---------------------------------------------------------------------


def test_running_average_equals_fedavg_for_every_dtype() -> None:
    g = torch.Generator().manual_seed(0)
    updates = [
        ({"w": torch.randn(3, 2, generator=g), "n": torch.tensor(i), "b": torch.tensor([i % 2 == 0])}, c)
        for i, c in enumerate([5, 0, 7, 2])
    ]
    avg = RunningAverage()
    for state, count in updates:
        avg.add(state, count)
    got, want = avg.result(), fedavg(updates)
    assert list(got) == list(want) and avg.count == 4 and avg.total == 14
    assert torch.allclose(got["w"], want["w"], atol=1e-7)
    assert got["n"].dtype == torch.int64 and torch.equal(got["n"], want["n"])
    assert torch.equal(got["b"], want["b"])


def test_running_average_refuses_a_mismatched_update_and_keeps_its_sum() -> None:
    avg = RunningAverage()
    avg.add({"w": torch.ones(2)}, 1)
    with pytest.raises(ValueError, match="keys of update 0"):
        avg.add({"v": torch.ones(2)}, 1)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        avg.add({"w": torch.ones(3)}, 1)
    with pytest.raises(ValueError, match="negative"):
        avg.add({"w": torch.ones(2)}, -1)
    assert avg.count == 1 and torch.equal(avg.result()["w"], torch.ones(2))
    with pytest.raises(ValueError, match="at least one"):
        RunningAverage().result()


# -- the round loop -------------------------------------------------------------------------


class Buffered(WeightedAverageStrategy):
    """FedAvg with its own aggregate_fit: the round must hand it every update at once."""

    seen: list[int] = []

    def aggregate_fit(self, round_number: int, results: Any, current: Any) -> dict[str, torch.Tensor]:
        self.seen.append(len(results))
        return super().aggregate_fit(round_number, results, current)


def test_fedavg_streams_into_a_running_sum_and_robust_strategies_buffer(
    hook: sy.TorchHook, monkeypatch: pytest.MonkeyPatch
) -> None:
    workers = [node(hook, f"n{i}", i) for i in range(4)]
    adds: list[int] = []
    original = RunningAverage.add

    def spy(self: RunningAverage, state: Any, n: int) -> None:
        adds.append(n)
        original(self, state, n)

    monkeypatch.setattr(RunningAverage, "add", spy)
    streamed = model()
    FedAvg(streamed, workers, FedAvgConfig(rounds=2, batch_size=4, lr=0.1), progress=False).fit()
    assert adds == [12] * 8  # one fold per node per round
    buffered = model()
    trainer = FedAvg(buffered, workers, FedAvgConfig(rounds=2, batch_size=4, lr=0.1), progress=False, strategy=Buffered())
    trainer.fit()
    assert Buffered.seen == [4, 4] and len(adds) == 8  # the override got every update, nothing streamed
    for key, value in streamed.state_dict().items():
        assert torch.allclose(buffered.state_dict()[key], value, atol=1e-6), key
    for name in ("fedmedian", "krum", "trimmed_mean"):
        assert not FedAvg(model(), workers, strategy=name, progress=False)._streams(), name
    for name in ("fedavg", "fedprox", "fedadam"):
        assert FedAvg(model(), workers, strategy=name, progress=False)._streams(), name


def test_a_round_touches_only_the_sampled_nodes(hook: sy.TorchHook, monkeypatch: pytest.MonkeyPatch) -> None:
    workers = [node(hook, f"n{i}", i) for i in range(8)]
    by_session = {w.session: w.id for w in workers}
    touched: Counter[str] = Counter()
    original = Session.submit

    def spy(self: Session, kind: Any, *fields: Any, want_value: bool = False) -> Any:
        if self in by_session:
            touched[by_session[self]] += 1
        return original(self, kind, *fields, want_value=want_value)

    monkeypatch.setattr(Session, "submit", spy)
    trainer = FedAvg(model(), workers, FedAvgConfig(rounds=3, nodes_per_round=2, batch_size=4), progress=False)
    for r in (1, 2, 3):
        touched.clear()
        metrics = trainer.run_round(r)
        assert set(touched) == set(metrics.nodes) and len(metrics.nodes) == 2, (r, touched)


class SilentLink(InprocLink):
    silent = False

    def flush(self, *, urgent: bool = True) -> None:
        if not self.silent:
            super().flush(urgent=urgent)


class SilentWorker(sy.VirtualWorker):
    """Stops answering while ``link.silent``: its frames queue, nothing comes back."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.link = SilentLink(self.endpoint, self.handle_frame, self.address)


def test_a_dropped_nodes_work_is_cancelled_and_freed(hook: sy.TorchHook, monkeypatch: pytest.MonkeyPatch) -> None:
    alice = node(hook, "alice", 1)
    slow = node(hook, "slow", 2, SilentWorker)
    assert isinstance(slow.link, SilentLink)
    waited: dict[str, list[Future[Any]]] = {}
    original = fedavg_module.stream_all

    def spy(futures: Any, deadline: Any, on_done: Any) -> Any:
        waited.update({k: list(v) for k, v in futures.items()})
        return original(futures, deadline, on_done)

    monkeypatch.setattr(fedavg_module, "stream_all", spy)
    trainer = FedAvg(model(), [alice, slow], FedAvgConfig(rounds=2, round_timeout=0.2, batch_size=4), progress=False)
    trainer.run_round(1)
    slow.link.silent = True
    second = trainer.run_round(2)
    assert second.nodes == ["alice"] and "FedwsTimeoutError" in second.dropped["slow"]
    assert waited["slow"] and all(f.cancelled() for f in waited["slow"])  # not awaited any more
    assert all(f.done() and not f.cancelled() for f in waited["alice"])
    slow.link.silent = False
    gc.collect()
    slow.flush()  # the queued work runs late: its answers go nowhere, its objects are deleted
    assert not slow.session._requests
    assert all(f.cancelled() for f in waited["slow"])
    left = slow.list_objects_remote()
    tensors = sorted(str(o["shape"]) for o in left if o["type"] == "Tensor")
    assert tensors == ["[12, 4]", "[12]"], left  # the data; the round's model copy and losses are gone
