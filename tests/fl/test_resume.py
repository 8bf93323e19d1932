"""A resumed run goes on where it stopped: the server optimizer's state (FedAvgM's velocity,
FedAdam/Yogi/Adagrad's moments) and the DP accountant's spent epsilon come back from the
checkpoint, so stopping after round 1 and resuming ends where an uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import fedws as sy
from fedws.fl import DPConfig, FedAvg, FedAvgConfig
from fedws.fl.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _workers(hook: sy.TorchHook) -> list[sy.Worker]:
    ws = []
    for i, name in enumerate(("alice", "bob")):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(32, 6, generator=g), torch.randint(0, 2, (32,), generator=g)
        ws.append(sy.VirtualWorker(hook, id=name, data=[x.tag("#train", "#x"), y.tag("#train", "#y")]))
    return ws


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(6, 2)


@pytest.mark.parametrize("strategy, attrs", [("fedavgm", ["velocity"]), ("fedadam", ["m", "v"]),
                                             ("fedyogi", ["m", "v"]), ("fedadagrad", ["m", "v"])])
def test_resumed_run_continues_the_server_optimizer(hook: sy.TorchHook, tmp_path: Path, strategy: str,
                                                    attrs: list[str]) -> None:
    ws = _workers(hook)
    straight = FedAvg(_model(), ws, FedAvgConfig(rounds=3, batch_size=16), progress=False, strategy=strategy)
    straight.fit()
    first = FedAvg(_model(), ws, FedAvgConfig(rounds=1, batch_size=16), progress=False, strategy=strategy,
                   checkpoint_dir=tmp_path)
    first.fit()
    ck = load_checkpoint(tmp_path)
    assert ck is not None and sorted(ck.strategy_state) == sorted(attrs)
    resumed = FedAvg(_model(), ws, FedAvgConfig(rounds=3, batch_size=16), progress=False, strategy=strategy,
                     checkpoint_dir=tmp_path)
    history = resumed.fit(resume=True)
    assert [r.round for r in history] == [1, 2, 3]
    for attr in attrs:
        a, b = getattr(straight.strategy, attr), getattr(resumed.strategy, attr)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    for p, q in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Optimal order")
@pytest.mark.parametrize("mode", ["central", "local"])
def test_resumed_run_keeps_spending_epsilon(hook: sy.TorchHook, tmp_path: Path, mode: str) -> None:
    pytest.importorskip("opacus")
    ws = _workers(hook)
    dp = DPConfig(mode=mode, clip=1.0, noise_multiplier=1.0)
    straight = FedAvg(_model(), ws, FedAvgConfig(rounds=3, batch_size=16), progress=False, dp=dp).fit()
    FedAvg(_model(), ws, FedAvgConfig(rounds=2, batch_size=16), progress=False, dp=dp, checkpoint_dir=tmp_path).fit()
    resumed = FedAvg(_model(), ws, FedAvgConfig(rounds=3, batch_size=16), progress=False, dp=dp,
                     checkpoint_dir=tmp_path)
    history = resumed.fit(resume=True)
    assert history.epsilons == pytest.approx(straight.epsilons)  # round 3 is charged after rounds 1-2
    assert resumed.dp is not None and resumed.dp.epsilon == pytest.approx(straight.epsilons[-1])
