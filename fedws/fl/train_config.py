"""``sy.TrainConfig``: PySyft's bundle of model, loss and optimizer for training on a node.

As in PySyft's parallel websockets example::

    train_config = sy.TrainConfig(model=model, loss_fn=loss_fn, batch_size=32, epochs=1,
                                  optimizer="SGD", optimizer_args={"lr": 0.1})
    train_config.send(worker)
    loss = await worker.async_fit(dataset_key="mnist")
    model = train_config.model_ptr.get()

What runs on the node is the user's (or the default) training step traced into one plan
(:mod:`fedws.fl.train_step`), one message per minibatch. :func:`local_step` turns the same
keywords into the :class:`LocalStep` that :class:`~fedws.fl.FedAvg` takes.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..exceptions import PlanError
from .local_training import TrainingPlans
from .train_step import (
    LocalStep,
    LossFn,
    OptimizerLike,
    OptimizerSpec,
    SchedulerFactory,
    StepFn,
    default_train_step,
)

if TYPE_CHECKING:
    from ..client.worker import Worker

__all__ = ["TrainConfig", "ModelPointer", "local_step", "config_sent_to"]


def local_step(
    *,
    loss_fn: LossFn = F.cross_entropy,
    train_step: StepFn | None = None,
    optimizer: OptimizerLike | None = None,
    optimizer_args: Mapping[str, Any] | None = None,
    lr_scheduler: SchedulerFactory | None = None,
    max_grad_norm: float | None = None,
    scheduler_step: str = "epoch",
    default_lr: float | None = None,
    default_momentum: float = 0.0,
) -> LocalStep:
    """A :class:`LocalStep` from the keywords users write.

    Without ``optimizer``: SGD with ``default_lr`` and ``default_momentum`` (FedAvgConfig's).
    Without ``train_step``: zero grads, ``loss_fn(model(x), y)``, backward, step.
    """
    args = dict(optimizer_args or {})
    if optimizer is None:
        optimizer = "SGD"
        args.setdefault("momentum", default_momentum)
    spec = OptimizerSpec.of(optimizer, args, lr=default_lr)
    return LocalStep(
        train_step or default_train_step(loss_fn), spec, max_grad_norm, lr_scheduler, scheduler_step
    )


class ModelPointer:
    """The model a :class:`TrainConfig` trains on one worker; :meth:`get` brings it back."""

    def __init__(self, config: TrainConfig, worker: Worker) -> None:
        self.config = config
        self.location = worker
        self.trained: nn.Module | None = None
        self.fits = 0  # seeds each fit's minibatch order

    def get(self) -> nn.Module:
        """The model after the last ``fit`` on this worker (the sent model if none ran yet)."""
        return self.trained if self.trained is not None else copy.deepcopy(self.config.model)

    def __repr__(self) -> str:
        return f"<ModelPointer {type(self.config.model).__name__} -> {self.location.id}>"


class TrainConfig:
    """How to train a model on a node: PySyft's ``TrainConfig``, run as a fedws plan.

    Args:
        model: the ``nn.Module`` to train (a local model; a copy is trained on each node).
        loss_fn: ``loss_fn(output, target)`` for the default step.
        batch_size, epochs: local minibatch size and passes over the node's dataset per fit.
        optimizer: ``"SGD"``, ``"Adam"``, ``"AdamW"``, a ``torch.optim`` class, or a factory
            ``lambda params: torch.optim.AdamW(params, lr=1e-3)``.
        optimizer_args: its keyword arguments (``{"lr": 0.1}``).
        lr_scheduler: ``lambda opt: StepLR(opt, step_size=1, gamma=0.5)``, stepped per epoch
            (``scheduler_step="batch"``: per minibatch); restarted every fit.
        max_grad_norm: clip the gradients' global L2 norm before each update.
        train_step: your own ``train_step(model, optimizer, x, y) -> loss`` (see
            :mod:`fedws.fl.train_step` for what it may do).
        shuffle: shuffle the minibatches (seeded by ``seed`` and the fit's count).
        max_nr_batches: stop each epoch after this many minibatches (-1: the whole dataset).
        keep_optimizer_state: keep the optimizer state on the node from one fit to the next.
        seed: seeds the minibatch order.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn = F.cross_entropy,
        batch_size: int = 32,
        epochs: int = 1,
        optimizer: OptimizerLike | None = "SGD",
        optimizer_args: Mapping[str, Any] | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        max_grad_norm: float | None = None,
        train_step: StepFn | None = None,
        shuffle: bool = True,
        max_nr_batches: int = -1,
        keep_optimizer_state: bool = False,
        scheduler_step: str = "epoch",
        seed: int = 0,
    ) -> None:
        if batch_size < 1 or epochs < 1:
            raise ValueError("batch_size and epochs must be >= 1")
        if isinstance(model, torch.jit.ScriptModule):
            raise PlanError(
                "TrainConfig needs the nn.Module itself, not a TorchScript module (torch.jit.trace/"
                "script of it): fedws traces the module's Python forward into a plan, and a "
                "TorchScript module has none to trace"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        self.epochs = epochs
        self.shuffle = shuffle
        self.max_nr_batches = max_nr_batches
        self.keep_optimizer_state = keep_optimizer_state
        self.seed = seed
        self.step = local_step(
            loss_fn=loss_fn, train_step=train_step, optimizer=optimizer,
            optimizer_args=optimizer_args if optimizer_args is not None else {"lr": 0.1},
            lr_scheduler=lr_scheduler, max_grad_norm=max_grad_norm, scheduler_step=scheduler_step,
        )
        self.model_ptr: ModelPointer | None = None
        self.plans = TrainingPlans()  # the traced step, where it was sent, kept optimizer state
        self._pointers: dict[str, ModelPointer] = {}

    def send(self, worker: Worker) -> TrainConfig:
        """Make this the config ``worker.fit(...)`` trains with; returns self.

        Nothing travels yet: the model and the traced step go with the first fit, when the
        node's dataset (and so the step's input shapes) is known.
        """
        ptr = ModelPointer(self, worker)
        self._pointers[worker.id] = ptr
        self.model_ptr = ptr
        _SENT[worker] = self
        return self

    def pointer_for(self, worker: Worker) -> ModelPointer:
        ptr = self._pointers.get(worker.id)
        if ptr is None or ptr.location is not worker:
            raise ValueError(f"this TrainConfig was not sent to {worker.id!r}: call train_config.send(worker)")
        return ptr

    def __repr__(self) -> str:
        return (
            f"<TrainConfig {type(self.model).__name__} {self.step.optimizer.kind} "
            f"batch_size={self.batch_size} epochs={self.epochs}>"
        )


_SENT: weakref.WeakKeyDictionary[Any, TrainConfig] = weakref.WeakKeyDictionary()


def config_sent_to(worker: Worker) -> TrainConfig:
    """The TrainConfig last sent to ``worker``.

    Raises:
        ValueError: none was.
    """
    config = _SENT.get(worker)
    if config is None:
        raise ValueError(f"no TrainConfig was sent to {worker.id!r}: call train_config.send(worker) first")
    return config
