"""The remote-tensor walkthrough of the course (seed 004), runnable: ``python examples/remote_tensors.py``.

Every step prints what it shows, so the output reads like the notebook.
"""

from __future__ import annotations

import torch as th
from torch import nn, optim

import fedws as sy


def step(title: str) -> None:
    print(f"\n== {title}")


def main() -> None:
    hook = sy.TorchHook(th)
    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")

    step("send and get")
    x_ptr = th.tensor([1, 2, 3, 4, 5]).send(bob)
    y_ptr = th.tensor([1, 1, 1, 1, 1]).send(bob)
    print("bob._objects:", bob._objects)
    print("x_ptr:", x_ptr, "location:", x_ptr.location, "owner:", x_ptr.owner)
    print("x_ptr.get():", x_ptr.get(), "y_ptr.get():", y_ptr.get(), "bob._objects:", bob._objects)

    step("send to two workers")
    x_ptr = th.tensor([1, 2, 3, 4, 5]).send(bob, alice)
    print("get():", x_ptr.get())
    print("get(sum_results=True):", th.tensor([1, 2, 3, 4, 5]).send(bob, alice).get(sum_results=True))

    step("remote arithmetic and backward")
    x = th.tensor([1.0, 2, 3, 4, 5], requires_grad=True).send(bob)
    y = th.tensor([1.0, 1, 1, 1, 1], requires_grad=True).send(bob)
    z = x + y
    print("z = x + y:", z, "->", z.get())
    (x + y).sum().backward()
    x = x.get()
    print("x:", x, "x.grad:", x.grad)

    step("a linear model trained on bob")
    inp = th.tensor([[1.0, 1], [0, 1], [1, 0], [0, 0]], requires_grad=True).send(bob)
    target = th.tensor([[1.0], [1], [0], [0]], requires_grad=True).send(bob)
    weights = th.tensor([[0.0], [0]], requires_grad=True).send(bob)
    for _ in range(10):
        loss = ((inp.mm(weights) - target) ** 2).sum()
        loss.backward()
        weights.data.sub_(weights.grad * 0.1)
        weights.grad *= 0
        print(loss.get().data)

    step("common errors")
    x = th.tensor([1, 2, 3, 4, 5]).send(bob)
    try:
        th.tensor([1, 1, 1, 1, 1]) + x
    except sy.LocationError as exc:
        print("LocationError:", exc)
    bob._objects = {}
    try:
        (x + x).get()
    except sy.ObjectNotFoundError as exc:
        print("ObjectNotFoundError:", exc)

    step("toy federated learning")
    data = th.tensor([[1.0, 1], [0, 1], [1, 0], [0, 0]], requires_grad=True)
    target = th.tensor([[1.0], [1], [0], [0]], requires_grad=True)
    datasets = [(data[0:2].send(bob), target[0:2].send(bob)), (data[2:].send(alice), target[2:].send(alice))]
    model = nn.Linear(2, 1)
    opt = optim.SGD(params=model.parameters(), lr=0.1)
    for it in range(5):
        for d, t in datasets:
            model.send(d.location)
            opt.zero_grad()
            loss = ((model(d) - t) ** 2).sum()
            loss.backward()
            model.get()
            opt.step()
            print(f"round {it} on {d.location.id}: loss {loss.get().data}")

    step("pointers to pointers")
    bob.clear_objects()
    alice.clear_objects()
    bob.add_worker(alice)
    alice.add_worker(bob)
    p2p2x = th.tensor([1, 2, 3, 4, 5]).send(bob).send(alice)
    y = p2p2x + p2p2x
    print("bob._objects:", bob._objects)
    print("alice._objects:", alice._objects)
    print("y.get().get():", y.get().get())
    print("p2p2x.get().get():", p2p2x.get().get())

    step("remote_get and move")
    x = th.tensor([1, 2, 3, 4, 5]).send(bob).send(alice)
    x.remote_get()
    print("after remote_get: bob", bob._objects, "alice", alice._objects)
    print("x.get():", x.get())
    x = th.tensor([1, 2, 3, 4, 5]).send(bob).move(alice)
    print("after move: bob", bob._objects, "alice", alice._objects)
    print("x.get():", x.get())


if __name__ == "__main__":
    main()
