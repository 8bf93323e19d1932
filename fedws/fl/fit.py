"""``worker.fit(dataset_key=...)`` and ``await worker.async_fit(...)``: PySyft's per-worker training.

After ``train_config.send(worker)``, a fit trains the config's model on the dataset the
node serves under ``dataset_key`` (``node.add_dataset`` or a ``[[data]]`` entry in its
config), with the config's step traced into a plan, one message per minibatch, and returns
the mean training loss. ``async_fit`` queues the same work without blocking, so
``asyncio.gather`` over workers trains them all at once.

The methods are put on :class:`~fedws.client.worker.Worker` by :func:`install`, when this
module is imported (``fedws.fl`` imports it, and ``sy.TrainConfig`` lives in ``fedws.fl``):
the client layer cannot import the FL layer that implements them.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any

import torch

from ..client.worker import Worker
from ..pointers import PointerTensor
from .config import FedAvgConfig
from .local_training import LocalRun, NodeData, _start_step_training, data_from_search
from .remote import first_error, search_nowait
from .train_config import TrainConfig, config_sent_to

__all__ = ["fit", "async_fit", "install"]

# The tags a node serves a dataset under (fedws.datasets, which this layer cannot import).
DATA_TAG, TARGET_TAG = "#data", "#target"


def _search(worker: Worker, dataset_key: str) -> tuple[Future[list[PointerTensor]], Future[list[PointerTensor]]]:
    tag = dataset_key if dataset_key.startswith("#") else f"#{dataset_key}"
    return search_nowait(worker, [tag, DATA_TAG]), search_nowait(worker, [tag, TARGET_TAG])


def _queue(worker: Worker, config: TrainConfig, dataset_key: str, xs: list[PointerTensor], ys: list[PointerTensor]) -> LocalRun:
    tag = dataset_key.lstrip("#")
    fcfg = FedAvgConfig(
        local_epochs=config.epochs, batch_size=config.batch_size, lr=config.step.optimizer.lr,
        seed=config.seed, data_tags=(f"#{tag}",), x_tag=DATA_TAG, y_tag=TARGET_TAG,
        keep_optimizer_state=config.keep_optimizer_state,
    )
    data: NodeData = data_from_search(worker, fcfg, xs, ys)
    pointer = config.pointer_for(worker)
    pointer.fits += 1
    return _start_step_training(
        config.model, data, fcfg, config.step, round_number=pointer.fits, fetch_state=True,
        plans=config.plans, lr=config.step.optimizer.lr, mu=0.0,
        shuffle=config.shuffle, max_batches=config.max_nr_batches,
    )


def _finish(worker: Worker, config: TrainConfig, run: LocalRun, results: list[Any]) -> torch.Tensor:
    err = first_error(worker, run.start_seq, run.end_seq)
    if err is not None:
        raise err
    trained = config.pointer_for(worker)
    model = trained.get()
    model.load_state_dict(dict(zip(run.state_keys, results[2:])))
    trained.trained = model
    total = results[1]
    return torch.as_tensor(total) / max(run.examples_seen, 1)


def fit(worker: Worker, dataset_key: str, return_ids: Any = None, **_: Any) -> torch.Tensor:
    """Train the TrainConfig sent to ``worker`` on its dataset ``dataset_key``; the mean loss.

    The trained model is ``train_config.model_ptr.get()``. ``return_ids`` is accepted for
    PySyft compatibility and ignored.

    Raises:
        ValueError: no TrainConfig was sent to ``worker``.
        ObjectNotFoundError: the worker serves no (or an ambiguous) dataset ``dataset_key``.
        RemoteError: a step failed on the node.
    """
    config = config_sent_to(worker)
    fx, fy = _search(worker, dataset_key)
    run = _queue(worker, config, dataset_key, fx.result(), fy.result())
    return _finish(worker, config, run, [f.result() for f in run.futures])


async def async_fit(worker: Worker, dataset_key: str, return_ids: Any = None, **_: Any) -> torch.Tensor:
    """:func:`fit` without blocking the event loop: ``await asyncio.gather(*(w.async_fit(...) ...))``."""
    config = config_sent_to(worker)
    fx, fy = _search(worker, dataset_key)
    xs = await asyncio.wrap_future(fx)
    ys = await asyncio.wrap_future(fy)
    run = _queue(worker, config, dataset_key, xs, ys)
    results = [await asyncio.wrap_future(f) for f in run.futures]
    return _finish(worker, config, run, results)


def install() -> None:
    """Give every Worker ``fit`` and ``async_fit`` (idempotent)."""
    if getattr(Worker, "fit", None) is not fit:
        Worker.fit = fit  # type: ignore[attr-defined]
        Worker.async_fit = async_fit  # type: ignore[attr-defined]


install()
