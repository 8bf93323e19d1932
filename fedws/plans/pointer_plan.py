"""PointerPlan: a plan stored on a worker; calling it sends one RUN_PLAN message."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..exceptions import LocationError
from ..pointers import MultiPointerTensor, PointerTensor, RemoteResult, _Ownership, _take_ids, make_pointer
from ..protocol.codec import ObjRef
from ..protocol.ids import new_id
from ..protocol.messages import Kind

if TYPE_CHECKING:
    from ..client.worker import Worker
    from ..protocol.plan import PlanCode
    from .plan import Plan

__all__ = ["PointerPlan", "MultiPointerPlan", "send_plan"]


def send_plan(plan: Plan, code: PlanCode, worker: Worker) -> PointerPlan:
    """Store ``plan`` (its code and current state) on ``worker``; one STORE_PLAN message."""
    plan_id = new_id()
    seq, _ = worker.submit(Kind.STORE_PLAN, plan_id, code.to_wire(plan._state_tensors))
    return PointerPlan(plan, worker, plan_id, seq=seq, owner=worker.owner)


class PointerPlan(RemoteResult):
    """A plan living on ``location``; call it with pointers there to run it.

    Each call sends exactly one message with the argument ids and fresh result ids, and
    returns the result pointer(s) at once, before the worker has run anything. Dropping
    the last reference deletes the plan from the worker.

    Attributes:
        location: the worker holding the plan.
        id_at_location: the plan's id there.
        plan: the local :class:`Plan` it was sent from (for output shapes).
    """

    def __init__(self, plan: Plan, location: Worker, id_at_location: int, *, seq: int, owner: Worker) -> None:
        self.plan = plan
        self.location = location
        self.id_at_location = id_at_location
        self.id = new_id()
        self.owner = owner
        self._seq = seq
        self._ownership = _Ownership(location, id_at_location, True)

    def __call__(self, *args: Any) -> PointerTensor | tuple[PointerTensor, ...]:
        """Run the plan on the worker: one message; returns result pointer(s) at once.

        Raises:
            TypeError: wrong number of arguments (the message gives the expected count).
            LocationError: a pointer argument lives on another worker.
        """
        code = self.plan.check_args(args)
        wire = [_wire(a, self.location) for a in args]
        specs = self.plan.output_specs(args)
        ids = _take_ids(len(specs))
        seq, _ = self.location.submit(Kind.RUN_PLAN, self.id_at_location, wire, ids)
        ptrs: tuple[PointerTensor, ...] = tuple(  # type: ignore[misc]
            make_pointer(self.location, rid, shape=s, dtype=d, requires_grad=rg, owner=self.owner, seq=seq)
            for rid, (s, d, rg) in zip(ids, specs)
        )
        return ptrs[0] if code.single else ptrs

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


def _wire(obj: Any, location: Worker) -> Any:
    if isinstance(obj, PointerTensor):
        obj._check_live()
        if obj.location is not location:
            raise LocationError(
                f"{obj!r} is on worker {obj.location.id!r} but the plan is on worker "
                f"{location.id!r}; send the plan there or move the data (ptr.move(worker))"
            )
        return ObjRef(obj.id_at_location)
    if isinstance(obj, MultiPointerTensor):
        raise LocationError("a PointerPlan runs on one worker; call a MultiPointerPlan with a MultiPointerTensor")
    t = type(obj)
    if t is list or t is tuple:
        out = [_wire(x, location) for x in obj]
        return out if t is list else tuple(out)
    if t is dict:
        return {k: _wire(v, location) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return obj  # a local tensor travels inline with the call
    return obj
