# ruff: noqa: B018, UP008, UP032  (the tutorial's cells, as written)
"""PySyft 0.2 "Part 10 - Federated Learning with Secure Aggregation", cell by cell, with
``import fedws as sy``, on both transports.

Not as written: the Boston Housing pickle is not shipped, so the loading cell builds a
small data set of the same shape (13 features, a linear target); the workers come from
the test's fixture (real nodes are linked with ``add_worker``, their operator's peer list).
Part B shares each remote parameter where it is (the node splits it, the coordinator sees
nothing); the final ``train`` brings each parameter to the coordinator first, as written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.utils.data import DataLoader, TensorDataset

import fedws as sy


class Parser:
    """Parameters for training"""

    def __init__(self) -> None:
        self.epochs = 10
        self.lr = 0.001
        self.test_batch_size = 8
        self.batch_size = 8
        self.log_interval = 10
        self.seed = 1


class Net(nn.Module):
    def __init__(self) -> None:
        super(Net, self).__init__()
        self.fc1 = nn.Linear(13, 32)
        self.fc2 = nn.Linear(32, 24)
        self.fc3 = nn.Linear(24, 1)

    def forward(self, x: Any) -> Any:
        x = x.view(-1, 13)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x


def _boston_like(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.randn(n, 13, generator=g) * 3 + 5
    X[:, 3] = (X[:, 3] > 5).float()  # column 3 is binary in the real data set
    y = X @ torch.linspace(-1, 1, 13) + 22.0
    return X, y


def test_part10(make_worker: Callable[..., sy.Worker], one_torch_thread: None) -> None:
    args = Parser()

    torch.manual_seed(args.seed)
    kwargs: dict[str, Any] = {}

    # Loading the Dataset (a small stand-in for the pickle)
    g = torch.Generator().manual_seed(0)
    (X, y), (X_test, y_test) = _boston_like(32, g), _boston_like(16, g)

    mean = X.mean(0, keepdim=True)
    dev = X.std(0, keepdim=True)
    mean[:, 3] = 0.  # the feature at column 3 is binary,
    dev[:, 3] = 1.  # so we don't standardize it
    X = (X - mean) / dev
    X_test = (X_test - mean) / dev
    train = TensorDataset(X, y)
    test = TensorDataset(X_test, y_test)
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, **kwargs)
    test_loader = DataLoader(test, batch_size=args.test_batch_size, shuffle=True, **kwargs)

    model = Net()
    optimizer = optim.SGD(model.parameters(), lr=args.lr)

    # Hooking PyTorch (the workers: the fixture's, linked to each other)
    bob, alice, james = make_worker("bob"), make_worker("alice"), make_worker("james")
    for a, b in ((bob, alice), (alice, bob), (bob, james), (alice, james), (james, bob), (james, alice)):
        a.add_worker(b)

    compute_nodes = [bob, alice]

    train_distributed_dataset = []

    for batch_idx, (data, target) in enumerate(train_loader):
        data = data.send(compute_nodes[batch_idx % len(compute_nodes)])
        target = target.send(compute_nodes[batch_idx % len(compute_nodes)])
        train_distributed_dataset.append((data, target))

    def train(epoch: int) -> None:
        model.train()
        for batch_idx, (data, target) in enumerate(train_distributed_dataset):
            worker = data.location
            model.send(worker)

            optimizer.zero_grad()
            # update the model
            pred = model(data)
            loss = F.mse_loss(pred.view(-1), target)
            loss.backward()
            optimizer.step()
            model.get()

            if batch_idx % args.log_interval == 0:
                loss = loss.get()
                print('Train Epoch: {} [{}/{} ({:.0f}%)]\tLoss: {:.6f}'.format(
                    epoch, batch_idx * data.shape[0], len(train_loader) * data.shape[0],
                    100. * batch_idx / len(train_loader), loss.item()))

    losses: list[float] = []

    def test() -> None:
        model.eval()
        test_loss = 0
        for data, target in test_loader:
            output = model(data)
            test_loss += F.mse_loss(output.view(-1), target, reduction='sum').item()  # sum up batch loss

        test_loss /= len(test_loader.dataset)  # type: ignore[arg-type]
        losses.append(test_loss)
        print('\nTest set: Average loss: {:.4f}\n'.format(test_loss))

    t = time.time()

    for epoch in range(1, args.epochs + 1):
        train(epoch)

    total_time = time.time() - t
    print('Total', round(total_time, 2), 's')

    test()
    assert losses and losses[-1] == losses[-1]  # a number, not NaN

    # Section 2: Adding Encrypted Aggregation
    remote_dataset: tuple[list[Any], list[Any]] = (list(), list())

    train_distributed_dataset = []

    for batch_idx, (data, target) in enumerate(train_loader):
        data = data.send(compute_nodes[batch_idx % len(compute_nodes)])
        target = target.send(compute_nodes[batch_idx % len(compute_nodes)])
        remote_dataset[batch_idx % len(compute_nodes)].append((data, target))

    def update(data: Any, target: Any, model: Any, optimizer: Any) -> Any:
        model.send(data.location)
        optimizer.zero_grad()
        pred = model(data)
        loss = F.mse_loss(pred.view(-1), target)
        loss.backward()
        optimizer.step()
        return model

    bobs_model = Net()
    alices_model = Net()

    bobs_optimizer = optim.SGD(bobs_model.parameters(), lr=args.lr)
    alices_optimizer = optim.SGD(alices_model.parameters(), lr=args.lr)

    models = [bobs_model, alices_model]
    params = [list(bobs_model.parameters()), list(alices_model.parameters())]
    optimizers = [bobs_optimizer, alices_optimizer]

    # Part A: Train
    data_index = 0
    for remote_index in range(len(compute_nodes)):
        data, target = remote_dataset[remote_index][data_index]
        models[remote_index] = update(data, target, models[remote_index], optimizers[remote_index])

    # Part B: Encrypted Aggregation
    new_params = list()

    expected = []  # (test only: what the average must be, read with the trusted path)
    for param_i in range(len(params[0])):
        expected.append((params[0][param_i].copy().get() + params[1][param_i].copy().get()) / 2)

    for param_i in range(len(params[0])):

        # for each worker
        spdz_params = list()
        for remote_index in range(len(compute_nodes)):

            # select the identical parameter from each worker and copy it
            copy_of_parameter = params[remote_index][param_i].copy()

            # since SMPC can only work with integers (not floats), we need
            # to use Integers to store decimal information. In other words,
            # we need to use "Fixed Precision" encoding.
            fixed_precision_param = copy_of_parameter.fix_precision()

            # now we encrypt it on the remote machine. Note that
            # fixed_precision_param is ALREADY a pointer. Thus, when
            # we call share, it actually encrypts the data that the
            # data is pointing TO. This returns a POINTER to the
            # MPC secret shared object, which we need to fetch.
            encrypted_param = fixed_precision_param.share(bob, alice, crypto_provider=james)

            # now we fetch the pointer to the MPC shared value
            param = encrypted_param.get()

            # save the parameter so we can average it with the same parameter
            # from the other workers
            spdz_params.append(param)

        # average params from multiple workers, fetch them to the local machine
        # decrypt and decode (from fixed precision) back into a floating point number
        new_param = (spdz_params[0] + spdz_params[1]).get().float_precision()/2

        # save the new averaged parameter
        new_params.append(new_param)

    for got, want in zip(new_params, expected):
        assert got.shape == want.shape
        assert torch.allclose(got, want.detach(), atol=1e-3)

    # Part C: Cleanup
    with torch.no_grad():
        for model in params:  # type: ignore[assignment]
            for param in model:
                param *= 0

        for model in models:
            model.get()

        for remote_index in range(len(compute_nodes)):
            for param_index in range(len(params[remote_index])):
                params[remote_index][param_index].set_(new_params[param_index])

    assert torch.equal(params[0][0], params[1][0])

    # Let's put it all Together!!
    def train(epoch: int) -> None:  # type: ignore[no-redef]
        for data_index in range(len(remote_dataset[0])-1):
            # update remote models
            for remote_index in range(len(compute_nodes)):
                data, target = remote_dataset[remote_index][data_index]
                models[remote_index] = update(data, target, models[remote_index], optimizers[remote_index])

            # encrypted aggregation
            new_params = list()
            for param_i in range(len(params[0])):
                spdz_params = list()
                for remote_index in range(len(compute_nodes)):
                    spdz_params.append(params[remote_index][param_i].copy().get().fix_precision().share(bob, alice, crypto_provider=james))

                new_param = (spdz_params[0] + spdz_params[1]).get().float_precision()/2
                new_params.append(new_param)

            # cleanup
            with torch.no_grad():
                for model in params:
                    for param in model:
                        param *= 0

                for model in models:
                    model.get()

                for remote_index in range(len(compute_nodes)):
                    for param_index in range(len(params[remote_index])):
                        params[remote_index][param_index].set_(new_params[param_index])

    def test() -> None:  # type: ignore[no-redef]
        models[0].eval()
        test_loss = 0
        for data, target in test_loader:
            output = models[0](data)
            test_loss += F.mse_loss(output.view(-1), target, reduction='sum').item()  # sum up batch loss

        test_loss /= len(test_loader.dataset)  # type: ignore[arg-type]
        losses.append(test_loss)
        print('Test set: Average loss: {:.4f}\n'.format(test_loss))

    t = time.time()

    for epoch in range(args.epochs):
        print(f"Epoch {epoch + 1}")
        train(epoch)
        test()

    total_time = time.time() - t
    print('Total', round(total_time, 2), 's')

    assert len(losses) == 1 + args.epochs
    assert torch.equal(params[0][2], params[1][2])  # both models hold the secure average
    assert losses[-1] < losses[1]  # and it learns
