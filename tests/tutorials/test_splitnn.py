"""PySyft 0.2 tutorial "SplitNN Tutorial 1 - SplitNN Introduction", cell by cell.

The cells are the tutorial's, with ``import fedws as sy``, except the data: the tutorial
downloads MNIST with torchvision; here a few batches of MNIST-shaped tensors drawn from two
separable classes stand in, so the test runs offline in seconds (and ``epochs`` is 2, not
15). alice and bob come from the ``make_worker`` fixture (VirtualWorkers, or real nodes
told of each other first). The gradient crosses the cut exactly as the tutorial wrote it
(``remote_a.grad.copy().move(...)`` then ``a.backward(grad_a)``); a second test uses
``move(worker, requires_grad=True)``, which sends it back by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn, optim

import fedws as sy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mnist_like(batches: int = 4, batch_size: int = 64) -> Any:
    """MNIST-shaped (N, 1, 28, 28) images, labels 0..9, that a small network can learn."""
    g = torch.Generator().manual_seed(7)
    n = batches * batch_size
    labels = torch.randint(0, 10, (n,), generator=g)
    prototypes = torch.randn(10, 1, 28, 28, generator=g)
    images = prototypes[labels] + 0.5 * torch.randn(n, 1, 28, 28, generator=g)
    dataset = torch.utils.data.TensorDataset(images, labels)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g)


def make_models() -> list[nn.Module]:
    torch.manual_seed(0)
    input_size = 784
    hidden_sizes = [128, 640]
    output_size = 10
    return [
        nn.Sequential(
            nn.Linear(input_size, hidden_sizes[0]),
            nn.ReLU(),
            nn.Linear(hidden_sizes[0], hidden_sizes[1]),
            nn.ReLU(),
        ),
        nn.Sequential(nn.Linear(hidden_sizes[1], output_size), nn.LogSoftmax(dim=1)),
    ]


def workers(transport: str, make_worker: Callable[..., sy.Worker]) -> tuple[sy.Worker, sy.Worker]:
    alice = make_worker("alice")  # sy.VirtualWorker(hook, id="alice")
    bob = make_worker("bob")  # sy.VirtualWorker(hook, id="bob")
    if transport == "websocket":  # activations and gradients go node to node
        alice.add_worker(bob)
        bob.add_worker(alice)
    return alice, bob


def test_splitnn_tutorial_1_cells(hook: sy.TorchHook, transport: str, make_worker: Callable[..., sy.Worker]) -> None:
    epochs = 2
    trainloader = mnist_like(batches=3)

    models = make_models()
    # create optimisers for each segment and link to their segment
    optimizers = [optim.SGD(model.parameters(), lr=0.03) for model in models]
    # create some workers
    alice, bob = workers(transport, make_worker)
    workers_ = alice, bob  # noqa: F841  (the tutorial's `workers = alice, bob`)
    # send Model Segments to starting locations
    model_locations = [alice, bob]
    for model, location in zip(models, model_locations):
        model.send(location)

    def train(x: Any, target: Any, models: Any, optimizers: Any) -> Any:
        # Training Logic
        # 1) erase previous gradients (if they exist)
        for opt in optimizers:
            opt.zero_grad()
        # 2) make a prediction
        a = models[0](x)
        # 3) break the computation graph link, and send the activation signal to the next model
        remote_a = a.detach().move(models[1].location).requires_grad_()
        # 4) make prediction on next model using recieved signal
        pred = models[1](remote_a)
        # 5) calculate how much we missed
        criterion = nn.NLLLoss()
        loss = criterion(pred, target)
        # 6) figure out which weights caused us to miss
        loss.backward()
        # 7) send gradient of the recieved activation signal to the model behind
        grad_a = remote_a.grad.copy().move(models[0].location)
        # 8) backpropagate on bottom model given this gradient
        a.backward(grad_a)
        # 9) change the weights
        for opt in optimizers:
            opt.step()
        # 10) print our progress
        return loss.detach().get()

    before = [p.location for p in models[0].parameters()]
    epoch_losses = []
    for i in range(epochs):
        running_loss = 0
        for images, labels in trainloader:
            images = images.send(alice)
            images = images.view(images.shape[0], -1)
            labels = labels.send(bob)
            loss = train(images, labels, models, optimizers)
            running_loss += loss
        else:
            print("Epoch {} - Training loss: {}".format(i, running_loss / len(trainloader)))  # noqa: UP032
            epoch_losses.append(float(running_loss / len(trainloader)))

    assert before == [alice] * 4 and models[1].location is bob  # the segments never moved
    assert epoch_losses[-1] < epoch_losses[0] - 0.1  # both halves learn: the gradient crossed the cut


def test_splitnn_with_move_requires_grad(hook: sy.TorchHook, transport: str, make_worker: Callable[..., sy.Worker]) -> None:
    models = make_models()
    optimizers = [optim.SGD(model.parameters(), lr=0.03) for model in models]
    alice, bob = workers(transport, make_worker)
    for model, location in zip(models, [alice, bob]):
        model.send(location)
    bottom_before = [p.copy().get() for p in models[0].parameters()]

    losses = []
    for images, labels in mnist_like(batches=3):
        x = images.send(alice).view(images.shape[0], -1)
        target = labels.send(bob)
        for opt in optimizers:
            opt.zero_grad()
        a = models[0](x)
        remote_a = a.move(models[1].location, requires_grad=True)  # PySyft's move(..., requires_grad=True)
        loss = nn.NLLLoss()(models[1](remote_a), target)
        loss.backward()  # ... and the gradient flows back across the cut into alice's graph
        for opt in optimizers:
            opt.step()
        losses.append(float(loss.detach().get()))

    bottom_after = [p.copy().get() for p in models[0].parameters()]
    assert all(not torch.equal(b, c) for b, c in zip(bottom_before, bottom_after))  # alice's half learned
    assert losses[-1] < losses[0]
