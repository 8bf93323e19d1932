"""The ring of secret shares, Z/2^64, as int64 tensors; and gathering shares back.

Arithmetic in the ring is torch's int64 arithmetic: addition, subtraction and
multiplication wrap around (two's complement), which is reduction modulo 2^64. A share
drawn uniformly over all 2^64 values tells nothing about the secret it helps hide.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from ..pointers import PointerTensor, make_pointer
from ..protocol.ids import new_id
from ..protocol.messages import Kind
from ..transport.io_thread import wait

if TYPE_CHECKING:
    from ..client.worker import Worker

__all__ = ["random_ring", "split_local", "gather", "send_value", "remote_results", "move_all"]


def random_ring(shape: Sequence[int]) -> torch.Tensor:
    """int64 values uniform over the ring, from the OS CSPRNG (``secrets``), not torch's RNG."""
    n = math.prod(shape)
    if n == 0:
        return torch.zeros(tuple(shape), dtype=torch.int64)
    return torch.frombuffer(bytearray(secrets.token_bytes(8 * n)), dtype=torch.int64).reshape(tuple(shape))


def split_local(secret: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``n`` additive shares of a local int64 tensor: ``n - 1`` uniform, one the difference."""
    shares = [random_ring(secret.shape) for _ in range(n - 1)]
    last = secret.detach().clone()
    for s in shares:
        last.sub_(s)
    shares.append(last)
    return shares


def gather(ptrs: Sequence[PointerTensor]) -> list[torch.Tensor]:
    """Get every pointer's value (and free it remotely), all requests out before waiting."""
    pending: list[tuple[PointerTensor, Future[Any]]] = []
    for p in ptrs:
        p.check_live()
        _, fut = p.location.submit(Kind.GET, p.id_at_location, True, want_value=True)
        assert fut is not None
        pending.append((p, fut))
    out = []
    for p, fut in pending:
        value = wait(fut, p.location.call_timeout(), f"get of a share on worker {p.location.id!r}")
        p.finish_get(value)
        out.append(value)
    return out


def send_value(value: torch.Tensor, worker: Worker) -> PointerTensor:
    """Store ``value`` on ``worker`` (a share drawn here, an opened mask, a public operand)."""
    remote_id = new_id()
    seq = worker.store(value, obj_id=remote_id)
    return make_pointer(
        worker, remote_id, shape=tuple(value.shape), dtype=value.dtype, requires_grad=False,
        owner=worker.owner, id=new_id(), seq=seq,
    )


def remote_results(
    worker: Worker, op: str, args: list[Any], shapes: Sequence[Sequence[int]], owner: Worker
) -> list[PointerTensor]:
    """Run the node command ``op`` on ``worker``, one int64 result per shape; their pointers."""
    ids = [new_id() for _ in shapes]
    seq, _ = worker.submit(Kind.CMD, op, args, {}, ids)
    return [
        make_pointer(worker, i, shape=tuple(shape), dtype=torch.int64, requires_grad=False, owner=owner, seq=seq)
        for i, shape in zip(ids, shapes)
    ]


def move_all(ptrs: Sequence[PointerTensor], targets: Sequence[Worker]) -> list[PointerTensor]:
    """``[p.move(w) for p, w in ...]`` with one round trip to the source, not one per pointer.

    ``PointerTensor.send`` lets the source share the object and waits for that before the
    target follows the pointer; here every share command goes out first and the last one's
    acknowledgement covers them all (a node runs one connection's commands in order). Then,
    as ``send`` does, each target stores a pointer that owns the object and pulls the data.
    """
    by_source: dict[int, PointerTensor] = {}
    for p, w in zip(ptrs, targets):
        p.check_live()
        if w is not p.location:
            p.seq, _ = p.location.submit(Kind.CMD, "fedws.share", [p.id_at_location], {}, [])
            by_source[id(p.location)] = p
    for last in by_source.values():
        last.wait()
    out = []
    for p, w in zip(ptrs, targets):
        if w is p.location:
            out.append(p)
            continue
        seq = w.store(p, obj_id=p.id)
        p.ownership.active = False  # the pointer on `w` owns the data now
        q = make_pointer(w, p.id, shape=tuple(p.shape), dtype=torch.int64, requires_grad=False,
                         owner=p.owner, seq=seq, id=new_id())
        out.append(q.remote_get())
    return out
