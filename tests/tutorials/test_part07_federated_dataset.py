"""PySyft Part 07 - Federated Learning with Federated Dataset, cell by cell, on both transports.

Substitutions: ``import fedws as sy``; ``sy.create_sandbox(globals())`` becomes workers from
the ``make_worker`` fixture holding a synthetic Boston-shaped regression set (13 features),
sent as tagged tensors exactly as PySyft's sandbox did (``#boston #data`` / ``#boston
#target``); ``grid`` is ``sy.PrivateGridNetwork(*workers)``; ``epochs`` is 4.

The tutorial's optimizer cell (one ``th.optim.Adam`` per worker, over the same model) runs
as written; the same cell with ``th.optim.SGD`` must train too.
"""
# ruff: noqa: UP008, UP032, UP039, B007  (the tutorial's cells, as written)

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch as th

import fedws as sy

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar"),  # the cell's float(loss)
]


def sandbox(workers: list[sy.Worker]) -> list[Any]:
    """Each worker gets a shard of a linear regression set, tagged as PySyft's sandbox did.

    Returns the owning pointers: the data lives as long as they do.
    """
    keep = []
    g = th.Generator().manual_seed(0)
    w = th.randn(13, 1, generator=g)
    for i, worker in enumerate(workers):
        x = th.randn(40 + 5 * i, 13, generator=g)
        y = (x @ w).view(-1) + 0.1 * th.randn(len(x), generator=g)
        keep.append(x.tag("#boston", "#data").send(worker))  # type: ignore[attr-defined]
        keep.append(y.tag("#boston", "#target").send(worker))  # type: ignore[attr-defined]
    return keep


def grid_search(workers: list[sy.Worker], *tags: str) -> dict[str, list[Any]]:
    return dict(sy.PrivateGridNetwork(*workers).search(*tags))


@pytest.mark.parametrize(
    "optimizer_class",
    [
        "Adam",
        "SGD",
    ],
)
def test_part07_federated_dataset(
    make_worker: Callable[..., sy.Worker], optimizer_class: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # -- cell: parameters
    epochs = 4

    # -- cell: the sandbox (fixture workers, as create_sandbox made them)
    workers = [make_worker("bob"), make_worker("alice"), make_worker("jon")]
    owners = sandbox(workers)

    # -- cell: search for a dataset
    boston_data = grid_search(workers, "#boston", "#data")
    boston_target = grid_search(workers, "#boston", "#target")

    # -- cell: a model and an optimizer
    n_features = boston_data['alice'][0].shape[1]
    n_targets = 1

    model = th.nn.Linear(n_features, n_targets)

    # -- cell: cast the result in BaseDatasets
    datasets = []
    for worker in boston_data.keys():
        dataset = sy.BaseDataset(boston_data[worker][0], boston_target[worker][0])
        datasets.append(dataset)

    # Build the FederatedDataset object
    dataset = sy.FederatedDataset(datasets)
    print(dataset.workers)
    optimizers = {}
    for worker in dataset.workers:
        optimizers[worker] = getattr(th.optim, optimizer_class)(params=model.parameters(), lr=1e-2)

    # -- cell: the FederatedDataLoader
    train_loader = sy.FederatedDataLoader(dataset, batch_size=32, shuffle=False, drop_last=False)

    # -- cell: training
    for epoch in range(1, epochs + 1):
        loss_accum = 0
        for batch_idx, (data, target) in enumerate(train_loader):
            model.send(data.location)

            optimizer = optimizers[data.location.id]
            optimizer.zero_grad()
            pred = model(data)
            loss = ((pred.view(-1) - target)**2).mean()
            loss.backward()
            optimizer.step()

            model.get()
            loss = loss.get()

            loss_accum += float(loss)

            if batch_idx % 8 == 0:
                print('Train Epoch: {} [{}/{} ({:.0f}%)]\tBatch loss: {:.6f}'.format(
                    epoch, batch_idx, len(train_loader),
                    100. * batch_idx / len(train_loader), loss.item()))

        print('Total loss', loss_accum)

    out = capsys.readouterr().out
    assert "['bob', 'alice', 'jon']" in out
    totals = [float(v) for v in re.findall(r"Total loss ([0-9.e+-]+)", out)]
    assert len(totals) == epochs and len(train_loader) == 6  # 40, 45, 50 rows: 2 batches each
    # The model learns (Adam at lr=1e-2 moves each weight by ~1e-2 a step: slower on this set).
    assert totals[-1] < (0.7 if optimizer_class == "SGD" else 0.9) * totals[0]
    assert totals == sorted(totals, reverse=True)
    assert len(owners) == 6
