"""PySyft 0.2 tutorial "Part 04 - Federated Learning via Trusted Aggregator", cell by cell.

The cells are the tutorial's, with ``import fedws as sy``. bob, alice and secure_worker come
from the ``make_worker`` fixture (VirtualWorkers, or real nodes). VirtualWorkers of one hook
know each other, as in the tutorial; real nodes are told where their peers are first.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import stored_count
from torch import nn, optim

import fedws as sy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_part04_cells(hook: sy.TorchHook, transport: str, make_worker: Callable[..., sy.Worker]) -> None:
    # Step 1: Create Data Owners
    bob = make_worker("bob")  # sy.VirtualWorker(hook, id="bob")
    alice = make_worker("alice")
    secure_worker = make_worker("secure_worker")
    if transport == "websocket":  # the models move from bob and alice to the secure worker
        secure_worker.add_worker(bob)
        secure_worker.add_worker(alice)

    torch.manual_seed(0)
    # A Toy Dataset
    data = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1.0]], requires_grad=True)
    target = torch.tensor([[0], [0], [1], [1.0]], requires_grad=True)
    bobs_data = data[0:2].send(bob)
    bobs_target = target[0:2].send(bob)
    alices_data = data[2:].send(alice)
    alices_target = target[2:].send(alice)

    # Step 2: Create Our Model
    model = nn.Linear(2, 1)

    # Step 3: Send a Copy of the Model to Alice and Bob
    bobs_model = model.copy().send(bob)
    alices_model = model.copy().send(alice)
    bobs_opt = optim.SGD(params=bobs_model.parameters(), lr=0.1)
    alices_opt = optim.SGD(params=alices_model.parameters(), lr=0.1)

    # Step 4: Train Bob's and Alice's Models (in parallel)
    losses = []
    for i in range(10):  # noqa: B007  (the tutorial's loop, as written)
        bobs_opt.zero_grad()
        bobs_pred = bobs_model(bobs_data)
        bobs_loss = ((bobs_pred - bobs_target) ** 2).sum()
        bobs_loss.backward()
        bobs_opt.step()
        bobs_loss = bobs_loss.get().data

        alices_opt.zero_grad()
        alices_pred = alices_model(alices_data)
        alices_loss = ((alices_pred - alices_target) ** 2).sum()
        alices_loss.backward()
        alices_opt.step()
        alices_loss = alices_loss.get().data
        losses.append(float(bobs_loss) + float(alices_loss))
    assert losses[-1] < losses[0]

    # Step 5: Send Both Updated Models to a Secure Worker
    alices_model.move(secure_worker)
    bobs_model.move(secure_worker)
    assert alices_model.location is secure_worker and bobs_model.location is secure_worker
    assert stored_count(secure_worker) == 4  # two weights, two biases: the models, not pointers

    # Step 6: Average the Models
    with torch.no_grad():
        model.weight.set_(((alices_model.weight.data + bobs_model.weight.data) / 2).get())
        model.bias.set_(((alices_model.bias.data + bobs_model.bias.data) / 2).get())

    # Rinse and Repeat
    iterations = 10
    worker_iters = 5
    for a_iter in range(iterations):  # noqa: B007
        bobs_model = model.copy().send(bob)
        alices_model = model.copy().send(alice)
        bobs_opt = optim.SGD(params=bobs_model.parameters(), lr=0.1)
        alices_opt = optim.SGD(params=alices_model.parameters(), lr=0.1)
        for wi in range(worker_iters):  # noqa: B007
            bobs_opt.zero_grad()
            bobs_pred = bobs_model(bobs_data)
            bobs_loss = ((bobs_pred - bobs_target) ** 2).sum()
            bobs_loss.backward()
            bobs_opt.step()
            bobs_loss = bobs_loss.get().data

            alices_opt.zero_grad()
            alices_pred = alices_model(alices_data)
            alices_loss = ((alices_pred - alices_target) ** 2).sum()
            alices_loss.backward()
            alices_opt.step()
            alices_loss = alices_loss.get().data
        alices_model.move(secure_worker)
        bobs_model.move(secure_worker)
        with torch.no_grad():
            model.weight.set_(((alices_model.weight.data + bobs_model.weight.data) / 2).get())
            model.bias.set_(((alices_model.bias.data + bobs_model.bias.data) / 2).get())

    preds = model(data)
    loss = ((preds - target) ** 2).sum()
    assert preds.shape == (4, 1)
    assert float(loss.data) < 1.0  # the averaged model learned (underfits, as the tutorial says)
    del bobs_model, alices_model, bobs_opt, alices_opt
    assert stored_count(secure_worker) == 0  # the moved models were freed with their pointers
