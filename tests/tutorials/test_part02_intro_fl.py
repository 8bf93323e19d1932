"""PySyft 0.2 "Part 02 - Intro to Federated Learning", cell by cell, with ``import fedws as sy``.

The tutorial's workers come from ``make_worker`` (VirtualWorkers, and real ``fedws worker``
nodes); everything else is the tutorial's code as written. The one import that names a
PySyft module path, ``from syft.federated.floptimizer import Optims``, is
``from fedws.optim import Optims`` (also reachable as ``sy.optim.Optims``). Each run is
checked against the same training done locally.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn, optim

import fedws as sy


def _losses(text: str) -> list[float]:
    return [float(line.removeprefix("tensor(").split(",")[0].rstrip(")")) for line in text.splitlines() if line]


def test_section_2_1_toy_example_trains_centrally(hook, capsys) -> None:
    # A Toy Dataset
    data = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1.0]], requires_grad=True)
    target = torch.tensor([[0], [0], [1], [1.0]], requires_grad=True)

    # A Toy Model
    model = nn.Linear(2, 1)

    def train():
        # Training Logic
        opt = optim.SGD(params=model.parameters(), lr=0.1)
        for iter in range(20):  # noqa: B007 - the tutorial's cell as written
            # 1) erase previous gradients (if they exist)
            opt.zero_grad()

            # 2) make a prediction
            pred = model(data)

            # 3) calculate how much we missed
            loss = ((pred - target) ** 2).sum()

            # 4) figure out which weights caused us to miss
            loss.backward()

            # 5) change those weights
            opt.step()

            # 6) print our progress
            print(loss.data)

    train()
    losses = _losses(capsys.readouterr().out)
    assert len(losses) == 20 and losses[-1] < losses[0] / 5


@pytest.fixture
def workers(make_worker):
    # create a couple workers (the tutorial: sy.VirtualWorker(hook, id="bob"), id="alice")
    return make_worker("bob"), make_worker("alice")


def _toy(bob, alice):
    # A Toy Dataset
    data = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1.0]], requires_grad=True)
    target = torch.tensor([[0], [0], [1], [1.0]], requires_grad=True)

    # get pointers to training data on each worker by
    # sending some training data to bob and alice
    data_bob = data[0:2]
    target_bob = target[0:2]

    data_alice = data[2:]
    target_alice = target[2:]

    # Iniitalize A Toy Model
    model = nn.Linear(2, 1)

    data_bob = data_bob.send(bob)
    data_alice = data_alice.send(alice)
    target_bob = target_bob.send(bob)
    target_alice = target_alice.send(alice)

    # organize pointers into a list
    datasets = [(data_bob, target_bob), (data_alice, target_alice)]
    return model, datasets, [(data[0:2], target[0:2]), (data[2:], target[2:])]


def test_federated_sgd(workers, capsys) -> None:
    bob, alice = workers
    torch.manual_seed(0)
    model, datasets, local_sets = _toy(bob, alice)
    reference = copy.deepcopy(model)

    opt = optim.SGD(params=model.parameters(), lr=0.1)

    def train():
        # Training Logic
        opt = optim.SGD(params=model.parameters(), lr=0.1)
        for iter in range(10):  # noqa: B007 - the tutorial's cell as written

            # NEW) iterate through each worker's dataset
            for data, target in datasets:

                # NEW) send model to correct worker
                model.send(data.location)

                # 1) erase previous gradients (if they exist)
                opt.zero_grad()

                # 2) make a prediction
                pred = model(data)

                # 3) calculate how much we missed
                loss = ((pred - target) ** 2).sum()

                # 4) figure out which weights caused us to miss
                loss.backward()

                # 5) change those weights
                opt.step()

                # NEW) get model (with gradients)
                model.get()

                # 6) print our progress
                print(loss.get())  # NEW) slight edit... need to call .get() on loss\

    # federated averaging
    train()

    losses = _losses(capsys.readouterr().out)
    assert len(losses) == 20 and losses[-1] < losses[0]
    ref_opt = optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(10):
        for data, target in local_sets:
            ref_opt.zero_grad()
            ((reference(data) - target) ** 2).sum().backward()
            ref_opt.step()
    for p, q in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(q.data, p.data)
    assert opt is not None


def test_federated_adam_with_optims(workers, capsys) -> None:
    bob, alice = workers
    torch.manual_seed(0)
    model, datasets, local_sets = _toy(bob, alice)
    reference = copy.deepcopy(model)

    from fedws.optim import Optims

    workers = ["bob", "alice"]
    optims = Optims(workers, optim=optim.Adam(params=model.parameters(), lr=0.1))

    def train():
        # Training Logic
        for iter in range(10):  # noqa: B007 - the tutorial's cell as written

            # NEW) iterate through each worker's dataset
            for data, target in datasets:

                # NEW) send model to correct worker
                model.send(data.location)

                # Call the optimizer for the worker using get_optim
                opt = optims.get_optim(data.location.id)
                # print(data.location.id)

                # 1) erase previous gradients (if they exist)
                opt.zero_grad()

                # 2) make a prediction
                pred = model(data)

                # 3) calculate how much we missed
                loss = ((pred - target) ** 2).sum()

                # 4) figure out which weights caused us to miss
                loss.backward()

                # 5) change those weights
                opt.step()

                # NEW) get model (with gradients)
                model.get()

                # 6) print our progress
                print(loss.get())  # NEW) slight edit... need to call .get() on loss\

    # federated averaging
    train()

    losses = _losses(capsys.readouterr().out)
    assert len(losses) == 20 and losses[-2] < losses[0] and losses[-1] < losses[1]
    assert optims.count() == 2 and sy.optim.Optims is Optims
    for worker in (bob, alice):  # each worker's Adam moments live on that worker
        state = optims.get_optim(worker.id).state
        assert state and all(
            v.location is worker for s in state.values() for k, v in s.items() if k != "step"
        )
    # The same training locally, one Adam per worker, lands in the same place.
    ref_optims = {w: optim.Adam(reference.parameters(), lr=0.1) for w in workers}
    for _ in range(10):
        for w, (data, target) in zip(workers, local_sets):
            ref_optims[w].zero_grad()
            ((reference(data) - target) ** 2).sum().backward()
            ref_optims[w].step()
    for p, q in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(q.data, p.data, atol=1e-5, rtol=1e-4)
