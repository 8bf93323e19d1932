"""Plan and func2plan: a function (or an nn.Module's forward) traced once, runnable anywhere.

A plan is built by running it once on example tensors (:func:`~fedws.plans.trace.trace`);
after that it is data — a list of allowlisted ops plus state tensors — that can be sent to
any number of workers and run there with one message per call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, overload

import torch
from torch import nn

from ..node.interpreter import execute, flat_tensors
from ..pointers import PointerTensor
from ..protocol.ids import new_id
from ..protocol.plan import PlanCode
from ..protocol.tree import tree_leaves
from .pointer_plan import MultiPointerPlan, PointerPlan, send_plan, set_plan_builder
from .signature import PlanSignature, TensorSig, input_sigs
from .state import State
from .trace import trace

if TYPE_CHECKING:
    from ..client.worker import Worker

__all__ = ["Plan", "func2plan", "mock_args"]


class Plan(nn.Module):
    """A sequence of torch ops that can be sent to workers and run there in one message.

    Use :func:`func2plan` on a function, or subclass ``Plan`` like an ``nn.Module`` and
    define ``forward``; the module's parameters and buffers become the plan's state.

    Args:
        function: what to trace (None for subclasses, which trace ``forward``).
        name: the plan's name in messages and in :attr:`code`.
        state: tensors the function reads with ``state.read()`` (its last argument).
        args_shape: shapes of mock arguments to build the plan at once (-1: any size).

    Example:
        >>> class Net(sy.Plan):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc1 = nn.Linear(2, 3)
        ...     def forward(self, x):
        ...         return F.relu(self.fc1(x))
        >>> net = Net(); net.build(torch.tensor([1., 2.]))
        >>> net.send(bob)(x_ptr).get()
    """

    def __init__(
        self,
        function: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        state: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | State | None = None,
        args_shape: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        self._function = function
        self._plan_name = name or getattr(function, "__name__", None) or type(self).__name__
        if state is not None and not isinstance(state, State):
            state = State(state)
        self._user_state: State | None = state
        self.plan_id = new_id()
        self._code: PlanCode | None = None
        self._state_tensors: list[torch.Tensor] = []
        self._signature: PlanSignature | None = None
        self._sent: dict[str, PointerPlan] = {}
        self.tags: set[str] = set()
        self.description: str | None = None
        if args_shape is not None:
            self.build(*mock_args(args_shape))

    # -- building -------------------------------------------------------------------------

    @property
    def is_built(self) -> bool:
        """True once :meth:`build` recorded the ops."""
        return self._code is not None

    def build(self, *args: Any) -> Any:
        """Trace the plan on example ``args``; return what the function returned on them.

        Inputs and state are left as they were, even if the function changes them in place.
        """
        fn = self._function if self._function is not None else self.forward
        extra: tuple[Any, ...] = ()
        if self._user_state is not None:
            state, extra = list(self._user_state.tensors), (self._user_state,)
        else:
            state, extra = [*self.parameters(), *self.buffers()], ()
        result = trace(fn, args, state, name=self._plan_name, extra_args=extra)
        self._code = result.code
        self._state_tensors = result.state
        self._signature = PlanSignature(result.code, result.state, input_sigs(args))
        self._sent = {}
        return result.outputs

    @property
    def code(self) -> str:
        """The recorded ops, readable (``print(plan.code)``)."""
        return self._built_code().pretty()

    @property
    def state(self) -> State:
        """The tensors that travel with the plan."""
        if self._code is not None:
            return State(self._state_tensors)
        if self._user_state is not None:
            return self._user_state
        return State([*self.parameters(), *self.buffers()])

    @state.setter
    def state(self, value: State) -> None:
        """``self.state += ['fc1', 'fc2']`` (PySyft): the parameters are the state already."""
        if not isinstance(value, State):
            raise TypeError(f"a plan's state is a State, got {type(value).__name__}")

    def add_to_state(self, *names: str) -> None:
        """PySyft's ``self.add_to_state('fc1', 'fc2')``: a plan's parameters and buffers are
        its state already, so this only checks that the names are the plan's attributes."""
        for name in names:
            if not hasattr(self, name):
                raise AttributeError(f"plan {self._plan_name!r} has no attribute {name!r} to add to its state")

    @property
    def state_tensors(self) -> list[torch.Tensor]:
        """The built plan's state tensors, in register order (user state, then captured).

        Empty before :meth:`build`. This is what :meth:`send` ships with the code.
        """
        return list(self._state_tensors)

    @property
    def signature(self) -> PlanSignature:
        """The built plan's arity, code and state specs (what a PointerPlan holds).

        Raises:
            RuntimeError: the plan is not built yet.
        """
        self._built_code()
        assert self._signature is not None
        return self._signature

    def _built_code(self) -> PlanCode:
        if self._code is None:
            raise RuntimeError(
                f"plan {self._plan_name!r} is not built: call plan.build(*example_args) first "
                "(or give func2plan args_shape=...)"
            )
        return self._code

    # -- sending and calling --------------------------------------------------------------

    @overload
    def send(self, worker: Worker, /) -> PointerPlan: ...

    @overload
    def send(self, w1: Worker, w2: Worker, /, *more: Worker) -> MultiPointerPlan: ...

    def send(self, *workers: Worker) -> PointerPlan | MultiPointerPlan:
        """Send the built plan (with its current state) to one or several workers.

        Returns a :class:`PointerPlan`, or a :class:`MultiPointerPlan` for several workers.
        The same plan can be sent again, to other workers, without rebuilding.

        Raises:
            RuntimeError: the plan is not built yet.
        """
        signature = self.signature
        if not workers:
            raise TypeError("send() needs at least one worker")
        pointers = [
            send_plan(signature, self._state_tensors, w, tags=self.tags, description=self.description)
            for w in workers
        ]
        for p in pointers:
            self._sent[p.location.id] = p
        return pointers[0] if len(pointers) == 1 else MultiPointerPlan(pointers)

    def tag(self, *tags: str) -> Plan:
        """Add search tags: once sent, ``worker.search(tag)`` finds the plan; returns it."""
        self.tags.update(tags)
        return self

    def describe(self, description: str) -> Plan:
        """Attach a description, searchable as text once the plan is sent; returns it."""
        self.description = description
        return self

    def get(self) -> Plan:
        """Bring the plan back from the worker it was last sent to (PySyft's ``plan.get()``).

        Its state takes the values it has there (a plan that trains its state in place
        keeps what it learnt); every copy sent is dropped from its worker. Returns the plan.
        """
        if not self._sent:
            return self
        last = list(self._sent.values())[-1]
        fetched = last.get()
        with torch.no_grad():
            for mine, theirs in zip(self._state_tensors, fetched.state_tensors):
                mine.copy_(theirs)
        self._sent = {}
        return self

    @classmethod
    def from_code(
        cls, code: PlanCode, state: Sequence[torch.Tensor], tags: set[str] | None = None, description: str | None = None
    ) -> Plan:
        """A built plan from checked code and state (what ``PointerPlan.get()`` returns)."""
        plan = cls(name=code.name)
        plan._code = code
        plan._state_tensors = list(state)
        plan._signature = PlanSignature(code, plan._state_tensors, ())
        plan.tags = set(tags or ())
        plan.description = description
        return plan

    def __call__(self, *args: Any) -> Any:
        """Run the plan: locally on tensors, or on the worker holding the pointer arguments.

        An unbuilt plan is built on these arguments first.
        """
        location = next((a.location for a in tree_leaves(args) if isinstance(a, PointerTensor)), None)
        if location is not None:
            sent = self._sent.get(location.id)
            if sent is None or sent.location is not location:
                sent = self.send(location)
            return sent(*args)
        if self._code is None:
            self.build(*args)
        code = self.check_args(args)
        outs = execute(code, flat_tensors(list(args)), self._state_tensors)
        return outs[0] if code.single else tuple(outs)

    def check_args(self, args: Sequence[Any]) -> PlanCode:
        """Raise TypeError unless ``args`` fit the plan; return its code."""
        self.signature.check_args(args)
        return self._built_code()

    def output_specs(self, args: Sequence[Any]) -> list[TensorSig]:
        """Shapes and dtypes the outputs will have for ``args``, worked out locally.

        See :meth:`PlanSignature.output_specs`: inputs shaped as at build time reuse the
        traced shapes, others run the plan on meta tensors; an unknown shape is None.
        """
        return self.signature.output_specs(args)

    # -- display --------------------------------------------------------------------------

    def __repr__(self) -> str:
        owner = "me"
        status = f"built, {len(self._code.ops)} ops" if self._code is not None else "not built"
        head = f"<Plan {self._plan_name} id:{self.plan_id} owner:{owner} {status}>"
        if next(self.children(), None) is not None:
            return head + "\n" + nn.Module.__repr__(self)
        return head

    def __str__(self) -> str:
        return self.code if self._code is not None else repr(self)


def func2plan(
    args_shape: Sequence[Sequence[int]] | Callable[..., Any] | None = None,
    state: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
) -> Any:
    """Decorator turning a function into a :class:`Plan`.

    Args:
        args_shape: shapes of mock arguments; when given the plan is built at once.
            ``-1`` stands for "any size" (traced with 1; sizes read with ``.shape`` are
            re-read on the worker).
        state: tensors the function receives as its last argument, a :class:`State`.

    Example:
        >>> @sy.func2plan(args_shape=[(-1, 1)])
        ... def plan_double_abs(x):
        ...     return torch.abs(x + x)
    """
    if callable(args_shape):  # bare @func2plan
        return Plan(args_shape)

    def decorate(fn: Callable[..., Any]) -> Plan:
        return Plan(fn, name=fn.__name__, state=state, args_shape=args_shape)

    return decorate


set_plan_builder(Plan.from_code)


def mock_args(args_shape: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Tensors of ones shaped like ``args_shape`` (-1 becomes 1)."""
    return [torch.ones([1 if d == -1 else int(d) for d in shape]) for shape in args_shape]
