"""PySyft's websockets MNIST example (examples/tutorials/advanced/websockets-example-MNIST/
run_websocket_client.py, the non-parallel one): its train loop, as written, against real
``fedws worker`` node processes from the node pool, and with ``--use_virtual``.

Substitutions: ``import fedws as sy``; the three nodes' ports come from the pool (the
script hard-codes 8777-8779) and ``verbose`` is not an option of fedws workers; MNIST is a
small synthetic MNIST-shaped ``TensorDataset`` (no torchvision download); the arguments are
scaled down; ``syft.frameworks.torch.federated.utils.federated_avg`` (equal-weight average
of the workers' models) is written here on ``fedws.fl.fedavg``.
"""
# ruff: noqa: UP008, UP032, UP039, B007  (the tutorial's cells, as written)

from __future__ import annotations

import copy
import logging
import re
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.utils.data import TensorDataset

import fedws as sy
from fedws import VirtualWorker, WebsocketClientWorker
from fedws.fl.aggregate import fedavg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

logger = logging.getLogger(__name__)

LOG_INTERVAL = 25


def synthetic_mnist(n: int, seed: int) -> TensorDataset:
    patterns = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(patterns[y] + 0.5 * torch.randn(n, 1, 28, 28, generator=g), y)


class utils:  # noqa: N801 - stands in for syft.frameworks.torch.federated.utils
    @staticmethod
    def federated_avg(models: dict) -> nn.Module:
        """The models' parameters averaged with equal weights, as PySyft's helper did."""
        first = next(iter(models.values()))
        model = copy.deepcopy(first)
        model.load_state_dict(fedavg([(m.state_dict(), 1) for m in models.values()]))
        return model


# ---- the script, as written -------------------------------------------------------------

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


def train_on_batches(worker, batches, model_in, device, lr):
    model = model_in.copy()
    optimizer = optim.SGD(model.parameters(), lr=lr)  # TODO momentum is not supported at the moment

    model.train()
    model.send(worker)
    loss_local = False

    for batch_idx, (data, target) in enumerate(batches):
        loss_local = False
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        if batch_idx % LOG_INTERVAL == 0:
            loss = loss.get()  # <-- NEW: get the loss back
            loss_local = True
            print(
                "Train Worker {}: [{}/{} ({:.0f}%)]\tLoss: {:.6f}".format(
                    worker.id,
                    batch_idx,
                    len(batches),
                    100.0 * batch_idx / len(batches),
                    loss.item(),
                )
            )
    if not loss_local:
        loss = loss.get()  # <-- NEW: get the loss back
    model.get()  # <-- NEW: get the model back
    return model, loss


def get_next_batches(fdataloader: sy.FederatedDataLoader, nr_batches: int):
    batches = {}
    for worker_id in fdataloader.workers:
        worker = fdataloader.federated_dataset.datasets[worker_id].location
        batches[worker] = []
    try:
        for i in range(nr_batches):
            next_batches = next(fdataloader)
            for worker in next_batches:
                batches[worker].append(next_batches[worker])
    except StopIteration:
        pass
    return batches


def train(model, device, federated_train_loader, lr, federate_after_n_batches):
    model.train()

    nr_batches = federate_after_n_batches

    models = {}
    loss_values = {}

    iter(federated_train_loader)  # initialize iterators
    batches = get_next_batches(federated_train_loader, nr_batches)
    counter = 0

    while True:
        print("Starting training round, batches [{}, {}]".format(counter, counter + nr_batches))
        data_for_all_workers = True
        for worker in batches:
            curr_batches = batches[worker]
            if curr_batches:
                models[worker], loss_values[worker] = train_on_batches(
                    worker, curr_batches, model, device, lr
                )
            else:
                data_for_all_workers = False
        counter += nr_batches
        if not data_for_all_workers:
            print("At least one worker ran out of data, stopping.")
            break

        model = utils.federated_avg(models)
        batches = get_next_batches(federated_train_loader, nr_batches)
    return model


def test(model, device, test_loader):
    model.eval()
    test_loss = 0
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()  # sum up batch loss
            pred = output.argmax(1, keepdim=True)  # get the index of the max log-probability
            correct += pred.eq(target.view_as(pred)).sum().item()

    test_loss /= len(test_loader.dataset)

    print("\n")
    accuracy = 100.0 * correct / len(test_loader.dataset)
    print(
        "Test set: Average loss: {:.4f}, Accuracy: {}/{} ({:.0f}%)\n".format(
            test_loss, correct, len(test_loader.dataset), accuracy
        )
    )


test.__test__ = False  # the script's function, not a pytest test


# ---- main(), with the pool's ports ------------------------------------------------------

@pytest.mark.parametrize("use_virtual", [False, True], ids=["nodes", "virtual"])
def test_websocket_mnist_client_trains(node_pool, use_virtual: bool, capsys: pytest.CaptureFixture[str]) -> None:
    args = SimpleNamespace(batch_size=16, test_batch_size=100, epochs=2, federate_after_n_batches=2,
                           lr=0.05, cuda=False, seed=1, save_model=False, verbose=False, use_virtual=use_virtual)

    hook = sy.TorchHook(torch, federation=sy.Federation())  # (a federation of the test's own)

    if args.use_virtual:
        alice = VirtualWorker(id="alice", hook=hook)
        bob = VirtualWorker(id="bob", hook=hook)
        charlie = VirtualWorker(id="charlie", hook=hook)
    else:
        ports = {w: urlsplit(node_pool.url(w)).port for w in ("alice", "bob", "charlie")}
        kwargs_websocket = {"host": "127.0.0.1", "hook": hook}
        alice = WebsocketClientWorker(id="alice", port=ports["alice"], **kwargs_websocket)
        bob = WebsocketClientWorker(id="bob", port=ports["bob"], **kwargs_websocket)
        charlie = WebsocketClientWorker(id="charlie", port=ports["charlie"], **kwargs_websocket)

    workers = [alice, bob, charlie]
    try:
        for w in workers:
            w.clear_objects_remote()
        use_cuda = args.cuda and torch.cuda.is_available()
        torch.manual_seed(args.seed)
        device = torch.device("cuda" if use_cuda else "cpu")
        kwargs = {"num_workers": 1, "pin_memory": True} if use_cuda else {}

        federated_train_loader = sy.FederatedDataLoader(
            synthetic_mnist(3 * 64, seed=1).federate(tuple(workers)),
            batch_size=args.batch_size,
            shuffle=True,
            iter_per_worker=True,
            **kwargs,
        )

        test_loader = torch.utils.data.DataLoader(
            synthetic_mnist(200, seed=2),
            batch_size=args.test_batch_size,
            shuffle=True,
            **kwargs,
        )

        model = Net().to(device)
        test(model, device, test_loader)  # (the test's own baseline)

        for epoch in range(1, args.epochs + 1):
            logger.info("Starting epoch %s/%s", epoch, args.epochs)
            model = train(model, device, federated_train_loader, args.lr, args.federate_after_n_batches)
            test(model, device, test_loader)

        out = capsys.readouterr().out
        rounds = out.count("Starting training round")
        assert rounds == 2 * 3  # 64 examples a worker: 4 batches, 2 rounds of 2, then the stop
        assert {f"Train Worker {w}" for w in ("alice", "bob", "charlie")} <= set(re.findall(r"Train Worker \w+", out))
        test_losses = [float(v) for v in re.findall(r"Average loss: ([0-9.]+)", out)]
        accuracy = [int(v) for v in re.findall(r"Accuracy: (\d+)/", out)]
        assert test_losses[-1] < test_losses[0] and accuracy[-1] > accuracy[0]
        assert all(not isinstance(p, sy.PointerTensor) for p in model.parameters())
    finally:
        for w in workers:
            w.close()
