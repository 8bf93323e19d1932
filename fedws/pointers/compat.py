"""The torch machinery that never calls ``__torch_function__``, made to work with pointers.

Pointers see every torch call through ``__torch_function__``, except where torch reaches
past it; each went wrong silently or with a confusing error:

- **TorchScript functions.** Calling a ``torch.jit.script`` ed function runs its graph in
  the TorchScript interpreter, which hands pointer arguments straight to the meta kernels:
  results were meta garbage or ``prims::sub is not an allowed remote op``. A plan tracer
  does not see inside either, so the build-time output became a constant. When a call
  carries a pointer, or a plan is being traced (:func:`python_originals`), the patched
  call runs the function's Python original instead (``torch.jit.script`` and
  ``torch.jit.trace`` keep it), whose torch calls pointers and tracers do see. A
  TorchScript function without one (loaded from a file) is refused with a clear error.
- **Optimizers with** ``foreach=True`` group their tensors in C++ by device and dtype and
  refuse a parameter whose shell is on another device than its gradient (a sent
  parameter keeps a CPU shell, the pointers made for it are meta). The patched grouping
  groups pointers by (worker, dtype) instead; the ``torch._foreach_*`` calls that follow
  reach ``__torch_function__`` and run on the worker as allowlisted ops.
- **Optimizer state** is made where the optimizer decides; a global step pre-hook
  (:func:`state_follows_params`) keeps each parameter's state on the parameter's worker.

:func:`install` patches all three, once per process (``TorchHook`` and the plan tracer call it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..exceptions import PointerError
from ..protocol.tree import tree_leaves
from .tensor import PointerTensor

__all__ = [
    "install", "python_originals", "python_original", "group_by_location_and_dtype", "state_follows_params",
]

_state = threading.local()
_lock = threading.Lock()
_installed = False


@contextmanager
def python_originals() -> Iterator[None]:
    """Run TorchScript functions as their Python originals inside this block (plan tracing).

    Thread-local, so a trace in one thread does not change what another thread runs.
    """
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def python_original(fn: Any) -> Callable[..., Any] | None:
    """The Python function a ``torch.jit.script`` ed function was compiled from, if kept."""
    original = getattr(fn, "_torchdynamo_inline", None)
    return original if callable(original) else None


def _has_pointer(args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    return any(isinstance(x, PointerTensor) for x in tree_leaves((list(args), kwargs)))


def _script_function_call(original_call: Callable[..., Any]) -> Callable[..., Any]:
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        tracing = getattr(_state, "depth", 0) > 0
        if tracing or _has_pointer(args, kwargs):
            fn = python_original(self)
            if fn is not None:
                return fn(*args, **kwargs)
            if not tracing:
                name = getattr(self, "qualified_name", None) or getattr(self, "name", "?")
                raise PointerError(
                    f"TorchScript function {name!r} cannot run on pointers: it has no Python "
                    "source to run (torch.jit.load made it); call the Python "
                    "function, or a torch.jit.script of it, instead"
                )
            # tracing: the plan tracer notices that it could not see inside and refuses
        return original_call(self, *args, **kwargs)

    return __call__


def group_by_location_and_dtype(
    tensorlistlist: list[list[Any]], with_indices: bool = False
) -> dict[tuple[torch.device, torch.dtype], tuple[list[list[Any]], list[int]]]:
    """``torch._C._group_tensors_by_device_and_dtype`` for lists that hold pointers.

    Index ``i`` goes to the group of the ``i``-th tensor of the first list, keyed by its
    worker and dtype; each worker gets a device key of its own (``meta:0``, ``meta:1``...),
    so the optimizer's ``for device ... in grouped.items()`` loops run once per worker.
    Empty lists (``max_exp_avg_sqs`` without amsgrad) stay empty in every group.
    """
    first = tensorlistlist[0]
    devices: dict[Any, torch.device] = {}
    order: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(first):
        if isinstance(t, PointerTensor):
            where: Any = t.location
            device = devices.setdefault(id(where), torch.device("meta", len(devices)))
            dtype = t._dtype()
        else:
            device, dtype = t.device, t.dtype
        order.setdefault((device, dtype), []).append(i)
    grouped: dict[tuple[torch.device, torch.dtype], tuple[list[list[Any]], list[int]]] = {}
    for key, idx in order.items():
        lists = [[lst[i] for i in idx] if lst else [] for lst in tensorlistlist]
        grouped[key] = (lists, idx if with_indices else [])
    return grouped


def _grouping(original: Callable[..., Any]) -> Callable[..., Any]:
    def _group_tensors_by_device_and_dtype(tensorlistlist: Any, with_indices: bool = False) -> Any:
        if any(isinstance(t, PointerTensor) for lst in tensorlistlist for t in lst):
            return group_by_location_and_dtype(tensorlistlist, with_indices)
        return original(tensorlistlist, with_indices)

    return _group_tensors_by_device_and_dtype


# Per-parameter scalars optimizers keep on the coordinator and read with .item() (ASGD).
_LOCAL_STATE = frozenset({"step", "eta", "mu"})


def state_follows_params(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Before each step, put every parameter's state where the parameter is.

    An optimizer built before ``model.send(bob)`` (as the tutorials do) may already hold
    state made locally (Adagrad's sums); a model sent to alice after training on bob finds
    its moments on bob; a model brought back finds them remote. State tensors shaped like
    their parameter follow it through the coordinator, as the model did (so two workers
    need not know each other): sent, brought back, or both. Scalars the
    optimizer reads locally (``step``, ASGD's ``eta`` and ``mu``) stay local. Registered
    for every optimizer by :func:`install`; an optimizer that never met a pointer costs
    one type check per parameter.
    """
    remote = optimizer.__dict__.get("_fedws_remote", False)
    for group in optimizer.param_groups:
        for p in group["params"]:
            is_pointer = isinstance(p, PointerTensor)
            if not (is_pointer or remote):
                continue
            remote = True
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in list(state.items()):
                if key in _LOCAL_STATE or not isinstance(value, torch.Tensor):
                    continue
                if isinstance(value, PointerTensor):
                    if is_pointer and value.location is p.location:
                        continue
                    value = value.get()  # through the coordinator, as the model itself came
                    state[key] = value
                if is_pointer and value.shape == p.shape:
                    send: Any = value.send  # TorchHook adds it
                    state[key] = send(p.location)
    if remote:
        optimizer.__dict__["_fedws_remote"] = True


def install() -> None:
    """Patch torch's TorchScript function call and optimizer grouping (once; idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        script_function: Any = torch._C.ScriptFunction
        script_function.__call__ = _script_function_call(script_function.__call__)
        optimizer: Any = torch.optim.Optimizer
        original = optimizer.__dict__["_group_tensors_by_device_and_dtype"].__func__
        optimizer._group_tensors_by_device_and_dtype = staticmethod(_grouping(original))
        register_optimizer_step_pre_hook(state_follows_params)
        _installed = True
