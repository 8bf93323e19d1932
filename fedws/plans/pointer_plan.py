"""PointerPlan: a plan stored on a worker; calling it sends one RUN_PLAN message."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..client.worker import found_tags, search_result_makers
from ..exceptions import LocationError, PointerError
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
from ..protocol.plan import PlanCode
from ..protocol.tree import tree_map
from .signature import PlanSignature

if TYPE_CHECKING:
    from ..client.worker import Worker

__all__ = ["PointerPlan", "MultiPointerPlan", "send_plan", "set_plan_builder", "pointer_plan_from_search"]

# Builds a local Plan from checked code and state (plan.py registers Plan.from_code; this
# module cannot import plan.py, which imports it).
_plan_builder: Callable[[PlanCode, list[torch.Tensor], set[str], str | None], Any] | None = None


def set_plan_builder(build: Callable[[PlanCode, list[torch.Tensor], set[str], str | None], Any]) -> None:
    """Tell :meth:`PointerPlan.get` how to make a local plan (``Plan.from_code``)."""
    global _plan_builder
    _plan_builder = build


def send_plan(
    signature: PlanSignature,
    state: Sequence[torch.Tensor],
    worker: Worker,
    *,
    tags: Iterable[str] = (),
    description: str | None = None,
) -> PointerPlan:
    """Store a plan (its code and ``state``) on ``worker``; one STORE_PLAN message.

    ``tags`` and ``description`` travel only when given: ``worker.search`` finds the plan.
    """
    plan_id = new_id()
    tag_list = sorted(set(tags))
    extra = (tag_list, description) if tag_list or description is not None else ()
    seq, _ = worker.submit(Kind.STORE_PLAN, plan_id, signature.code.to_wire(list(state)), *extra)
    pp = PointerPlan(signature, worker, plan_id, seq=seq, owner=worker.owner)
    pp.tags, pp.description = set(tag_list), description
    return pp


def pointer_plan_from_search(worker: Worker, d: list[Any]) -> PointerPlan | None:
    """A search result that is a stored plan: a PointerPlan that does not own it.

    Its signature (the code, to check calls and shape results) is fetched on first use.
    """
    if len(d) < 2 or d[1] != "StoredPlan" or type(d[0]) is not int:
        return None
    pp = PointerPlan(None, worker, d[0], seq=0, owner=worker.owner, owns=False)
    pp.tags, pp.description = found_tags(d)
    return pp


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
        self,
        signature: PlanSignature | None,
        location: Worker,
        id_at_location: int,
        *,
        seq: int,
        owner: Worker,
        owns: bool = True,
    ) -> None:
        self._signature = signature
        self.location = location
        self.id_at_location = id_at_location
        self.id = new_id()
        self.owner = owner
        self.seq = seq
        self.ownership = Ownership(location, id_at_location, owns)
        self.tags: set[str] = set()
        self.description: str | None = None
        self.gotten = False

    @property
    def signature(self) -> PlanSignature:
        """The plan's arity, code and state specs; fetched from the worker (and checked
        like any plan that arrives) for a plan found by ``search``."""
        if self._signature is None:
            code, state = self._fetch(remove=False)
            self._signature = PlanSignature(code, state, ())
        return self._signature

    def _fetch(self, *, remove: bool) -> tuple[PlanCode, list[torch.Tensor]]:
        if self.gotten:
            raise PointerError(f"{self!r} was already retrieved with get(); the plan left the worker")
        wire = self.location.request(Kind.GET, self.id_at_location, remove)
        return PlanCode.from_wire(wire, worker=self.location.id)

    def get(self) -> Any:
        """Bring the plan back: a local :class:`~fedws.plans.Plan` (with the state it has on
        the worker), which runs locally and can be sent again. The worker forgets it.

        Raises:
            PermissionDeniedError: a private node keeps a plan that ran on its private data.
            OpNotAllowedError, DecodeError: what came back is not a plan this side accepts.
        """
        code, state = self._fetch(remove=True)
        self.gotten = True
        self.ownership.active = False
        assert _plan_builder is not None, "fedws.plans.plan registers the plan builder"
        return _plan_builder(code, state, set(self.tags), self.description)

    def __call__(self, *args: Any) -> PointerTensor | tuple[PointerTensor, ...]:
        """Run the plan on the worker: one message; returns result pointer(s) at once.

        Raises:
            TypeError: wrong number of arguments (the message gives the expected count).
            LocationError: a pointer argument lives on another worker.
        """
        if self.gotten:
            raise PointerError(f"{self!r} was already retrieved with get(); the plan left the worker")
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


search_result_makers.append(pointer_plan_from_search)
