"""Federated training end to end on VirtualWorkers (the same protocol as network nodes).

The data is a small synthetic classification problem (3 Gaussian blobs in 8 dimensions),
so every test trains in well under a second and needs no download.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fedws as sy
from fedws.client.session import Session
from fedws.client.worker import executing_on
from fedws.exceptions import ConnectionLostError
from fedws.fl import FedAvg, FedAvgConfig, History, load_checkpoint, sample_nodes, save_checkpoint
from fedws.fl.local_training import _batch_generator
from fedws.protocol import codec
from fedws.protocol.messages import Kind
from fedws.transport.inproc import InprocLink

FEATURES, CLASSES = 8, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(1234)) * 3
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = centers[y] + torch.randn(n, FEATURES, generator=g)
    return x, y


def shard(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return [x.clone().tag("#train", "#x"), y.clone().tag("#train", "#y")]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def federation(hook: sy.TorchHook, sizes: dict[str, int]) -> list[sy.Worker]:
    return [
        sy.VirtualWorker(hook, id=name, data=shard(*blobs(n, seed=i)))
        for i, (name, n) in enumerate(sizes.items())
    ]


TEST = blobs(300, seed=99)
FAST = dict(rounds=3, local_epochs=1, batch_size=32, lr=0.1)


class SilentLink(InprocLink):
    """An in-process link that stops delivering once ``silent`` is set: frames queue."""

    silent = False

    def flush(self, *, urgent: bool = True) -> None:
        if not self.silent:
            super().flush(urgent=urgent)


class SilentWorker(sy.VirtualWorker):
    """A node that stops answering once ``silent`` is set: frames queue, nothing comes back."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.link = SilentLink(self.endpoint, self.handle_frame, self.address)

    @property
    def silent(self) -> bool:
        return self.link.silent

    @silent.setter
    def silent(self, value: bool) -> None:
        self.link.silent = value


# -- training ---------------------------------------------------------------------------


def test_fedavg_learns_and_reports_each_round(hook: sy.TorchHook) -> None:
    workers = federation(hook, {"alice": 120, "bob": 80, "charlie": 100})
    model = make_model()
    history = FedAvg(model, workers, FedAvgConfig(**FAST), test_data=TEST, progress=False).fit()
    assert isinstance(history, History) and [r.round for r in history] == [1, 2, 3]
    assert history[-1].test_accuracy is not None and history[-1].test_accuracy > 0.9
    assert history[-1].train_loss < history[0].train_loss
    assert all(r.nodes == ["alice", "bob", "charlie"] and r.num_examples == 300 for r in history)
    assert all(not r.dropped for r in history)


def test_data_never_leaves_the_workers(hook: sy.TorchHook, monkeypatch: pytest.MonkeyPatch) -> None:
    workers = federation(hook, {"alice": 60, "bob": 60})
    received = _spy_on_coordinator(monkeypatch)
    FedAvg(make_model(), workers, FedAvgConfig(rounds=1), progress=False).fit()
    shapes = {tuple(v.shape) for _, v in received if isinstance(v, torch.Tensor)}
    assert (60, FEATURES) not in shapes and (60,) not in shapes
    gc.collect()
    for w in workers:  # the shards are still there, and the model copies were freed
        assert [o["shape"] for o in w.list_objects_remote()] == [[60, FEATURES], [60]]


def test_sampling_selects_count_reproducibly(hook: sy.TorchHook) -> None:
    workers = federation(hook, {"a": 40, "b": 40, "c": 40, "d": 40})
    cfg = FedAvgConfig(rounds=4, nodes_per_round=2, seed=7)
    history = FedAvg(make_model(), workers, cfg, progress=False).fit()
    picks = [r.nodes for r in history]
    assert all(len(p) == 2 for p in picks)
    assert len({tuple(p) for p in picks}) > 1  # the draw changes between rounds
    assert picks == [[w.id for w in sample_nodes(workers, 2, seed=7, round_number=r)] for r in range(1, 5)]
    assert FedAvgConfig(fraction=0.5).nodes_to_select(5) == 3
    assert FedAvgConfig(fraction=0.1, min_nodes=2).nodes_to_select(5) == 2


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="fraction"):
        FedAvgConfig(fraction=0.0)
    with pytest.raises(ValueError, match="min_nodes"):
        FedAvgConfig(min_nodes=0)


def test_a_sent_model_is_refused(hook: sy.TorchHook) -> None:
    (alice,) = federation(hook, {"alice": 10})
    model = make_model()
    model.send(alice)
    with pytest.raises(sy.PointerError, match="get"):
        FedAvg(model, [alice])


# -- failing nodes ----------------------------------------------------------------------


def test_node_without_data_is_dropped_with_a_warning(hook: sy.TorchHook, caplog: pytest.LogCaptureFixture) -> None:
    workers = federation(hook, {"alice": 100, "bob": 100})
    empty = sy.VirtualWorker(hook, id="empty")
    with caplog.at_level(logging.WARNING, logger="fedws.fl"):
        history = FedAvg(make_model(), [*workers, empty], FedAvgConfig(**FAST), test_data=TEST, progress=False).fit()
    assert all(r.nodes == ["alice", "bob"] for r in history)
    assert all("ObjectNotFoundError" in r.dropped["empty"] and "0 tensors" in r.dropped["empty"] for r in history)
    assert sum("dropped node 'empty'" in m for m in caplog.messages) == 3
    assert history[-1].test_accuracy > 0.9


def test_node_whose_training_raises_is_dropped(hook: sy.TorchHook) -> None:
    workers = federation(hook, {"alice": 100, "bob": 100})
    wrong = sy.VirtualWorker(hook, id="wrong", data=shard(torch.randn(50, FEATURES + 1), torch.zeros(50).long()))
    history = FedAvg(make_model(), [wrong, *workers], FedAvgConfig(**FAST), test_data=TEST, progress=False).fit()
    assert all(r.nodes == ["alice", "bob"] and r.num_examples == 200 for r in history)
    assert "wrong" in history[0].dropped and "shapes cannot be multiplied" in history[0].dropped["wrong"]
    assert history[-1].test_accuracy > 0.9


def test_disconnected_node_is_dropped(hook: sy.TorchHook) -> None:
    alice, bob = federation(hook, {"alice": 100, "bob": 100})
    bob.session.fail_all(ConnectionLostError("link to 'bob' dropped"))
    history = FedAvg(make_model(), [alice, bob], FedAvgConfig(rounds=1), progress=False).fit()
    assert history[0].nodes == ["alice"]
    assert history[0].dropped["bob"].startswith("ConnectionLostError")


def test_node_that_times_out_is_dropped_and_the_round_completes(hook: sy.TorchHook) -> None:
    alice = federation(hook, {"alice": 100})[0]
    slow = SilentWorker(hook, id="slow", data=shard(*blobs(100, seed=5)))
    trainer = FedAvg(make_model(), [alice, slow], FedAvgConfig(rounds=2, round_timeout=0.2), progress=False)
    first = trainer.run_round(1)
    assert first.nodes == ["alice", "slow"]  # found its data, trained, answered
    slow.silent = True  # then stops answering mid-federation
    second = trainer.run_round(2)
    assert second.nodes == ["alice"]
    assert "FedwsTimeoutError" in second.dropped["slow"] and "0.2 s" in second.dropped["slow"]


def test_too_few_answers_fail_the_round_clearly(hook: sy.TorchHook) -> None:
    workers = federation(hook, {"alice": 50, "bob": 50})
    empty = sy.VirtualWorker(hook, id="empty")
    cfg = FedAvgConfig(rounds=2, min_nodes=3)
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sy.RoundFailedError, match=r"round 1: only 2 of 3 selected nodes answered, min_nodes is 3.*empty") as info:
        FedAvg(model, [*workers, empty], cfg, progress=False).fit()
    assert info.value.round == 1 and info.value.min_nodes == 3
    assert sorted(info.value.answered) == ["alice", "bob"] and "empty" in info.value.dropped
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


# -- checkpoints ------------------------------------------------------------------------


def test_resume_from_checkpoint_matches_an_uninterrupted_run(hook: sy.TorchHook, tmp_path: Path) -> None:
    workers = federation(hook, {"alice": 90, "bob": 70})
    straight = make_model()
    full = FedAvg(straight, workers, FedAvgConfig(rounds=4), checkpoint_dir=tmp_path / "a", progress=False).fit()

    FedAvg(make_model(), workers, FedAvgConfig(rounds=2), checkpoint_dir=tmp_path / "b", progress=False).fit()
    assert load_checkpoint(tmp_path / "b").round == 2
    resumed_model = make_model(seed=123)  # a fresh process would start from another init
    resumed = FedAvg(resumed_model, workers, FedAvgConfig(rounds=4), checkpoint_dir=tmp_path / "b", progress=False)
    history = resumed.fit(resume=True)

    assert [r.round for r in history] == [1, 2, 3, 4]
    assert [r.train_loss for r in history] == pytest.approx([r.train_loss for r in full])
    for key, value in straight.state_dict().items():
        assert torch.allclose(resumed_model.state_dict()[key], value, atol=1e-6), key
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint.json", "model_round_0004.safetensors"]


def test_checkpoint_round_trip_and_absence(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None
    state = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}
    history = History()
    save_checkpoint(tmp_path, state, 7, history, {"lr": 0.1})
    ck = load_checkpoint(tmp_path)
    assert ck is not None and ck.round == 7 and ck.config == {"lr": 0.1} and len(ck.history) == 0
    assert list(ck.state) == ["w", "n"] and torch.equal(ck.state["w"], state["w"])
    (tmp_path / "model_round_0007.safetensors").unlink()
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(tmp_path)


# -- trusted aggregator: the coordinator sees only averages ---------------------------------


def test_trusted_aggregator_coordinator_never_receives_an_individual_update(
    hook: sy.TorchHook, monkeypatch: pytest.MonkeyPatch
) -> None:
    workers = federation(hook, {"alice": 100, "bob": 60, "charlie": 80})
    secure = sy.VirtualWorker(hook, id="secure_worker")
    received = _spy_on_coordinator(monkeypatch)
    model = make_model()
    states: list[dict[str, torch.Tensor]] = []
    history = FedAvg(
        model, workers, FedAvgConfig(**FAST), test_data=TEST, aggregator=secure, progress=False,
        on_round=lambda m: states.append({k: v.clone() for k, v in model.state_dict().items()}),
    ).fit()
    assert history[-1].test_accuracy > 0.9

    # From the data nodes: search results, pongs and 0-dim loss sums. Not one parameter.
    from_nodes = [v for wid, v in received if wid != "secure_worker" and isinstance(v, torch.Tensor)]
    assert from_nodes and all(v.dim() == 0 for v in from_nodes)
    # From the aggregator: exactly the averaged states, one per round, nothing else.
    from_secure = [v for wid, v in received if wid == "secure_worker"]
    expected = [t for state in states for t in state.values()]
    assert len(from_secure) == len(expected) == 3 * len(model.state_dict())
    assert all(torch.equal(got, want) for got, want in zip(from_secure, expected))


def test_the_spy_does_see_individual_updates_without_an_aggregator(
    hook: sy.TorchHook, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The control experiment: the same spy catches each node's parameters in plain FedAvg.
    workers = federation(hook, {"alice": 100, "bob": 60})
    received = _spy_on_coordinator(monkeypatch)
    FedAvg(make_model(), workers, FedAvgConfig(rounds=1), progress=False).fit()
    weight_shape = (16, FEATURES)
    senders = [wid for wid, v in received if isinstance(v, torch.Tensor) and tuple(v.shape) == weight_shape]
    assert sorted(senders) == ["alice", "bob"]


def test_trusted_average_equals_coordinator_average(hook: sy.TorchHook) -> None:
    workers = federation(hook, {"alice": 100, "bob": 60, "charlie": 80})
    plain, trusted = make_model(), make_model()
    FedAvg(plain, workers, FedAvgConfig(**FAST), progress=False).fit()
    secure = sy.VirtualWorker(hook, id="secure_worker")
    FedAvg(trusted, workers, FedAvgConfig(**FAST), aggregator=secure, progress=False).fit()
    for key, value in plain.state_dict().items():
        assert torch.allclose(trusted.state_dict()[key], value, atol=1e-5), key
    gc.collect()
    assert secure.objects_count_remote() == 0  # the moved updates were freed there too


# -- the spy: what did the coordinator receive? -------------------------------------------


def _spy_on_coordinator(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Record (worker id, value) of every reply value that reaches the coordinator.

    Replies that a node receives while it runs (node-to-node traffic, such as an
    aggregator pulling an update) are not the coordinator's and are left out.
    """
    received: list[tuple[str, Any]] = []
    original = Session.receive

    def spy(self: Session, reply: Any, pointer_factory: Any) -> None:
        if executing_on.get() is None:
            _, values, _ = codec.decode(bytes(reply), lambda ref: ref)
            received.extend((self.worker_id, v) for _, v in values)
        original(self, reply, pointer_factory)

    monkeypatch.setattr(Session, "receive", spy)
    return received


# -- every transport ----------------------------------------------------------------------


@pytest.mark.parametrize("trusted", [False, True], ids=["coordinator", "trusted"])
def test_fedavg_on_every_transport(make_worker: Any, trusted: bool) -> None:
    workers, keep = [], []
    for i, name in enumerate(["alice", "bob"]):
        w = make_worker(name)
        keep += [t.send(w) for t in shard(*blobs(100, seed=i))]  # the owning pointers keep the data there
        workers.append(w)
    aggregator = make_worker("secure_worker") if trusted else None
    model = make_model()
    history = FedAvg(model, workers, FedAvgConfig(**FAST), test_data=TEST, aggregator=aggregator, progress=False).fit()
    assert [r.nodes for r in history] == [["alice", "bob"]] * 3
    assert history[-1].test_accuracy > 0.9


def test_a_parameter_the_loss_does_not_use_is_left_alone(hook: sy.TorchHook) -> None:
    workers = federation(hook, {"alice": 60, "bob": 60})

    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = make_model()
            self.unused = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    model = WithUnused()
    unused_before = model.unused.weight.detach().clone()
    history = FedAvg(model, workers, FedAvgConfig(rounds=1), progress=False).fit()
    assert history.rounds[-1].nodes == ["alice", "bob"] and not history.rounds[-1].dropped
    assert torch.equal(model.unused.weight.detach(), unused_before)


# -- local training is a plan: one message per step ----------------------------------------


def test_each_local_step_is_one_plan_message(hook: sy.TorchHook, monkeypatch: pytest.MonkeyPatch) -> None:
    (alice,) = federation(hook, {"alice": 96})
    kinds = _spy_on_requests(monkeypatch, alice)
    overhead = set()
    for batch_size, steps in ((96, 2), (32, 6), (8, 24)):  # 2 local epochs of 96 examples
        cfg = FedAvgConfig(rounds=2, local_epochs=2, batch_size=batch_size, momentum=0.5)
        trainer = FedAvg(make_model(), [alice], cfg, progress=False)
        kinds.clear()
        trainer.run_round(1)
        assert kinds.count(Kind.STORE_PLAN) == 1 and kinds.count(Kind.RUN_PLAN) == steps
        kinds.clear()
        before = alice.session.messages_sent
        trainer.run_round(2)
        sent = alice.session.messages_sent - before
        # The plan stays on the node: round 2 sends the parameters and one message per step.
        assert kinds.count(Kind.STORE_PLAN) == 0 and kinds.count(Kind.RUN_PLAN) == steps
        first = kinds.index(Kind.RUN_PLAN)
        assert kinds[first : first + steps] == [Kind.RUN_PLAN] * steps  # nothing else per step
        overhead.add(sent - steps)
        del trainer
        gc.collect()
    # What is not a step (sending and fetching the parameters, barriers) does not grow with steps.
    assert len(overhead) == 1 and overhead.pop() < 20


def test_local_sgd_with_momentum_matches_torch_sgd(hook: sy.TorchHook) -> None:
    # BatchNorm: its buffers are plan arguments too, updated on the node like the parameters.
    def bn_model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES))

    cfg = FedAvgConfig(rounds=1, local_epochs=2, batch_size=16, lr=0.05, momentum=0.9)
    (alice,) = federation(hook, {"alice": 100})
    model = bn_model()
    FedAvg(model, [alice], cfg, progress=False).fit()

    reference = bn_model()
    x, y = blobs(100, seed=0)
    opt = torch.optim.SGD(reference.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    g = _batch_generator(cfg.seed, 1, "alice")
    for _epoch in range(cfg.local_epochs):
        order = torch.randperm(100, generator=g)
        for lo in range(0, 100, cfg.batch_size):
            idx = order[lo : lo + cfg.batch_size]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(reference(x[idx]), y[idx]).backward()
            opt.step()
    for key, value in reference.state_dict().items():
        assert torch.allclose(model.state_dict()[key], value, atol=1e-6), key


def test_a_dropped_node_gets_the_plan_again(hook: sy.TorchHook, monkeypatch: pytest.MonkeyPatch) -> None:
    alice = federation(hook, {"alice": 100})[0]
    slow = SilentWorker(hook, id="slow", data=shard(*blobs(100, seed=5)))
    kinds = _spy_on_requests(monkeypatch, slow)
    trainer = FedAvg(make_model(), [alice, slow], FedAvgConfig(rounds=3, round_timeout=0.2), progress=False)
    trainer.run_round(1)
    slow.silent = True
    assert trainer.run_round(2).nodes == ["alice"]
    slow.silent = False
    slow.flush()  # the queued round-2 requests run now, too late to count
    kinds.clear()
    third = trainer.run_round(3)
    assert third.nodes == ["alice", "slow"] and not third.dropped
    assert kinds.count(Kind.STORE_PLAN) == 1  # sent again, in case the node lost it


def _spy_on_requests(monkeypatch: pytest.MonkeyPatch, worker: sy.Worker) -> list[int]:
    """The kinds of the requests the coordinator submits to ``worker``, in order."""
    kinds: list[int] = []
    original = Session.submit

    def spy(self: Session, kind: Any, *fields: Any, want_value: bool = False) -> Any:
        if self is worker.session:
            kinds.append(int(kind))
        return original(self, kind, *fields, want_value=want_value)

    monkeypatch.setattr(Session, "submit", spy)
    return kinds
