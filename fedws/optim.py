"""``sy.optim.Optims``: one optimizer per worker, as PySyft 0.2 had it.

An optimizer with state (Adam's moments, Adagrad's sums) keeps it per parameter. When one
model visits several workers in turn (PySyft's Part 02), each worker's data should shape
its own state: ``Optims`` copies the given optimizer once per worker, and
``optims.get_optim(data.location.id)`` picks the copy for the worker the model is on. Every
copy's state lives on its worker, next to the parameters it updates (state tensors are
pointers; see :mod:`fedws.pointers.compat`).

Example:
    >>> optims = sy.optim.Optims(["bob", "alice"], optim=optim.Adam(model.parameters(), lr=0.1))
    >>> opt = optims.get_optim(data.location.id)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Generic, TypeVar

import torch

from .client.worker import Worker

__all__ = ["Optims"]

OptimizerT = TypeVar("OptimizerT", bound=torch.optim.Optimizer)


def _worker_id(worker: str | Worker) -> str:
    return worker.id if isinstance(worker, Worker) else str(worker)


class Optims(Generic[OptimizerT]):
    """One copy of ``optim`` per worker, each with state of its own.

    Args:
        workers: worker ids (or workers) to keep an optimizer for.
        optim: the optimizer to copy; its hyperparameters and current state are each
            copy's starting point. It is not used for stepping itself.

    Attributes:
        optim: the optimizer given.
        workers: the worker ids, in order.
        optimizers: worker id -> its optimizer.
    """

    def __init__(self, workers: Iterable[str | Worker], optim: OptimizerT) -> None:
        self.optim = optim
        self.workers = [_worker_id(w) for w in workers]
        self.optimizers: dict[str, OptimizerT] = {}
        for worker_id in self.workers:
            twin = copy.copy(optim)
            # A state dict of its own: copies must not update each other's state in place.
            twin.load_state_dict(copy.deepcopy(optim.state_dict()))
            self.optimizers[worker_id] = twin

    def get_optim(self, worker: str | Worker) -> OptimizerT:
        """The optimizer for ``worker`` (an id, as in ``data.location.id``, or the worker).

        Raises:
            KeyError: ``worker`` was not among the workers given.
        """
        worker_id = _worker_id(worker)
        try:
            return self.optimizers[worker_id]
        except KeyError:
            raise KeyError(f"no optimizer for worker {worker_id!r}; Optims has {self.workers}") from None

    def count(self) -> int:
        """How many optimizers (one per worker)."""
        return len(self.workers)

    def __repr__(self) -> str:
        return f"<Optims {type(self.optim).__name__} workers={self.workers}>"
