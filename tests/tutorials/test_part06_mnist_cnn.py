"""PySyft Part 06 - Federated Learning on MNIST using a CNN, cell by cell, on both transports.

As written, with three substitutions: ``import fedws as sy``; the workers come from the
``make_worker`` fixture (VirtualWorkers, or real ``fedws worker`` nodes); and MNIST is a
small synthetic MNIST-shaped ``TensorDataset`` (no download, no torchvision): 28x28
images, ten classes, each class a fixed pattern plus noise, so the CNN can learn it.
``args`` is scaled down (batch size, epochs, log interval) so the test runs in seconds.
"""
# ruff: noqa: UP008, UP032, UP039, B007  (the tutorial's cells, as written)

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.utils.data import TensorDataset

import fedws as sy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic_mnist(n: int, seed: int) -> TensorDataset:
    """MNIST-shaped: (n, 1, 28, 28) float images, int64 labels 0..9, normalized."""
    patterns = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = patterns[y] + 0.5 * torch.randn(n, 1, 28, 28, generator=g)
    return TensorDataset(x, y)


def test_part06_federated_mnist_cnn(make_worker: Callable[..., sy.Worker], capsys: pytest.CaptureFixture[str]) -> None:
    # -- cell: hook and workers (fixtures: VirtualWorkers or real nodes)
    bob = make_worker("bob")  # <-- NEW: define remote worker bob
    alice = make_worker("alice")  # <-- NEW: and alice

    # -- cell: Arguments (scaled down)
    class Arguments():
        def __init__(self):
            self.batch_size = 32
            self.test_batch_size = 100
            self.epochs = 3
            self.lr = 0.01
            self.momentum = 0.5
            self.no_cuda = False
            self.seed = 1
            self.log_interval = 1
            self.save_model = False

    args = Arguments()

    use_cuda = not args.no_cuda and torch.cuda.is_available()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if use_cuda else "cpu")
    kwargs = {'num_workers': 1, 'pin_memory': True} if use_cuda else {}

    # -- cell: data loading and sending to workers (synthetic MNIST in place of the download)
    federated_train_loader = sy.FederatedDataLoader( # <-- this is now a FederatedDataLoader
        synthetic_mnist(128, seed=1)
        .federate((bob, alice)), # <-- NEW: we distribute the dataset across all the workers, it's now a FederatedDataset
        batch_size=args.batch_size, shuffle=True, **kwargs)

    test_loader = torch.utils.data.DataLoader(
        synthetic_mnist(200, seed=2),
        batch_size=args.test_batch_size, shuffle=True, **kwargs)

    # -- cell: CNN specification
    class Net(nn.Module):
        def __init__(self):
            super(Net, self).__init__()
            self.conv1 = nn.Conv2d(1, 20, 5, 1)
            self.conv2 = nn.Conv2d(20, 50, 5, 1)
            self.fc1 = nn.Linear(4*4*50, 500)
            self.fc2 = nn.Linear(500, 10)

        def forward(self, x):
            x = F.relu(self.conv1(x))
            x = F.max_pool2d(x, 2, 2)
            x = F.relu(self.conv2(x))
            x = F.max_pool2d(x, 2, 2)
            x = x.view(-1, 4*4*50)
            x = F.relu(self.fc1(x))
            x = self.fc2(x)
            return F.log_softmax(x, dim=1)

    # -- cell: train and test functions
    def train(args, model, device, federated_train_loader, optimizer, epoch):
        model.train()
        for batch_idx, (data, target) in enumerate(federated_train_loader): # <-- now it is a distributed dataset
            model.send(data.location) # <-- NEW: send the model to the right location
            data, target = data.to(device), target.to(device)
            optimizer.zero_grad()
            output = model(data)
            loss = F.nll_loss(output, target)
            loss.backward()
            optimizer.step()
            model.get() # <-- NEW: get the model back
            if batch_idx % args.log_interval == 0:
                loss = loss.get() # <-- NEW: get the loss back
                print('Train Epoch: {} [{}/{} ({:.0f}%)]\tLoss: {:.6f}'.format(
                    epoch, batch_idx * args.batch_size, len(federated_train_loader) * args.batch_size,
                    100. * batch_idx / len(federated_train_loader), loss.item()))

    def test(args, model, device, test_loader):
        model.eval()
        test_loss = 0
        correct = 0
        with torch.no_grad():
            for data, target in test_loader:
                data, target = data.to(device), target.to(device)
                output = model(data)
                test_loss += F.nll_loss(output, target, reduction='sum').item() # sum up batch loss
                pred = output.argmax(1, keepdim=True) # get the index of the max log-probability
                correct += pred.eq(target.view_as(pred)).sum().item()

        test_loss /= len(test_loader.dataset)

        print('\nTest set: Average loss: {:.4f}, Accuracy: {}/{} ({:.0f}%)\n'.format(
            test_loss, correct, len(test_loader.dataset),
            100. * correct / len(test_loader.dataset)))

    # -- cell: launch the training
    model = Net().to(device)
    optimizer = optim.SGD(model.parameters(), lr=args.lr) # TODO momentum is not supported at the moment

    test(args, model, device, test_loader)  # (the test's own baseline, before training)
    for epoch in range(1, args.epochs + 1):
        train(args, model, device, federated_train_loader, optimizer, epoch)
        test(args, model, device, test_loader)

    out = capsys.readouterr().out
    losses = [float(v) for v in re.findall(r"\tLoss: ([0-9.]+)", out)]
    test_losses = [float(v) for v in re.findall(r"Average loss: ([0-9.]+)", out)]
    accuracy = [int(v) for v in re.findall(r"Accuracy: (\d+)/", out)]
    assert len(losses) == args.epochs * len(federated_train_loader) == 12
    assert sum(losses[-4:]) < sum(losses[:4])  # the training loss went down
    assert test_losses[-1] < test_losses[0] and accuracy[-1] > accuracy[0]
    assert all(not isinstance(p, sy.PointerTensor) for p in model.parameters())  # the model is back
