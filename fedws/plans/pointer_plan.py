"""PointerPlan: a plan stored on a worker; calling it sends one RUN_PLAN message."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..exceptions import LocationError
from ..pointers import (
    MultiPointerTensor,
    Ownership,
    PointerTensor,
    RemoteResult,
    make_pointer,
    take_result_ids,
)
from ..protocol.codec import ObjRef
from ..protocol.ids import new_id
from ..protocol.messages import Kind
from ..protocol.tree import tree_map
from .signature import PlanSignature

if TYPE_CHECKING:
    from ..client.worker import Worker

__all__ = ["PointerPlan", "MultiPointerPlan", "send_plan"]


def send_plan(signature: PlanSignature, state: Sequence[torch.Tensor], worker: Worker) -> PointerPlan:
    """Store a plan (its code and ``state``) on ``worker``; one STORE_PLAN message."""
    plan_id = new_id()
    seq, _ = worker.submit(Kind.STORE_PLAN, plan_id, signature.code.to_wire(list(state)))
    return PointerPlan(signature, worker, plan_id, seq=seq, owner=worker.owner)


class PointerPlan(RemoteResult):
    """A plan living on ``location``; call it with pointers there to run it.

    Each call sends exactly one message with the argument ids and fresh result ids, and
    returns the result pointer(s) at once, before the worker has run anything. Dropping
    the last reference deletes the plan from the worker.

    Attributes:
        location: the worker holding the plan.
        id_at_location: the plan's id there.
        signature: the plan's arity, code and state specs (for checks and output shapes).
    """

    def __init__(
        self, signature: PlanSignature, location: Worker, id_at_location: int, *, seq: int, owner: Worker
    ) -> None:
        self.signature = signature
        self.location = location
        self.id_at_location = id_at_location
        self.id = new_id()
        self.owner = owner
        self.seq = seq
        self.ownership = Ownership(location, id_at_location, True)

    def __call__(self, *args: Any) -> PointerTensor | tuple[PointerTensor, ...]:
        """Run the plan on the worker: one message; returns result pointer(s) at once.

        Raises:
            TypeError: wrong number of arguments (the message gives the expected count).
            LocationError: a pointer argument lives on another worker.
        """
        signature = self.signature
        signature.check_args(args)
        location = self.location

        def wire(leaf: Any) -> Any:
            if isinstance(leaf, PointerTensor):
                leaf.check_live()
                if leaf.location is not location:
                    raise LocationError(
                        f"{leaf!r} is on worker {leaf.location.id!r} but the plan is on worker "
                        f"{location.id!r}; send the plan there or move the data (ptr.move(worker))"
                    )
                return ObjRef(leaf.id_at_location)
            if isinstance(leaf, MultiPointerTensor):
                raise LocationError(
                    "a PointerPlan runs on one worker; call a MultiPointerPlan with a MultiPointerTensor"
                )
            return leaf  # a local tensor or a plain value travels inline with the call

        wire_args = tree_map(wire, list(args))
        specs = signature.output_specs(args)
        ids = take_result_ids(len(specs))
        seq, _ = location.submit(Kind.RUN_PLAN, self.id_at_location, wire_args, ids)
        ptrs = tuple(
            make_pointer(location, rid, shape=s, dtype=d, requires_grad=rg, owner=self.owner, seq=seq)
            for rid, (s, d, rg) in zip(ids, specs)
        )
        return ptrs[0] if signature.single else ptrs

    def __repr__(self) -> str:
        owner = getattr(self.owner, "id", self.owner)
        return f"[PointerPlan | {owner}:{self.id} -> {self.location.id}:{self.id_at_location}]"


class MultiPointerPlan:
    """The same plan sent to several workers (``plan.send(bob, alice)``).

    Calling it issues the call on every worker before anything is awaited and returns a
    :class:`MultiPointerTensor` (a tuple of them for several outputs). Arguments are a
    MultiPointerTensor, a dict ``{worker_id: value}``, or one value for every worker.
    """

    def __init__(self, pointers: list[PointerPlan]) -> None:
        self.children: dict[str, PointerPlan] = {p.location.id: p for p in pointers}

    def __call__(self, *args: Any) -> Any:
        results: dict[str, Any] = {}
        for wid, pp in self.children.items():
            results[wid] = pp(*(_for_worker(a, wid) for a in args))
        first = next(iter(results.values()))
        if isinstance(first, tuple):
            return tuple(MultiPointerTensor([r[i] for r in results.values()]) for i in range(len(first)))
        return MultiPointerTensor(list(results.values()))

    def __getitem__(self, worker: Any) -> PointerPlan:
        return self.children[getattr(worker, "id", worker)]

    def __iter__(self) -> Iterator[PointerPlan]:
        return iter(self.children.values())

    def __len__(self) -> int:
        return len(self.children)

    def __repr__(self) -> str:
        inner = "\n\t-> ".join(repr(p) for p in self.children.values())
        return f"[MultiPointerPlan]\n\t-> {inner}"


def _for_worker(arg: Any, wid: str) -> Any:
    if isinstance(arg, MultiPointerTensor):
        return arg.children[wid]
    if isinstance(arg, dict):
        return arg[wid]
    return arg
