"""Averaging on a trusted aggregator: the course's "untrusted central server" project.

Each node's trained parameters move node to node to the aggregator (``model.move``), the
weighted average is computed there, and only the average is fetched. The coordinator
never receives an individual node's update, so it cannot study one node's gradients.
The average is :func:`fedws.fl.aggregate.weighted_average`, the function
:func:`~fedws.fl.aggregate.fedavg` uses, run here on pointers: both ways of averaging give
the same model.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from ..client.worker import Worker
from ..pointers import PointerTensor
from .aggregate import fedavg_weights, weighted_average
from .local_training import LocalRun
from .remote import fetch_nowait

__all__ = ["connect_aggregator", "start_trusted_average"]


def connect_aggregator(aggregator: Worker, workers: Sequence[Worker]) -> None:
    """Let the aggregator reach every node: it pulls their updates itself."""
    for w in workers:
        if w is not aggregator:
            aggregator.add_worker(w)


def start_trusted_average(runs: Sequence[LocalRun], aggregator: Worker) -> tuple[list[str], list[Future[Any]]]:
    """Move every run's model to ``aggregator``, average there, queue the fetch.

    Returns:
        ``(keys, futures)``: the state dict keys and, in the same order, futures of the
        averaged tensors. Nothing else is fetched.
    """
    weights = fedavg_weights([r.data.num_examples for r in runs])
    states = []
    for run in runs:
        run.model.move(aggregator)  # type: ignore[operator]  # Module.move is installed by the hook
        states.append(run.model.state_dict(keep_vars=True))
    keys = list(states[0])
    futures: list[Future[Any]] = []
    for key in keys:
        average = weighted_average([state[key] for state in states], weights)
        assert isinstance(average, PointerTensor)  # ops on pointers return pointers
        futures.append(fetch_nowait(average))
    return keys, futures
