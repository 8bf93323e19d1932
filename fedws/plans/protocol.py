"""Protocol: a sequence of (worker, plan) steps deployed together and run as one (PySyft's
Part 08 bis).

A protocol names its steps' workers by role (``"worker1"``) or gives real workers;
:meth:`Protocol.deploy` binds the roles to workers and sends each plan where it runs.
:meth:`Protocol.run` sends the input to the first step's worker, runs its plan, moves the
outputs to the next step's worker (node to node, ``ptr.move``) and so on; the result is a
pointer on the last step's worker.

A protocol can also be stored on a worker (:meth:`Protocol.send`), found there with
``worker.search(tag)`` and brought back with ``.get()``. It is stored as plain data (each
plan's wire form and its role); a node never runs it, and the coordinator that fetches it
checks every plan against the allowlist as a node would (``PlanCode.from_wire``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..client.worker import Worker, found_tags, search_result_makers
from ..exceptions import DecodeError, PointerError
from ..pointers import Ownership, PointerTensor
from ..protocol.ids import new_id
from ..protocol.messages import Kind
from ..protocol.plan import PlanCode
from .plan import Plan
from .pointer_plan import PointerPlan

__all__ = ["Protocol", "PointerProtocol", "PROTOCOL_TAG", "MAX_PROTOCOL_STEPS"]

PROTOCOL_TAG = "#fedws.protocol"
"""The tag a stored protocol carries, so a search result is known to be one."""

MAX_PROTOCOL_STEPS = 64
"""Steps a protocol brought back from a worker may have (it is checked like any input)."""

Step = tuple[Worker | str, Plan | PointerPlan]


class Protocol:
    """Plans that run one after the other, each on its own worker.

    Args:
        plans: ``(worker, plan)`` pairs in the order they run. ``worker`` is a worker or a
            role name (steps with the same name run on the same worker); ``plan`` is a
            built :class:`Plan` or a :class:`PointerPlan` already on its worker.

    Example:
        >>> protocol = sy.Protocol([("worker1", inc1), ("worker2", inc2)])
        >>> protocol.deploy(alice, bob)
        >>> protocol.run(torch.tensor([1.0])).get()
        tensor([3.])
    """

    def __init__(self, plans: Sequence[Step]) -> None:
        steps = list(plans)
        for step in steps:
            if not (isinstance(step, tuple) and len(step) == 2):
                raise TypeError(f"a protocol step is a (worker, plan) pair, got {step!r:.60}")
            who, plan = step
            if not isinstance(who, (Worker, str)):
                raise TypeError(f"a step's worker is a worker or a role name, got {type(who).__name__}")
            if not isinstance(plan, (Plan, PointerPlan)):
                raise TypeError(f"a step's plan is a Plan or a PointerPlan, got {type(plan).__name__}")
        self.plans: list[Step] = steps
        self.tags: set[str] = set()
        self.description: str | None = None
        self.location: Worker | None = None
        self._deployed: list[tuple[Worker, PointerPlan]] | None = None
        self._stored: list[PointerProtocol] = []  # the copies this protocol sent: they live as long as it

    # -- roles and deployment -------------------------------------------------------------

    @property
    def roles(self) -> list[str]:
        """The distinct workers of the steps (role names or worker ids), in order."""
        out: list[str] = []
        for who, _ in self.plans:
            key = who.id if isinstance(who, Worker) else who
            if key not in out:
                out.append(key)
        return out

    @property
    def is_deployed(self) -> bool:
        return self._deployed is not None

    def deploy(self, *workers: Worker) -> Protocol:
        """Bind the roles to ``workers`` (in the order the roles first appear) and send each
        plan to its worker. A step given a PointerPlan stays where that plan is; steps that
        name real workers deploy there when no workers are given. Returns the protocol.

        Raises:
            ValueError: not one worker per role.
        """
        roles = self.roles
        if not workers and all(isinstance(who, Worker) for who, _ in self.plans):
            workers = tuple(next(w for w, _ in self.plans if isinstance(w, Worker) and w.id == r) for r in roles)
        if len(workers) != len(roles):
            raise ValueError(f"the protocol has {len(roles)} workers ({roles}), deploy() got {len(workers)}")
        for w in workers:
            if not isinstance(w, Worker):
                raise TypeError(f"deploy() takes workers, got {type(w).__name__}")
        bound = dict(zip(roles, workers))
        deployed: list[tuple[Worker, PointerPlan]] = []
        for who, plan in self.plans:
            if isinstance(plan, PointerPlan):
                deployed.append((plan.location, plan))
                continue
            worker = bound[who.id if isinstance(who, Worker) else who]
            deployed.append((worker, plan.send(worker)))
        self._deployed = deployed
        return self

    def send(self, worker: Worker) -> Protocol:
        """Store the protocol on ``worker`` (searchable by its tags) and deploy every step
        there, so ``protocol.run(x_ptr)`` with data on ``worker`` runs it all there.

        Returns the protocol.
        """
        if not isinstance(worker, Worker):
            raise TypeError(f"send() takes a worker, got {type(worker).__name__}")
        obj_id = new_id()
        seq = worker.store(
            self.to_wire(), obj_id=obj_id, tags=[PROTOCOL_TAG, *self.tags], description=self.description
        )
        self._stored.append(PointerProtocol(worker, obj_id, owns=True, seq=seq, tags=self.tags,
                                            description=self.description))
        self.deploy(*[worker] * len(self.roles))
        self.location = worker
        return self

    # -- running --------------------------------------------------------------------------

    def run(self, *args: Any) -> Any:
        """Run every step in order and return the last step's result pointer(s).

        Local tensors go to the first step's worker; pointers move (node to node) to each
        step's worker before its plan runs. Nothing waits in between: every step is a
        command with result ids chosen here.

        Raises:
            PointerError: the protocol is not deployed.
        """
        if self._deployed is None:
            raise PointerError("the protocol is not deployed: call protocol.deploy(*workers) or protocol.send(worker)")
        current: tuple[Any, ...] = args
        for worker, plan in self._deployed:
            current = tuple(_to_worker(a, worker) for a in current)
            out = plan(*current)
            current = out if isinstance(out, tuple) else (out,)
        return current[0] if len(current) == 1 else current

    # -- search ---------------------------------------------------------------------------

    def tag(self, *tags: str) -> Protocol:
        """Add search tags (``worker.search(tag)`` finds the protocol once sent); returns it."""
        self.tags.update(tags)
        return self

    def describe(self, description: str) -> Protocol:
        """Attach a description, searchable as text once sent; returns the protocol."""
        self.description = description
        return self

    # -- wire -----------------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """The protocol as plain data: each step's role and its plan's wire form."""
        steps = []
        for who, plan in self.plans:
            if isinstance(plan, PointerPlan):
                raise PointerError("a protocol holding a PointerPlan cannot be sent: its plan is on another worker")
            steps.append([who.id if isinstance(who, Worker) else who, plan.signature.code.to_wire(plan.state_tensors)])
        return {"fedws.protocol": 1, "steps": steps}

    @classmethod
    def from_wire(cls, d: Any, *, worker: str | None = None) -> Protocol:
        """Check a protocol that came back from a worker and rebuild its plans.

        Raises:
            DecodeError: not a protocol, or too many steps.
            OpNotAllowedError: a plan uses an op outside the allowlist.
        """
        if not isinstance(d, dict) or d.get("fedws.protocol") != 1 or not isinstance(d.get("steps"), list):
            raise DecodeError("not a fedws protocol")
        raw = d["steps"]
        if len(raw) > MAX_PROTOCOL_STEPS:
            raise DecodeError(f"protocol has {len(raw)} steps, at most {MAX_PROTOCOL_STEPS}")
        steps: list[Step] = []
        for step in raw:
            if not (isinstance(step, list) and len(step) == 2 and isinstance(step[0], str)):
                raise DecodeError("a protocol step is [role, plan]")
            code, state = PlanCode.from_wire(step[1], worker=worker)
            steps.append((step[0], Plan.from_code(code, state)))
        return cls(steps)

    def __repr__(self) -> str:
        where = "deployed" if self._deployed is not None else "not deployed"
        lines = [f"<Protocol {where}{' tags:' + ' '.join(sorted(self.tags)) if self.tags else ''}>"]
        steps: Sequence[tuple[Worker | str, Plan | PointerPlan]] = self._deployed or self.plans
        for who, plan in steps:
            name = who.id if isinstance(who, Worker) else who
            lines.append(f"  - {name}: {getattr(plan, 'signature', None) and plan.signature.name}")
        return "\n".join(lines)


class PointerProtocol:
    """A protocol stored on a worker, as ``worker.search`` finds it; ``get()`` brings it back.

    Attributes:
        location: the worker holding it.
        id_at_location: its id there.
        tags, description: what it was stored with.
    """

    def __init__(
        self,
        location: Worker,
        id_at_location: int,
        *,
        owns: bool = False,
        seq: int = 0,
        tags: set[str] | None = None,
        description: str | None = None,
    ) -> None:
        self.location = location
        self.id_at_location = id_at_location
        self.seq = seq
        self.ownership: Ownership = Ownership(location, id_at_location, owns)
        self.tags: set[str] = set(tags or ())
        self.description = description
        self.gotten = False

    def get(self) -> Protocol:
        """Bring the protocol back (the worker forgets it); deploy it to run it.

        Raises:
            PointerError: already brought back.
            DecodeError, OpNotAllowedError: what came back is not a protocol this side accepts.
        """
        if self.gotten:
            raise PointerError(f"{self!r} was already retrieved with get()")
        wire = self.location.request(Kind.GET, self.id_at_location, True)
        self.gotten = True
        self.ownership.active = False
        protocol = Protocol.from_wire(wire, worker=self.location.id)
        protocol.tags = {t for t in self.tags if t != PROTOCOL_TAG}
        protocol.description = self.description
        return protocol

    def __repr__(self) -> str:
        return f"[PointerProtocol | -> {self.location.id}:{self.id_at_location}]"


def _to_worker(value: Any, worker: Worker) -> Any:
    """``value`` on ``worker``: a local tensor is sent, a pointer elsewhere moves."""
    if isinstance(value, PointerTensor):
        return value if value.location is worker else value.move(worker)
    if isinstance(value, torch.Tensor):
        return value.send(worker)  # type: ignore[attr-defined]
    return value


def _protocol_from_search(worker: Worker, d: list[Any]) -> PointerProtocol | None:
    tags, description = found_tags(d)
    if PROTOCOL_TAG not in tags or type(d[0]) is not int:
        return None
    return PointerProtocol(worker, d[0], tags=tags, description=description)


search_result_makers.append(_protocol_from_search)
