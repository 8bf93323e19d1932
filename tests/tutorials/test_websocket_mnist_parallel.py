"""PySyft's parallel websockets MNIST example (examples/tutorials/advanced/
websockets-example-MNIST-parallel/run_websocket_client.py): its training loop, with
``train_config.send(worker)`` and ``await worker.async_fit(...)`` gathered over the workers,
against real ``fedws worker`` node processes and against VirtualWorkers.

Substitutions: ``import fedws as sy``; the nodes' ports come from the pool; the "mnist"
dataset each node serves is a small synthetic MNIST-shaped one, put on the node the way a
``[[data]]`` config entry or ``add_dataset`` serves it (tags ``#mnist #data`` / ``#mnist
#target``); the arguments are scaled down; ``traced_model = torch.jit.trace(model, data)``
becomes ``traced_model = model`` (fedws traces the module's Python forward into a plan; a
TorchScript module has none, and ``TrainConfig`` says so); ``train_config.model_ptr.get().obj``
is ``train_config.model_ptr.get()`` (the model itself); ``utils.federated_avg`` is written
here on ``fedws.fl.fedavg``; the evaluation on the "testing" worker (``worker.evaluate``) is
left to the federated-evaluation work and replaced by a local test-set score.
"""
# ruff: noqa: UP008

from __future__ import annotations

import asyncio
import copy
import logging
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fedws as sy
from fedws import VirtualWorker, WebsocketClientWorker
from fedws.fl.aggregate import fedavg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

logger = logging.getLogger(__name__)


def synthetic_mnist(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    patterns = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return patterns[y] + 0.5 * torch.randn(n, 1, 28, 28, generator=g), y


class workers:  # noqa: N801 - stands in for ``from syft import workers``
    WebsocketClientWorker = WebsocketClientWorker


class utils:  # noqa: N801 - stands in for syft.frameworks.torch.federated.utils
    @staticmethod
    def federated_avg(models: dict) -> nn.Module:
        first = next(iter(models.values()))
        model = copy.deepcopy(first)
        model.load_state_dict(fedavg([(m.state_dict(), 1) for m in models.values()]))
        return model


# ---- the script, as written -------------------------------------------------------------

@torch.jit.script
def loss_fn(pred, target):
    return F.nll_loss(input=pred, target=target)


class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2, 2)
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2, 2)
        x = x.view(-1, 4 * 4 * 50)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


async def fit_model_on_worker(
    worker: workers.WebsocketClientWorker,
    traced_model: Any,
    batch_size: int,
    curr_round: int,
    max_nr_batches: int,
    lr: float,
):
    train_config = sy.TrainConfig(
        model=traced_model,
        loss_fn=loss_fn,
        batch_size=batch_size,
        shuffle=True,
        max_nr_batches=max_nr_batches,
        epochs=1,
        optimizer="SGD",
        optimizer_args={"lr": 0.1},
    )
    train_config.send(worker)
    logger.info("Training round %s, calling fit on worker: %s", curr_round, worker.id)
    loss = await worker.async_fit(dataset_key="mnist", return_ids=[0])
    logger.info("Training round: %s, worker: %s, avg_loss: %s", curr_round, worker.id, loss.mean())
    model = train_config.model_ptr.get()
    return worker.id, model, loss


# ---- main(), with the pool's ports ------------------------------------------------------

def score(model: nn.Module, data: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = model(data)
        return float(F.nll_loss(out, target)), float((out.argmax(1) == target).float().mean())


@pytest.mark.parametrize("use_virtual", [False, True], ids=["nodes", "virtual"])
async def test_parallel_websocket_mnist_trains(node_pool: Any, use_virtual: bool) -> None:
    args = SimpleNamespace(batch_size=16, training_rounds=3, federate_after_n_batches=2, lr=0.1, seed=1)
    hook = sy.TorchHook(torch, federation=sy.Federation())
    names = ("alice", "bob", "charlie")
    if use_virtual:
        worker_instances = [VirtualWorker(id=n, hook=hook) for n in names]
    else:
        kwargs_websocket = {"hook": hook, "host": "127.0.0.1"}
        worker_instances = [
            workers.WebsocketClientWorker(id=n, port=urlsplit(node_pool.url(n)).port, **kwargs_websocket)
            for n in names
        ]
    served = []
    try:
        for i, w in enumerate(worker_instances):
            w.clear_objects_remote()
            x, y = synthetic_mnist(48, seed=10 + i)
            served += [x.tag("#mnist", "#data").send(w), y.tag("#mnist", "#target").send(w)]
        test_data, test_target = synthetic_mnist(200, seed=2)

        torch.manual_seed(args.seed)
        model = Net()
        traced_model = model
        learning_rate = args.lr
        first = score(traced_model, test_data, test_target)

        for curr_round in range(1, args.training_rounds + 1):
            logger.info("Starting training round %s/%s", curr_round, args.training_rounds)

            results = await asyncio.gather(
                *[
                    fit_model_on_worker(
                        worker=worker,
                        traced_model=traced_model,
                        batch_size=args.batch_size,
                        curr_round=curr_round,
                        max_nr_batches=args.federate_after_n_batches,
                        lr=learning_rate,
                    )
                    for worker in worker_instances
                ]
            )
            models = {}
            loss_values = {}

            for worker_id, worker_model, worker_loss in results:
                if worker_model is not None:
                    models[worker_id] = worker_model
                    loss_values[worker_id] = worker_loss

            traced_model = utils.federated_avg(models)

            # decay learning rate
            learning_rate = max(0.98 * learning_rate, args.lr * 0.01)

            assert sorted(loss_values) == sorted(names)
            assert all(float(v) > 0 for v in loss_values.values())

        last = score(traced_model, test_data, test_target)
        assert last[0] < first[0] and last[1] > first[1]
        assert all(not isinstance(p, sy.PointerTensor) for p in traced_model.parameters())
    finally:
        for w in worker_instances:
            w.close()
