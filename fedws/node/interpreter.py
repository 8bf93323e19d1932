"""Running plan code: one interpreter for the node, the coordinator and shape inference.

:func:`execute` walks a :class:`PlanCode` op by op. It only ever calls what an op name
resolves to in the allowlist (or fedws's own ops), so a plan from the wire is data being
interpreted, never code being run. :func:`store_plan` and :func:`run_plan` do the work of
the node's ``Kind.STORE_PLAN`` and ``Kind.RUN_PLAN`` requests; they are given the store and
the node's resolvers, not the node, so this module does not depend on :mod:`.node`. The
node turns what they raise into error replies and stores failures under the result ids.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode_stack

from ..exceptions import DependencyError, FedwsError, MemoryBudgetError, PlanError
from ..protocol.codec import ObjRef
from ..protocol.messages import RunPlan, StorePlan
from ..protocol.ops import resolve
from ..protocol.plan import PlanCode
from ..protocol.tree import tree_map
from .store import Failure, ObjectStore

__all__ = [
    "execute", "flat_tensors", "flat_outputs", "store_plan", "run_plan", "StoredPlan", "local_resolver",
    "TENSOR_FEDWS_OPS", "load_plan", "check_call", "in_node_torch_state", "compile_steps",
]

_R = TypeVar("_R")


def _thread_default_keys() -> tuple[Any, Any]:
    """The dispatch keys a fresh thread includes and excludes (a node process's own state)."""
    out: list[tuple[Any, Any]] = []
    t = threading.Thread(
        target=lambda: out.append(
            (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())
        )
    )
    t.start()
    t.join()
    return out[0]


_DEFAULT_KEYS = _thread_default_keys()


def _torch_state_is_clean() -> bool:
    return (
        torch._C._len_torch_function_stack() == 0
        and not _get_current_dispatch_mode_stack()
        and not torch.is_inference_mode_enabled()
        and torch._C._dispatch_tls_local_include_set() == _DEFAULT_KEYS[0]
        and torch._C._dispatch_tls_local_exclude_set() == _DEFAULT_KEYS[1]
    )


def in_node_torch_state(fn: Callable[..., _R], *args: Any) -> _R:
    """``fn(*args)`` in the torch state of a thread of its own, as a node process has.

    An in-process node runs in its caller's thread, so it inherited the caller's
    thread-local torch state: torch function and dispatch modes, inference mode, and the
    dispatch keys a kernel excludes while it runs (a TorchScript function calling back into
    Python runs below autograd, and the node's results then had no autograd:
    ``element 0 of tensors does not require grad``, where a real node trained). Running a
    frame in a clean state makes a VirtualWorker compute exactly what a node process does.
    Grad mode is not touched: every command carries its own. Free when the state is clean.
    """
    if _torch_state_is_clean():
        return fn(*args)
    modes = []
    while torch._C._len_torch_function_stack() > 0:
        modes.append(torch._C._pop_torch_function_stack())
    try:
        with (
            _disable_current_modes(),
            torch.inference_mode(False),
            torch._C._ForceDispatchKeyGuard(*_DEFAULT_KEYS),
        ):
            return fn(*args)
    finally:
        for mode in reversed(modes):
            torch._C._push_on_torch_function_stack(mode)


def _set_grad(tensor: torch.Tensor, grad: torch.Tensor | None) -> None:
    tensor.grad = grad


def _set_data(tensor: torch.Tensor, data: torch.Tensor) -> None:
    tensor.data = data


# fedws ops that act on tensors alone, no node state: plans run them anywhere (locally too).
TENSOR_FEDWS_OPS: dict[str, Callable[..., Any]] = {"fedws.set_grad": _set_grad, "fedws.set_data": _set_data}


def local_resolver(name: str) -> Callable[..., Any] | None:
    """Op names for a plan run outside a node (locally, or on meta tensors)."""
    return TENSOR_FEDWS_OPS.get(name) or resolve(name)


def flat_tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors inside nested lists/tuples/dicts, in order (how plan inputs are laid out)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        return [t for x in obj for t in flat_tensors(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in flat_tensors(x)]
    return []


def flat_outputs(out: Any) -> list[Any]:
    """What an op's result registers hold: its tensors, or the value itself if not a sequence."""
    if isinstance(out, (list, tuple)) and not isinstance(out, torch.Size):
        return flat_tensors(out)
    return [out]


def _load(obj: Any, regs: list[Any]) -> Any:
    """``obj`` with every register ref replaced by the register's value."""
    return tree_map(lambda x: regs[x.id] if type(x) is ObjRef else x, obj)


_CONTAINERS = (list, tuple, dict, set)


class _Step:
    """One plan op resolved once: its callable, and its arguments as a template whose
    register slots are filled per call (no tree walk per op per call)."""

    __slots__ = ("name", "fn", "args", "arg_refs", "kwargs", "kw_refs", "nested", "grad", "results")

    def __init__(self, op: Any, fn: Callable[..., Any] | None) -> None:
        self.name: str = op.name
        self.fn = fn  # None: not allowed; raised when the run reaches this op, as before
        self.grad: bool = op.grad
        self.results: list[int] = op.results
        self.kwargs: dict[str, Any] = op.kwargs or {}
        self.args: Any = op.args
        self.arg_refs: list[tuple[int, int]] = []
        self.kw_refs: list[tuple[str, int]] = []
        # Flat arguments (the common case) are filled by position; anything nested keeps
        # the general walk.
        self.nested = type(op.args) not in (list, tuple) or any(type(a) in _CONTAINERS for a in op.args) or any(
            type(v) in _CONTAINERS for v in self.kwargs.values()
        )
        if not self.nested:
            self.arg_refs = [(i, a.id) for i, a in enumerate(op.args) if type(a) is ObjRef]
            self.kw_refs = [(k, v.id) for k, v in self.kwargs.items() if type(v) is ObjRef]

    def load(self, regs: list[Any]) -> tuple[Any, dict[str, Any]]:
        if self.nested:
            return _load(self.args, regs), (_load(self.kwargs, regs) if self.kwargs else {})
        args = list(self.args)
        for i, r in self.arg_refs:
            args[i] = regs[r]
        if type(self.args) is tuple:
            args = tuple(args)  # type: ignore[assignment]
        kwargs = self.kwargs
        if self.kw_refs:
            kwargs = dict(kwargs)
            for k, r in self.kw_refs:
                kwargs[k] = regs[r]
        elif kwargs:
            kwargs = dict(kwargs)
        return args, kwargs


def compile_steps(code: PlanCode, resolver: Callable[[str], Callable[..., Any] | None]) -> list[_Step]:
    """``code``'s ops resolved through ``resolver`` once, for :func:`execute` to run many times."""
    return [_Step(op, resolver(op.name)) for op in code.ops]


def execute(
    code: PlanCode,
    inputs: list[Any],
    state: list[torch.Tensor],
    resolver: Callable[[str], Callable[..., Any] | None] = local_resolver,
    *,
    worker: str | None = None,
    guard: Callable[[str, Callable[..., Any], Any, dict[str, Any]], None] | None = None,
    steps: list[_Step] | None = None,
) -> list[Any]:
    """Run ``code`` on ``inputs`` and ``state``; return the output values.

    ``guard(op, fn, args, kwargs)`` is called before each op runs (a node's memory budget:
    it raises to refuse the op). ``steps``: ``compile_steps(code, resolver)`` made earlier
    (a stored plan keeps them); without them the ops are resolved for this run.

    Raises:
        PlanError: an op failed; the message names the op, its position and the cause.
    """
    if len(inputs) != code.n_inputs:
        raise TypeError(f"plan {code.name!r} takes {code.n_inputs} input tensors, got {len(inputs)}")
    if steps is None:
        steps = compile_steps(code, resolver)
    regs: list[Any] = [*inputs, *state]
    regs.extend([None] * (code.n_registers - len(regs)))
    grad_before = grad_on = torch.is_grad_enabled()
    try:
        for i, step in enumerate(steps):
            try:
                fn = step.fn
                if fn is None:
                    raise KeyError(f"op {step.name!r} is not allowed")
                args, kwargs = step.load(regs)
                if guard is not None:
                    guard(step.name, fn, args, kwargs)
                if step.grad != grad_on:
                    torch.set_grad_enabled(step.grad)
                    grad_on = step.grad
                out = fn(*args, **kwargs)
                results = step.results
                if results:
                    if len(results) == 1 and isinstance(out, torch.Tensor):
                        regs[results[0]] = out
                        continue
                    values = flat_outputs(out)
                    if len(values) != len(results):
                        raise TypeError(f"gave {len(values)} results, the plan expects {len(results)}")
                    for r, v in zip(results, values):
                        regs[r] = v
            except MemoryBudgetError:
                raise  # refused before it ran: the caller sees the budget, not a failed step
            except Exception as exc:
                cause = getattr(exc, "remote_message", None) if isinstance(exc, FedwsError) else None
                raise PlanError(
                    f"plan {code.name!r} failed at step {i + 1} of {len(steps)} ({step.name}): "
                    f"{type(exc).__name__}: {cause or exc}",
                    worker=worker,
                    op=step.name,
                    remote_type="PlanError",
                ) from exc
    finally:
        if grad_on != grad_before:
            torch.set_grad_enabled(grad_before)
    return [regs[o] for o in code.outputs]


class StoredPlan:
    """A checked plan as a node keeps it in its store, with its state tensors."""

    __slots__ = ("code", "state", "digest", "_compiled")

    def __init__(self, code: PlanCode, state: list[torch.Tensor], digest: str | None = None) -> None:
        self.code = code
        self.state = state
        self.digest = digest  # set by a node that enforces a policy (fedws.node.policy.plan_digest)
        self._compiled: tuple[Callable[[str], Callable[..., Any] | None], list[_Step]] | None = None

    def steps(self, resolver: Callable[[str], Callable[..., Any] | None]) -> list[_Step]:
        """The plan's ops resolved through ``resolver``, kept for the next run with the same
        resolver (the node's ``resolve_op``: its own ops and the allowlist, fixed at start)."""
        kept = self._compiled
        if kept is not None and kept[0] == resolver:
            return kept[1]
        steps = compile_steps(self.code, resolver)
        self._compiled = (resolver, steps)
        return steps

    def __repr__(self) -> str:
        return f"<Plan {self.code.name} ops:{len(self.code.ops)} state:{len(self.state)}>"


def store_plan(store: ObjectStore, request: StorePlan, *, worker: str) -> None:
    """Check every op of the plan against the allowlist, then keep it under its id.

    Raises:
        OpNotAllowedError, DecodeError: the plan is refused (the node then holds the
            failure under the plan's id, so running it later fails with the reason).
    """
    code, state = PlanCode.from_wire(request.plan, worker=worker)
    store.set(request.plan_id, StoredPlan(code, state), request.tags, request.description)


def run_plan(
    store: ObjectStore,
    request: RunPlan,
    *,
    resolve_args: Callable[[Any], Any],
    resolver: Callable[[str], Callable[..., Any] | None],
    worker: str,
    guard: Callable[[str, Callable[..., Any], Any, dict[str, Any]], None] | None = None,
) -> None:
    """Run a stored plan on the request's arguments and store its outputs.

    Args:
        store: where the plan is and where the outputs go.
        request: plan id, arguments (refs to stored objects or literals), result ids.
        resolve_args: replaces the refs in the arguments by stored objects (raises for
            a stored failure).
        resolver: op name -> callable, the node's allowlist and its own ops.
        worker: the node's id, for error messages.
        guard: called before each op (see :func:`execute`).
    """
    stored = load_plan(store, request.plan_id, worker)
    check_call(stored.code, request)
    inputs = flat_tensors(resolve_args(request.args))
    outputs = execute(
        stored.code, inputs, stored.state, resolver, worker=worker, guard=guard, steps=stored.steps(resolver)
    )
    for rid, value in zip(request.result_ids, outputs):
        store.set(rid, value)


def load_plan(store: ObjectStore, plan_id: int, worker: str) -> StoredPlan:
    """The plan stored under ``plan_id``.

    Raises:
        ObjectNotFoundError: nothing under that id.
        DependencyError: the plan was refused when it arrived (names why).
        TypeError: the object is not a plan.
    """
    stored = store.get(plan_id)
    if type(stored) is Failure:
        raise DependencyError(
            f"plan {plan_id} was refused when it was sent: "
            f"{stored.error.get('type')}: {stored.error.get('message')}",
            worker=worker,
            obj_id=plan_id,
            remote_type=stored.error.get("type"),
            remote_message=stored.error.get("message"),
        )
    if not isinstance(stored, StoredPlan):
        raise TypeError(f"object {plan_id} on worker {worker!r} is a {type(stored).__name__}, not a plan")
    return stored


def check_call(code: PlanCode, request: RunPlan) -> None:
    """Raise TypeError unless ``request`` passes as many arguments and result ids as ``code`` takes."""
    if len(request.args) != code.n_args:
        raise TypeError(f"plan {code.name!r} takes {code.n_args} arguments, got {len(request.args)}")
    if len(request.result_ids) != len(code.outputs):
        raise TypeError(
            f"plan {code.name!r} has {len(code.outputs)} outputs, got {len(request.result_ids)} result ids"
        )
