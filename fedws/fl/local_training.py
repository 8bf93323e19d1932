"""One node's share of a round: find its data, train a copy of the model there.

Training uses the course's recipe: send a copy of the global model to the node and run
SGD there on pointers. Each minibatch step is one call of a training-step plan (forward,
loss, backward, SGD update with momentum, zeroed grads), so one RUN_PLAN message per
step. The plan is traced once per model architecture and loss (:class:`TrainingPlans`)
and stored on each node once; what travels every round is the current parameters and,
with every step, the indices of its minibatch. Every request is non-blocking, so
:func:`start_local_training` returns as soon as the whole local program is queued; the
coordinator starts every node's program before waiting on any of them.

The data never moves: the features and labels are found on the node by tags and only
pointers to them are used. What comes back is the trained parameters (or, with a trusted
aggregator, nothing but the summed loss).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import zlib
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..client.worker import Worker
from ..exceptions import ObjectNotFoundError
from ..plans import Plan, PointerPlan
from ..pointers import PointerTensor
from .config import FedAvgConfig
from .remote import barrier_nowait, fetch_nowait, mark, search_nowait
from .train_step import (
    LocalStep,
    OptimizerSpec,
    build_step_plan,
    default_train_step,
    example_batch,
    lr_schedule,
    new_state,
    param_dtype,
)

__all__ = [
    "NodeData",
    "LocalRun",
    "TrainingPlans",
    "build_training_plan",
    "training_plan_digest",
    "find_data",
    "data_from_search",
    "start_local_training",
    "step_plan_digest",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class NodeData:
    """Where one node's training shard is: non-owning pointers and its size."""

    worker: Worker
    x: PointerTensor
    y: PointerTensor
    num_examples: int


def find_data(worker: Worker, config: FedAvgConfig) -> tuple[Future[list[PointerTensor]], Future[list[PointerTensor]]]:
    """Start searching ``worker`` for its features and labels (see :func:`data_from_search`)."""
    tags = list(config.data_tags)
    return (
        search_nowait(worker, [*tags, config.x_tag]),
        search_nowait(worker, [*tags, config.y_tag]),
    )


def data_from_search(worker: Worker, config: FedAvgConfig, xs: list[PointerTensor], ys: list[PointerTensor]) -> NodeData:
    """Check the search results name exactly one features and one labels tensor.

    Raises:
        ObjectNotFoundError: a tensor is missing, ambiguous, or the two disagree in length.
    """
    tags = " ".join(config.data_tags)
    for found, tag in ((xs, config.x_tag), (ys, config.y_tag)):
        if len(found) != 1:
            raise ObjectNotFoundError(
                f"worker {worker.id!r} holds {len(found)} tensors tagged {tags} {tag}, expected exactly 1",
                worker=worker.id,
            )
    x, y = xs[0], ys[0]
    n = x.shape[0] if x.dim() else 0
    if y.dim() == 0 or y.shape[0] != n:
        raise ObjectNotFoundError(
            f"worker {worker.id!r}: features have {n} rows but labels have shape {tuple(y.shape)}",
            worker=worker.id,
        )
    if n == 0:
        raise ObjectNotFoundError(f"worker {worker.id!r}: the training shard is empty", worker=worker.id)
    return NodeData(worker, x, y, int(n))


@dataclass
class LocalRun:
    """A node's local training, queued. Its futures say when and how it ended.

    Attributes:
        data: the node and its shard.
        model: the model copy that lives on the node (its parameters are pointers).
        start_seq: first request of the run, for :func:`first_error`.
        end_seq: the barrier that closes the run.
        futures: the barrier, the summed loss, then one per state entry if fetched.
        examples_seen: examples the run trains on (all its epochs).
        state_keys: the state dict keys, in the order of the fetch futures.
        step_losses: each step's batch loss (pointers, never fetched). Kept with the run so
            that they are freed together afterwards, in one batched delete, instead of one
            delete riding along with every step.
    """

    data: NodeData
    model: nn.Module
    start_seq: int
    end_seq: int
    futures: list[Future[Any]]
    examples_seen: int
    state_keys: list[str] = field(default_factory=list)
    step_losses: list[Any] = field(default_factory=list)
    loss_sum: Any = None

    @property
    def node_id(self) -> str:
        return self.data.worker.id


def _batch_generator(seed: int, round_number: int, node_id: str) -> torch.Generator:
    # crc32, not hash(): str hashes change between processes, and resuming must not.
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{round_number}:{node_id}".encode()))


def build_training_plan(
    model: nn.Module,
    loss_fn: LossFn,
    *,
    lr: float,
    momentum: float,
    x_like: tuple[tuple[int, ...], torch.dtype],
    y_like: tuple[tuple[int, ...], torch.dtype],
) -> Plan:
    """Trace one SGD step of ``model`` as a plan.

    The plan is called as ``step(x, y, idx, loss_sum, params, buffers, velocity)``: the
    node's whole shard ``x``/``y``, the minibatch's row indices ``idx``, a 0-dim running
    loss total, ``list(model.parameters())``, ``list(model.buffers())`` and, with momentum,
    one velocity buffer per trainable parameter (zeros at the start, as the first step of
    ``torch.optim.SGD`` makes them). It updates the parameters, velocities, buffers and
    ``loss_sum`` in place, leaves every grad None, and returns the batch's loss sum.

    The update is ``torch.optim.SGD``'s (no dampening, weight decay or Nesterov). A
    parameter the loss does not reach has no grad when the plan is traced and is left
    alone, as SGD skips it.

    Args:
        model: the architecture; traced on a copy, so it is not changed.
        loss_fn: ``loss_fn(output, target)``, from allowlisted ops.
        lr, momentum: baked into the plan.
        x_like, y_like: ``(shape of one row, dtype)`` of the features and labels.
    """
    net = copy.deepcopy(model)
    params = list(net.parameters())
    for p in params:
        p.grad = None
    trainable = [p for p in params if p.requires_grad]
    slot = {id(p): i for i, p in enumerate(trainable)}

    def train_step(
        x: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        loss_sum: torch.Tensor,
        params: list[torch.Tensor],
        buffers: list[torch.Tensor],
        velocity: list[torch.Tensor],
    ) -> torch.Tensor:
        # ``params`` and ``buffers`` are ``net``'s own tensors while tracing: net(...) reads them.
        loss = loss_fn(net(x[idx]), y[idx])
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves backward untyped
        with torch.no_grad():
            for p in trainable:
                step = p.grad
                if step is None:  # the loss does not use it (fixed for this architecture)
                    continue
                if momentum:
                    buf = velocity[slot[id(p)]]
                    buf.mul_(momentum).add_(step)
                    step = buf
                p.add_(step, alpha=-lr)
                p.grad = None
            batch = loss.detach() * idx.shape[0]
            loss_sum.add_(batch)
        return batch

    dtype = param_dtype(params)
    example = (
        *example_batch(x_like, y_like),
        torch.zeros((), dtype=dtype),
        params,
        list(net.buffers()),
        [torch.zeros_like(p) for p in trainable] if momentum else [],
    )
    plan = Plan(train_step, name="train_step")
    plan.build(*example)
    return plan


def training_plan_digest(
    model: nn.Module,
    config: FedAvgConfig,
    *,
    x_like: tuple[tuple[int, ...], torch.dtype],
    y_like: tuple[tuple[int, ...], torch.dtype],
    loss_fn: LossFn | None = None,
) -> str:
    """The digest a private node must approve for FedAvg to train ``model`` on it.

    A node in the private policy releases what a plan computes only if the plan's digest is
    in its config (``[release] approved_plans``). FedAvg needs exactly one plan per model
    architecture, loss, learning rate, momentum and data signature: the training step. Its
    outputs (each step's batch loss) and what it updates in place (parameters, buffers,
    velocities, the running loss total) are all that FedAvg fetches, so approving this one
    digest is all a node operator has to allow.

    Args:
        model: the architecture (its values do not matter: they are the plan's arguments).
        config: ``lr`` and ``momentum`` are baked into the plan.
        x_like, y_like: ``(shape of one row, dtype)`` of the node's features and labels.
        loss_fn: the loss FedAvg is given (default cross-entropy).
    """
    import torch.nn.functional as F

    plan = build_training_plan(
        model, loss_fn or F.cross_entropy, lr=config.lr, momentum=config.momentum, x_like=x_like, y_like=y_like
    )
    return plan.signature.code.digest(plan.state_tensors)


def step_plan_digest(
    model: nn.Module,
    step: LocalStep,
    *,
    x_like: tuple[tuple[int, ...], torch.dtype],
    y_like: tuple[tuple[int, ...], torch.dtype],
    proximal: bool = False,
) -> str:
    """The digest a private node must approve to run your own training step (``fedws plan approve``).

    The lr and the FedProx mu are arguments of the plan, so one digest covers every
    schedule; the optimizer's other hyperparameters, clipping and ``proximal`` (a round
    config with ``proximal_mu`` > 0) are baked in.
    """
    plan = build_step_plan(model, step, x_like=x_like, y_like=y_like, proximal=proximal)
    return plan.signature.code.digest(plan.state_tensors)


class TrainingPlans:
    """The training-step plans of a federated run, and where they have been sent.

    A plan is traced once per model architecture, loss function, learning rate, momentum
    and data signature, and stored on each node once; the node keeps it across rounds
    until :meth:`forget` (a dropped node gets it again when it comes back).
    """

    def __init__(self) -> None:
        self._built: dict[Hashable, Plan] = {}
        self._sent: dict[str, tuple[Hashable, PointerPlan]] = {}
        # Optimizer state kept on each node between rounds (keep_optimizer_state): key, pointers.
        self.optimizer_state: dict[str, tuple[Hashable, list[Any]]] = {}

    def for_node(
        self,
        model: nn.Module,
        data: NodeData,
        config: FedAvgConfig,
        loss_fn: LossFn | None,
        step: LocalStep | None = None,
        proximal: bool = False,
    ) -> PointerPlan:
        """The plan for training ``model`` on ``data``, on its node (sent if it is not yet there).

        ``step`` None: the built-in SGD step; else the user's step (``proximal``: with the FedProx term).
        """
        x_like = (tuple(data.x.shape[1:]), data.x.dtype)
        y_like = (tuple(data.y.shape[1:]), data.y.dtype)
        if step is None:
            key: Hashable = (_architecture(model), loss_fn, config.lr, config.momentum, x_like, y_like)
        else:
            key = (_architecture(model), step.key(), proximal, x_like, y_like)
        worker = data.worker
        sent = self._sent.get(worker.id)
        if sent is not None and sent[0] == key and sent[1].location is worker:
            return sent[1]
        plan = self._built.get(key)
        if plan is None:
            if step is None:
                assert loss_fn is not None, "the built-in step needs a loss"
                plan = build_training_plan(
                    model, loss_fn, lr=config.lr, momentum=config.momentum, x_like=x_like, y_like=y_like
                )
            else:
                plan = build_step_plan(model, step, x_like=x_like, y_like=y_like, proximal=proximal)
            self._built[key] = plan
        pointer = plan.send(worker)
        self._sent[worker.id] = (key, pointer)
        self._prune()
        return pointer

    def forget(self, worker_id: str) -> None:
        """Send the plan to ``worker_id`` again next time (it was dropped from a round)."""
        self._sent.pop(worker_id, None)
        self.optimizer_state.pop(worker_id, None)
        self._prune()

    def _prune(self) -> None:
        # A plan no node uses any more goes, and with it its copies on the nodes.
        used = {key for key, _ in self._sent.values()}
        for key in [k for k in self._built if k not in used]:
            del self._built[key]


def _architecture(model: nn.Module) -> Hashable:
    """What a traced step depends on: module types and modes, every parameter's and buffer's spec."""
    modules = tuple((name, type(m), m.training) for name, m in model.named_modules())
    tensors = tuple(
        (name, tuple(t.shape), t.dtype, t.requires_grad)
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
    )
    return modules, tensors


def copy_for_node(model: nn.Module) -> nn.Module:
    """A copy of ``model`` to send to one node: fresh parameters and buffers (sending turns
    them into pointers), fresh module objects and their parameter/buffer/child dicts.

    Cheaper than ``copy.deepcopy`` (a third of a round's coordinator time at 1,000 tiny
    nodes), which also rebuilds every attribute: here the other attributes (hyper-
    parameters, hook dicts) are shared with ``model``. That is safe because the copy is
    only a holder of pointers for one round: it is sent, its state fetched or moved, and
    dropped; its ``forward`` never runs here. Tied parameters and shared submodules stay
    tied and shared, as with deepcopy.
    """
    memo: dict[int, Any] = {}

    def tensor(t: torch.Tensor) -> torch.Tensor:
        got = memo.get(id(t))
        if got is None:
            got = memo[id(t)] = copy.deepcopy(t)  # a Parameter stays a Parameter (and its subclass)
        return got

    def module(m: nn.Module) -> nn.Module:
        got = memo.get(id(m))
        if got is not None:
            return got  # type: ignore[no-any-return]
        new = object.__new__(type(m))
        memo[id(m)] = new
        attrs = m.__dict__.copy()
        attrs["_parameters"] = {k: None if p is None else tensor(p) for k, p in m._parameters.items()}
        attrs["_buffers"] = {k: None if b is None else tensor(b) for k, b in m._buffers.items()}
        attrs["_modules"] = {k: None if c is None else module(c) for k, c in m._modules.items()}
        new.__dict__.update(attrs)
        return new

    return module(model)


def finish_run(
    worker: Worker, model: nn.Module, loss_sum: PointerTensor, fetch_state: bool
) -> tuple[int, list[Future[Any]], list[str]]:
    """End a queued local run: its barrier, the fetch of its loss sum and (``fetch_state``)
    of the trained state, all sent with the run's steps in one flush (one frame per node).

    Returns the barrier's sequence number, the futures (barrier first, then the loss sum,
    then the state entries) and the state keys in fetch order.
    """
    end, done = barrier_nowait(worker, urgent=False)
    futures = [done, fetch_nowait(loss_sum, urgent=False)]
    keys: list[str] = []
    if fetch_state:
        for key, ptr in model.state_dict(keep_vars=True).items():
            keys.append(key)
            futures.append(fetch_nowait(ptr, urgent=False))
    worker.flush()
    return end, futures, keys


def start_local_training(
    global_model: nn.Module,
    data: NodeData,
    config: FedAvgConfig,
    *,
    round_number: int,
    loss_fn: LossFn,
    fetch_state: bool,
    plans: TrainingPlans | None = None,
    step: LocalStep | None = None,
    round_config: Mapping[str, Any] | None = None,
) -> LocalRun:
    """Queue ``config.local_epochs`` of SGD on the node; return without waiting.

    Sends the current parameters, then one training-step plan call per minibatch.

    Args:
        global_model: the current global model (local); a copy of it is sent.
        data: the node's shard.
        config: epochs, batch size, learning rate, momentum, seed.
        round_number: with the seed, fixes the order of the minibatches.
        loss_fn: ``loss_fn(output, target)``, built from allowlisted torch ops.
        fetch_state: also queue fetches of the trained parameters (the plain coordinator
            aggregation); False when a trusted aggregator collects them instead.
        plans: the run's plan cache; None builds and sends a plan for this call only.
        step: the user's training step (optimizer, schedule, clipping); None: the built-in
            SGD step (unless the round config or ``keep_optimizer_state`` needs the general one).
        round_config: this node's config for the round: ``"lr"`` replaces the learning rate,
            ``"proximal_mu"`` > 0 adds FedProx's ``mu/2 * ||w - w_global||^2`` to the loss.
    """
    rc = dict(round_config or {})
    mu = float(rc.get("proximal_mu", 0.0) or 0.0)
    if step is None and (mu > 0 or config.keep_optimizer_state):
        spec = OptimizerSpec.of("SGD", {"lr": config.lr, "momentum": config.momentum})
        step = LocalStep(default_train_step(loss_fn), spec)
    if step is not None:
        return _start_step_training(
            global_model, data, config, step, round_number=round_number, fetch_state=fetch_state,
            plans=plans or TrainingPlans(), lr=float(rc.get("lr", step.optimizer.lr)), mu=mu,
        )
    if "lr" in rc:
        config = dataclasses.replace(config, lr=float(rc["lr"]))
    worker, n = data.worker, data.num_examples
    # The run's first request opens its error range (no separate ping: one message per
    # node per round less, which is most of what a round costs at 1,000 tiny nodes).
    dtype = param_dtype(list(global_model.parameters()))
    loss_sum = torch.zeros((), dtype=dtype).send(worker)  # type: ignore[attr-defined]  # installed by the hook
    start = loss_sum.seq
    sgd_step = (plans or TrainingPlans()).for_node(global_model, data, config, loss_fn)
    model = copy_for_node(global_model)
    model.send(worker)  # type: ignore[operator]  # Module.send is installed by the hook
    params = list(model.parameters())
    buffers = list(model.buffers())
    # torch ops on pointers return pointers (typed as the torch.Tensor the stubs give).
    velocity = [torch.zeros_like(p) for p in params if p.requires_grad] if config.momentum else []
    gen = _batch_generator(config.seed, round_number, worker.id)
    step_losses = []
    for _epoch in range(config.local_epochs):
        order = torch.randperm(n, generator=gen)
        for lo in range(0, n, config.batch_size):
            # The indices travel inline with the call: one message per step.
            idx = order[lo : lo + config.batch_size]
            step_losses.append(sgd_step(data.x, data.y, idx, loss_sum, params, buffers, velocity))
    end, futures, keys = finish_run(worker, model, loss_sum, fetch_state)
    return LocalRun(data, model, start, end, futures, n * config.local_epochs, keys, step_losses)


def _start_step_training(
    global_model: nn.Module,
    data: NodeData,
    config: FedAvgConfig,
    step: LocalStep,
    *,
    round_number: int,
    fetch_state: bool,
    plans: TrainingPlans,
    lr: float,
    mu: float,
    shuffle: bool = True,
    max_batches: int | None = None,
) -> LocalRun:
    """:func:`start_local_training` with the user's step: lr per step, optimizer state, FedProx.

    ``max_batches`` stops each epoch after that many minibatches (PySyft's ``max_nr_batches``).
    """
    worker, n = data.worker, data.num_examples
    start = mark(worker)  # the user's step: a ping is cheap beside its plan calls
    proximal = mu > 0
    step_plan = plans.for_node(global_model, data, config, None, step, proximal)
    model = copy_for_node(global_model)
    model.send(worker)  # type: ignore[operator]  # Module.send is installed by the hook
    params = list(model.parameters())
    buffers = list(model.buffers())
    trainable = [p for p in params if p.requires_grad]
    dtype = param_dtype(params)
    opt_state = optimizer_state_on(worker, trainable, step, dtype, plans, keep=config.keep_optimizer_state)
    anchor = [p.detach().clone() for p in trainable] if proximal else []
    loss_sum = torch.zeros((), dtype=dtype).send(worker)  # type: ignore[attr-defined]  # installed by the hook
    mu_t = torch.tensor(mu, dtype=dtype)
    batches = -(-n // config.batch_size)
    if max_batches is not None and max_batches > 0:
        batches = min(batches, max_batches)
    lrs = lr_schedule(step, lr, config.local_epochs, batches)
    gen = _batch_generator(config.seed, round_number, worker.id)
    step_losses: list[Any] = []
    i = seen = 0
    for _epoch in range(config.local_epochs):
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        for b in range(batches):
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            seen += int(idx.shape[0])
            lr_t = torch.tensor(lrs[i], dtype=dtype)
            i += 1
            step_losses.append(step_plan(data.x, data.y, idx, lr_t, mu_t, loss_sum, params, buffers, opt_state, anchor))
    step_losses.extend(anchor)
    end, futures, keys = finish_run(worker, model, loss_sum, fetch_state)
    return LocalRun(data, model, start, end, futures, seen, keys, step_losses, loss_sum)


def optimizer_state_on(
    worker: Worker,
    trainable: list[Any],
    step: LocalStep,
    dtype: torch.dtype,
    plans: TrainingPlans,
    *,
    keep: bool,
) -> list[Any]:
    """The optimizer state on ``worker``: the one kept from the last round, or fresh zeros there."""
    key = (step.optimizer.kind, step.optimizer.hyper, tuple((tuple(p.shape), p.dtype) for p in trainable))
    kept = plans.optimizer_state.get(worker.id)
    if keep and kept is not None and kept[0] == key:
        return kept[1]
    fresh = new_state(trainable, step.optimizer, dtype)  # zeros_like of pointers: made on the node
    fresh[0] = fresh[0].send(worker)  # type: ignore[attr-defined]  # installed by the hook
    if keep:
        plans.optimizer_state[worker.id] = (key, fresh)
    return fresh
