"""One node's share of a round: find its data, train a copy of the model there.

Training uses the course's recipe: send a copy of the global model to the node, run the
forward and backward passes on pointers, and step its (remote) parameters with SGD. Every
step is a non-blocking command,
so :func:`start_local_training` returns as soon as the whole local program is queued; the
coordinator starts every node's program before waiting on any of them.

The data never moves: the features and labels are found on the node by tags and only
pointers to them are used. What comes back is the trained parameters (or, with a trusted
aggregator, nothing but the summed loss).
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ..client.worker import Worker
from ..exceptions import ObjectNotFoundError
from ..pointers import PointerTensor
from . import remote
from .config import FedAvgConfig

__all__ = ["NodeData", "LocalRun", "find_data", "data_from_search", "start_local_training"]

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
        remote.search_nowait(worker, [*tags, config.x_tag]),
        remote.search_nowait(worker, [*tags, config.y_tag]),
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
        start_seq: first request of the run, for :func:`remote.first_error`.
        end_seq: the barrier that closes the run.
        futures: the barrier, the summed loss, then one per state entry if fetched.
        state_keys: the state dict keys, in the order of the fetch futures.
    """

    data: NodeData
    model: nn.Module
    start_seq: int
    end_seq: int
    futures: list[Future[Any]]
    examples_seen: int
    state_keys: list[str] = field(default_factory=list)

    @property
    def node_id(self) -> str:
        return self.data.worker.id


def _batch_generator(seed: int, round_number: int, node_id: str) -> torch.Generator:
    # crc32, not hash(): str hashes change between processes, and resuming must not.
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{round_number}:{node_id}".encode()))


def _sgd_step(
    params: Sequence[torch.Tensor], velocity: list[torch.Tensor | None], lr: float, momentum: float
) -> None:
    """``torch.optim.SGD.step`` written for remote parameters.

    The optimizer updates parameters in place under ``torch.no_grad()``; a node in
    another process refuses that in-place update of a leaf unless the command carries the
    coordinator's grad mode (it did not when this was written). Updating ``param.data``
    is the same arithmetic and valid in any grad mode, on any node version.
    """
    for i, p in enumerate(params):
        # Grads exist on the node: the caller gives every parameter a zero grad first.
        step = cast(torch.Tensor, p.grad)
        if momentum:
            buf = velocity[i]
            step = step if buf is None else buf * momentum + step
            velocity[i] = step
        p.data.add_(step, alpha=-lr)


def start_local_training(
    global_model: nn.Module,
    data: NodeData,
    config: FedAvgConfig,
    *,
    round_number: int,
    loss_fn: LossFn,
    fetch_state: bool,
) -> LocalRun:
    """Queue ``config.local_epochs`` of SGD on the node; return without waiting.

    Args:
        global_model: the current global model (local); a copy of it is sent.
        data: the node's shard.
        config: epochs, batch size, learning rate, seed.
        round_number: with the seed, fixes the order of the minibatches.
        loss_fn: ``loss_fn(output, target)``, built from allowlisted torch ops.
        fetch_state: also queue fetches of the trained parameters (the plain coordinator
            aggregation); False when a trusted aggregator collects them instead.
    """
    worker, n = data.worker, data.num_examples
    start = remote.mark(worker)
    model = copy.deepcopy(global_model)
    model.send(worker)  # type: ignore[operator]  # Module.send is installed by the hook
    params = [p for p in model.parameters() if p.requires_grad]
    # The velocities and the loss are pointers (torch ops on pointers return pointers),
    # typed as the torch.Tensor the stubs give for those ops.
    velocity: list[torch.Tensor | None] = [None] * len(params)
    gen = _batch_generator(config.seed, round_number, worker.id)
    loss_sum: torch.Tensor | None = None
    # Every parameter gets a zero grad that each step zeroes in place (not None): one the
    # loss does not use then steps by zero, as torch.optim.SGD skips it, instead of failing.
    for p in params:
        p.grad = torch.zeros_like(p)
    for _epoch in range(config.local_epochs):
        order = torch.randperm(n, generator=gen).send(worker)  # type: ignore[attr-defined]  # installed by the hook
        xs, ys = data.x[order], data.y[order]
        for lo in range(0, n, config.batch_size):
            hi = min(n, lo + config.batch_size)
            for p in params:
                cast(torch.Tensor, p.grad).zero_()
            loss = loss_fn(model(xs[lo:hi]), ys[lo:hi])
            loss.backward()
            _sgd_step(params, velocity, config.lr, config.momentum)
            batch_loss = loss.detach() * (hi - lo)
            loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
    assert loss_sum is not None, "a node with 0 examples cannot train"
    end, done = remote.barrier_nowait(worker)
    futures = [done, remote.fetch_nowait(cast(PointerTensor, loss_sum))]
    keys: list[str] = []
    if fetch_state:
        for key, ptr in model.state_dict(keep_vars=True).items():
            keys.append(key)
            futures.append(remote.fetch_nowait(ptr))
    return LocalRun(data, model, start, end, futures, n * config.local_epochs, keys)
