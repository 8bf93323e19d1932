"""``sy.create_sandbox(globals())``: PySyft's Part 05 playground, with bundled data only.

It makes the tutorial's hook and six VirtualWorkers (bob, theo, jason, alice, andy, jon),
a :class:`~fedws.grid.PrivateGridNetwork` of them, and spreads small datasets that ship
with scikit-learn across the workers, tagged and described as PySyft did (``#data`` /
``#target``, the dataset's tags, the words of the first line of its description; the
description is the dataset's own text, searchable).

No download ever happens: every dataset is one scikit-learn installs with itself. The
Boston housing dataset PySyft used was removed from scikit-learn (1.2); its tags
(``#boston``, ``#housing``, ``#boston_housing``) are kept on a stand-in, the diabetes
regression data, whose description says so. The data stays on the workers for the
life of the sandbox: no pointer owns it (PySyft's ``garbage_collect_data = False``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

import torch

from .client.federation import Federation
from .client.worker import Worker
from .grid import PrivateGridNetwork
from .hook import TorchHook
from .protocol.ids import new_id
from .virtual import VirtualWorker

__all__ = ["create_sandbox", "make_hook", "SANDBOX_WORKERS", "SANDBOX_DATASETS", "BOSTON_STAND_IN"]

SANDBOX_WORKERS = ("bob", "theo", "jason", "alice", "andy", "jon")
"""The workers PySyft's sandbox made, in its order."""

SANDBOX_DATASETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("load_diabetes", ("#boston", "#housing", "#boston_housing")),  # the Boston stand-in
    ("load_diabetes", ("#diabetes",)),
    ("load_breast_cancer", ("#breast_cancer_dataset",)),
    ("load_digits", ("#digits_dataset",)),
    ("load_iris", ("#iris_dataset",)),
    ("load_wine", ("#wine_dataset",)),
    ("load_linnerud", ("#linnerrud_dataset",)),
)
"""(scikit-learn loader, tags) of each dataset, with PySyft's tags."""

BOSTON_STAND_IN = (
    "Stand-in for the Boston housing dataset, which scikit-learn removed in 1.2: the diabetes "
    "regression data (442 samples, 10 features, a float target), under the Boston tags.\n\n"
)


def create_sandbox(
    gbs: MutableMapping[str, Any],
    verbose: bool = True,
    download_data: bool = True,
    *,
    workers: Sequence[Worker] | None = None,
    federation: Federation[Worker] | None = None,
) -> None:
    """Put the tutorial's ``hook``, workers, ``workers`` and ``grid`` into ``gbs``.

    Args:
        gbs: the namespace to fill (``globals()`` in a notebook).
        verbose: print each step, as PySyft did.
        download_data: load the datasets (bundled with scikit-learn: nothing is downloaded).
        workers: use these workers instead of making VirtualWorkers (e.g. real nodes); they
            fill the tutorial's names in order.
        federation: the federation of the hook (default: the process's, as ``TorchHook``).

    Raises:
        ImportError: ``download_data`` and scikit-learn is not installed
            (``pip install 'fedws[sandbox]'``).
    """
    loaders = _loaders() if download_data else []
    say: Callable[[str], None] = print if verbose else _quiet
    print("Setting up Sandbox...")
    say("\t- Hooking PyTorch")
    hook = TorchHook(torch, federation=federation) if federation is not None else TorchHook(torch)
    if workers is None:
        say("\t- Creating Virtual Workers:")
        made = []
        for name in SANDBOX_WORKERS:
            say(f"\t\t- {name}")
            made.append(VirtualWorker(hook, id=name))
        workers = made
    workers = list(workers)
    say("\tStoring hook and workers as global variables...")
    gbs["hook"] = hook
    for name, worker in zip(SANDBOX_WORKERS, workers):
        gbs[name] = worker
    gbs["workers"] = workers
    if loaders:
        say("\tLoading datasets from SciKit Learn...")
        loaded: list[torch.Tensor] = []
        for (loader, tags), load in zip(SANDBOX_DATASETS, loaders):
            say(f"\t\t- {tags[0][1:]} ({loader})")
            loaded.extend(_load(load, tags, boston=tags[0] == "#boston"))
        say("\tDistributing Datasets Amongst Workers...")
        for tensor in loaded:
            distribute_dataset(tensor, workers)
    say("\tCollecting workers into a VirtualGrid...")
    gbs["grid"] = PrivateGridNetwork(*workers)
    print("Done!")


def make_hook(gbs: MutableMapping[str, Any]) -> None:
    """PySyft's ``sy.make_hook(globals())``: the sandbox without data, quietly."""
    create_sandbox(gbs, False, False)


def distribute_dataset(data: torch.Tensor, workers: Sequence[Worker]) -> None:
    """Split ``data`` by rows into one batch per worker (the last takes the rest) and store
    each batch there with the tensor's tags and description. No pointer owns the batches:
    they stay on the workers, found with ``search``."""
    n = len(workers)
    size = int(data.shape[0] / n)
    tags = sorted(getattr(data, "tags", None) or ())
    description = getattr(data, "description", None)
    for i, worker in enumerate(workers):
        batch = data[i * size : (i + 1) * size] if i < n - 1 else data[(n - 1) * size :]
        worker.store(batch.contiguous(), obj_id=new_id(), tags=tags, description=description)


def _load(load: Callable[[], Any], tags: Sequence[str], *, boston: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = load()
    descr: str = dataset["DESCR"]
    words = descr.split("\n")[0].lower().split(" ")
    if boston:
        descr = BOSTON_STAND_IN + descr
    data = torch.tensor(dataset["data"]).float()
    target = torch.tensor(dataset["target"]).float()
    data.tags = {*tags, "#data", *words}  # type: ignore[attr-defined]
    target.tags = {*tags, "#target", *words}  # type: ignore[attr-defined]
    data.description = target.description = descr  # type: ignore[attr-defined]
    return data, target


def _loaders() -> list[Callable[[], Any]]:
    if importlib.util.find_spec("sklearn") is None:
        raise ImportError(
            "create_sandbox(download_data=True) loads the datasets bundled with scikit-learn, which is not "
            "installed: pip install 'fedws[sandbox]' (or pass download_data=False for workers without data)"
        )
    from sklearn import datasets

    return [getattr(datasets, loader) for loader, _ in SANDBOX_DATASETS]


def _quiet(_: str) -> None:
    pass
