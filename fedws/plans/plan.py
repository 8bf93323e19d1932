"""Plan and func2plan: a function (or an nn.Module's forward) traced once, runnable anywhere.

A plan is built by running it once on example tensors (:func:`~fedws.plans.trace.trace`);
after that it is data — a list of allowlisted ops plus state tensors — that can be sent to
any number of workers and run there with one message per call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..protocol.ids import new_id
from ..protocol.plan import OutSpec, PlanCode
from ..node.interpreter import execute, flat_tensors
from .state import State
from .trace import trace

if TYPE_CHECKING:
    from ..client.worker import Worker
    from .pointer_plan import MultiPointerPlan, PointerPlan

__all__ = ["Plan", "func2plan"]

# (shape, dtype, requires_grad) of each input tensor; shape None when not known.
InSig = tuple[tuple[tuple[int, ...] | None, torch.dtype, bool], ...]


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
        state: Sequence[torch.Tensor] | State | None = None,
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
        self._input_sigs: InSig = ()
        self._spec_cache: dict[InSig, list[tuple[tuple[int, ...] | None, torch.dtype, bool]]] = {}
        self._sent: dict[str, PointerPlan] = {}
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
        self._input_sigs = _sigs(args)
        self._spec_cache = {}
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

    def _built_code(self) -> PlanCode:
        if self._code is None:
            raise RuntimeError(
                f"plan {self._plan_name!r} is not built: call plan.build(*example_args) first "
                "(or give func2plan args_shape=...)"
            )
        return self._code

    # -- sending and calling --------------------------------------------------------------

    def send(self, *workers: Worker) -> PointerPlan | MultiPointerPlan:
        """Send the built plan (with its current state) to one or several workers.

        Returns a :class:`PointerPlan`, or a :class:`MultiPointerPlan` for several workers.
        The same plan can be sent again, to other workers, without rebuilding.

        Raises:
            RuntimeError: the plan is not built yet.
        """
        from .pointer_plan import MultiPointerPlan, send_plan

        code = self._built_code()
        if not workers:
            raise TypeError("send() needs at least one worker")
        pointers = [send_plan(self, code, w) for w in workers]
        for p in pointers:
            self._sent[p.location.id] = p
        return pointers[0] if len(pointers) == 1 else MultiPointerPlan(pointers)

    def __call__(self, *args: Any) -> Any:
        """Run the plan: locally on tensors, or on the worker holding the pointer arguments.

        An unbuilt plan is built on these arguments first.
        """
        from ..pointers import PointerTensor

        location = next((a.location for a in _leaves(args) if isinstance(a, PointerTensor)), None)
        if location is not None:
            sent = self._sent.get(location.id)
            if sent is None or sent.location is not location:
                sent = self.send(location)  # type: ignore[assignment]
            return sent(*args)  # type: ignore[misc]
        if self._code is None:
            self.build(*args)
        code = self.check_args(args)
        outs = execute(code, flat_tensors(list(args)), self._state_tensors)
        return outs[0] if code.single else tuple(outs)

    def check_args(self, args: Sequence[Any]) -> PlanCode:
        """Raise TypeError unless ``args`` fit the plan; return its code."""
        code = self._built_code()
        if len(args) != code.n_args:
            raise TypeError(
                f"plan {self._plan_name!r} takes {code.n_args} argument{'s' if code.n_args != 1 else ''}, "
                f"got {len(args)}"
            )
        n = len(flat_tensors(list(args)))
        if n != code.n_inputs:
            raise TypeError(f"plan {self._plan_name!r} takes {code.n_inputs} tensors in its arguments, got {n}")
        return code

    def output_specs(self, args: Sequence[Any]) -> list[tuple[tuple[int, ...] | None, torch.dtype, bool]]:
        """Shapes and dtypes the outputs will have for ``args``, worked out locally.

        Inputs shaped as at build time reuse the traced shapes; others run the plan on meta
        tensors (no data, no node). A shape that cannot be worked out is None.
        """
        code = self._built_code()
        sigs = _sigs(args)
        traced: list[OutSpec] = code.out_specs
        if sigs == self._input_sigs:
            return [(s, d, rg) for s, d, rg in traced]
        cached = self._spec_cache.get(sigs)
        if cached is not None:
            return cached
        unknown: list[tuple[tuple[int, ...] | None, torch.dtype, bool]] = [(None, d, rg) for _, d, rg in traced]
        specs: list[tuple[tuple[int, ...] | None, torch.dtype, bool]] = unknown
        if all(s is not None for s, _, _ in sigs):
            try:
                inputs = [_meta(s, d, rg) for s, d, rg in sigs]  # type: ignore[arg-type]
                state = [_meta(tuple(t.shape), t.dtype, t.requires_grad) for t in self._state_tensors]
                outs = execute(code, inputs, state)
                specs = [
                    (tuple(o.shape), o.dtype, bool(o.requires_grad)) if isinstance(o, torch.Tensor) else u
                    for o, u in zip(outs, unknown)
                ]
            except Exception:
                specs = unknown
        if len(self._spec_cache) < 256:
            self._spec_cache[sigs] = specs
        return specs

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
    state: Sequence[torch.Tensor] | None = None,
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


def mock_args(args_shape: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Tensors of ones shaped like ``args_shape`` (-1 becomes 1)."""
    return [torch.ones([1 if d == -1 else int(d) for d in shape]) for shape in args_shape]


def _leaves(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Tensor):
        return [x for o in obj for x in _leaves(o)]
    if isinstance(obj, dict):
        return [x for o in obj.values() for x in _leaves(o)]
    return [obj]


def _sigs(args: Sequence[Any]) -> InSig:
    out: list[tuple[tuple[int, ...] | None, torch.dtype, bool]] = []
    for t in flat_tensors(list(args)):
        sig = t.__dict__.get("_sig", False) if hasattr(t, "id_at_location") else False
        if sig is False:
            out.append((tuple(t.shape), t.dtype, bool(t.requires_grad)))
        elif sig is None:
            out.append((None, t._dtype(), False))  # type: ignore[attr-defined]
        else:
            out.append((tuple(sig[0]), sig[1], bool(sig[2])))  # type: ignore[index]
    return tuple(out)


def _meta(shape: tuple[int, ...], dtype: torch.dtype, rg: bool) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.requires_grad_(rg) if rg and (dtype.is_floating_point or dtype.is_complex) else t
