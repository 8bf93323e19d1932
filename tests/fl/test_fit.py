"""``train_config.send(worker)`` then ``worker.fit`` / ``await worker.async_fit`` (PySyft's API)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedws as sy
from fedws.exceptions import ObjectNotFoundError

MakeWorker = Callable[..., sy.Worker]
FEATURES, CLASSES, N = 5, 3, 24

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def serve(worker: sy.Worker, key: str, seed: int) -> list[Any]:
    """A dataset on the node under ``key``, tagged as ``node.add_dataset`` serves it."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(N, FEATURES, generator=g), torch.randint(0, CLASSES, (N,), generator=g)
    return [x.tag(f"#{key}", "#data").send(worker), y.tag(f"#{key}", "#target").send(worker), x, y]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.ReLU(), nn.Linear(8, CLASSES))


def local_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, batch: int) -> tuple[nn.Module, float]:
    """Unshuffled minibatch SGD, as a TrainConfig with shuffle=False does it."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    total = 0.0
    for lo in range(0, N, batch):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[lo : lo + batch]), y[lo : lo + batch])
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(x[lo : lo + batch])
    return model, total / N


def test_fit_trains_the_sent_config_on_the_node_dataset(make_worker: MakeWorker) -> None:
    bob = make_worker("bob")
    held = serve(bob, "mnist", seed=0)
    model = make_model()
    config = sy.TrainConfig(model=model, loss_fn=F.cross_entropy, batch_size=8, epochs=1, shuffle=False,
                            optimizer="SGD", optimizer_args={"lr": 0.1})
    config.send(bob)
    loss = bob.fit(dataset_key="mnist")  # type: ignore[attr-defined]
    want, want_loss = local_run(make_model(), held[2], held[3], 0.1, 8)
    assert config.model_ptr is not None
    trained = config.model_ptr.get()
    for p, q in zip(trained.parameters(), want.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    assert loss.dim() == 0 and abs(float(loss) - want_loss) < 1e-5
    for p, q in zip(model.parameters(), make_model().parameters()):  # the local model is untouched
        assert torch.equal(p, q)


def test_fit_without_a_config_or_dataset_says_so(make_worker: MakeWorker) -> None:
    bob = make_worker("bob")
    with pytest.raises(ValueError, match="TrainConfig"):
        bob.fit(dataset_key="mnist")  # type: ignore[attr-defined]
    sy.TrainConfig(model=make_model()).send(bob)
    with pytest.raises(ObjectNotFoundError, match="#nothing"):
        bob.fit(dataset_key="nothing")  # type: ignore[attr-defined]


async def test_async_fit_over_two_nodes_with_gather(make_worker: MakeWorker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    held = {w.id: serve(w, "mnist", seed=i) for i, w in enumerate((bob, alice))}

    async def fit_on(worker: sy.Worker) -> tuple[str, nn.Module, torch.Tensor]:
        config = sy.TrainConfig(model=make_model(), loss_fn=F.cross_entropy, batch_size=6, epochs=2,
                                optimizer="Adam", optimizer_args={"lr": 0.01}, max_nr_batches=3)
        config.send(worker)
        loss = await worker.async_fit(dataset_key="mnist", return_ids=[0])  # type: ignore[attr-defined]
        assert config.model_ptr is not None
        return worker.id, config.model_ptr.get(), loss

    results = await asyncio.gather(fit_on(bob), fit_on(alice))
    assert [r[0] for r in results] == ["bob", "alice"]
    for wid, model, loss in results:
        x, y = held[wid][2], held[wid][3]
        assert float(loss) > 0
        before = F.cross_entropy(make_model()(x), y)
        after = F.cross_entropy(model(x), y)
        assert after < before, wid
    # two different shards: two different models
    assert not torch.equal(next(results[0][1].parameters()), next(results[1][1].parameters()))
