"""PySyft 0.2 tutorial "Part 05 - Welcome to the Sandbox", cell by cell.

The cells are the tutorial's, with ``import fedws as sy``. ``sy.create_sandbox(globals())``
makes six VirtualWorkers with scikit-learn's bundled datasets; the test passes a namespace
dict for ``globals()``. The same search and grid cells then run on workers of each
transport (real nodes handed to the sandbox with ``workers=``).

Boston housing left scikit-learn (1.2): the sandbox keeps its tags on a stand-in (the
diabetes regression data), whose description says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import fedws as sy
from fedws.sandbox import BOSTON_STAND_IN, SANDBOX_WORKERS


def _search_and_grid_cells(bob: sy.Worker, workers: list[sy.Worker]) -> None:
    # Part 2: Worker Search Functionality
    x = torch.tensor([1, 2, 3, 4, 5]).tag("#fun", "#boston", "#housing").describe("The input datapoints to the boston housing dataset.")
    y = torch.tensor([1, 2, 3, 4, 5]).tag("#fun", "#boston", "#housing").describe("The input datapoints to the boston housing dataset.")
    z = torch.tensor([1, 2, 3, 4, 5]).tag("#fun", "#mnist",).describe("The images in the MNIST training dataset.")
    assert x.tags == {"#fun", "#boston", "#housing"}
    x = x.send(bob)
    y = y.send(bob)
    z = z.send(bob)

    # this searches for exact match within a tag or within the description
    results = bob.search(["#boston", "#housing"])
    # The sandbox's Boston stand-in (data and target) and x and y.
    assert len(results) == 4 and all({"#boston", "#housing"} <= r.tags for r in results)
    print(results[0].description)
    assert results[0].description.startswith(BOSTON_STAND_IN)
    mine = [r for r in results if r.description == "The input datapoints to the boston housing dataset."]
    assert sorted(r.id_at_location for r in mine) == sorted([x.id_at_location, y.id_at_location])
    assert bob.search("#mnist")[0].description == "The images in the MNIST training dataset."

    # Part 3: Virtual Grid
    grid = sy.PrivateGridNetwork(*workers)
    results = grid.search("#boston")
    assert sorted(results) == sorted(w.id for w in workers)
    assert len(results[bob.id]) == 4  # the stand-in's two tensors and x, y
    boston_data = grid.search("#boston", "#data")
    boston_target = grid.search("#boston", "#target")
    rows = sum(p.shape[0] for ps in boston_data.values() for p in ps)
    assert rows == 442 and sum(p.shape[0] for ps in boston_target.values() for p in ps) == 442
    assert all(p.shape[1:] == (10,) for ps in boston_data.values() for p in ps)
    # The batches are whole: data rows and targets line up per worker.
    for wid, (data,) in boston_data.items():
        (target,) = boston_target[wid]
        assert data.shape[0] == target.shape[0]
    del x, y, z


def test_part05_as_written() -> None:
    namespace: dict[str, Any] = {"torch": torch}
    sy.create_sandbox(namespace)  # sy.create_sandbox(globals())
    workers, hook, bob = namespace["workers"], namespace["hook"], namespace["bob"]
    try:
        assert [w.id for w in workers] == list(SANDBOX_WORKERS)
        assert isinstance(hook, sy.TorchHook) and isinstance(bob, sy.VirtualWorker)
        assert all(namespace[name] is w for name, w in zip(SANDBOX_WORKERS, workers))
        assert isinstance(namespace["grid"], sy.PrivateGridNetwork)
        # 7 datasets, data and target each, one batch of each per worker
        assert all(w.objects_count_remote() == 14 for w in workers)
        for tag in ("#diabetes", "#breast_cancer_dataset", "#digits_dataset", "#iris_dataset",
                    "#wine_dataset", "#linnerrud_dataset"):
            found = namespace["grid"].search(tag, "#data")
            assert sorted(found) == sorted(SANDBOX_WORKERS), tag
        _search_and_grid_cells(bob, workers)
    finally:
        for w in workers:  # leave the process's default federation as it was
            w.clear_objects()
            hook.federation.unregister(w)


def test_part05_on_each_transport(
    hook: sy.TorchHook, make_worker: Callable[..., sy.Worker], capsys: pytest.CaptureFixture[str]
) -> None:
    workers = [make_worker(name) for name in SANDBOX_WORKERS[:3]]
    namespace: dict[str, Any] = {}
    sy.create_sandbox(namespace, verbose=False, workers=workers, federation=hook.federation)
    assert capsys.readouterr().out == "Setting up Sandbox...\nDone!\n"  # verbose=False, as PySyft
    assert namespace["workers"] == workers and namespace["bob"] is workers[0]
    assert [w.objects_count_remote() for w in workers] == [14, 14, 14]
    _search_and_grid_cells(namespace["bob"], workers)


def test_sandbox_without_data(hook: sy.TorchHook) -> None:
    namespace: dict[str, Any] = {}
    sy.create_sandbox(namespace, verbose=False, download_data=False, federation=hook.federation)
    assert [namespace[n].objects_count_remote() for n in SANDBOX_WORKERS] == [0] * 6


def test_sandbox_says_what_to_install_without_scikit_learn(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    with pytest.raises(ImportError, match=r"fedws\[sandbox\]"):
        sy.create_sandbox({}, verbose=False)
