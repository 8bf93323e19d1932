"""Torch integration: ``Tensor.send/tag/describe`` and ``nn.Module.send/get/copy/move``.

``TorchHook(torch)`` adds these methods (once per process) and creates the federation's
local worker ``"me"``. Several hooks can live in one process, each with its own workers,
which our tests and notebooks need; ``fedws.local_worker`` is the latest hook's.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import Future
from typing import Any, overload

import torch
from torch import nn

from .client.federation import Federation
from .client.worker import Worker
from .datasets import dataset_federate
from .exceptions import PointerError
from .pointers import (
    MultiPointerTensor,
    PointerParameter,
    PointerTensor,
    make_pointer,
    parameter_to_pointer,
    pointer_to_parameter,
)
from .pointers.compat import install as install_torch_compat
from .protocol.ids import new_id
from .protocol.messages import Kind
from .smpc import install as install_smpc
from .transport.io_thread import wait
from .virtual import VirtualWorker

__all__ = ["TorchHook", "send_tensor", "default_federation", "current_federation"]

_default: Federation[Worker] | None = None
_latest: Federation[Worker] | None = None
_default_lock = threading.Lock()


def default_federation() -> Federation[Worker]:
    """The process's default federation, made (with its local worker ``me``) on first use.

    Every ``sy.TorchHook(torch)`` and every ``sy.connect(url)`` without an explicit
    federation joins this one, as every hook of a process shared one local worker in PySyft.
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = _complete(Federation())
        return _default


def current_federation() -> Federation[Worker] | None:
    """The federation of the latest TorchHook (``sy.local_worker`` is its ``me``).

    Before any hook: the default federation if ``sy.connect`` already made it, else None.
    """
    return _latest if _latest is not None else _default


def _complete(federation: Federation[Worker]) -> Federation[Worker]:
    """Hand the pointer factory in and make the local worker ``me`` if missing."""
    _install()
    if federation.pointer_factory is None:
        federation.pointer_factory = make_pointer
    if federation.local_worker is None:
        federation.local_worker = VirtualWorker(federation, id="me")
        for worker in list(federation.workers.values()):
            if worker is not federation.local_worker:
                federation.local_worker.peers[worker.id] = worker
    return federation


class TorchHook:
    """The entry point of a federation: ``hook = sy.TorchHook(torch)``.

    It adds ``send``/``get``/... to torch (once per process) and joins a federation: the
    process's default one unless ``federation`` is given, so every ``TorchHook(torch)`` in a
    process shares the same workers and local worker ``me``, as in PySyft.

    Args:
        torch_module: the torch module.
        federation: a :class:`Federation` of its own (several can live in one process).

    Attributes:
        local_worker: the coordinator's own worker (id ``"me"``), owner of its pointers.
        workers: every worker of the federation, by id.
    """

    def __init__(self, torch_module: Any = torch, *, federation: Federation[Worker] | None = None) -> None:
        if torch_module is not torch:
            raise TypeError("TorchHook expects the torch module: sy.TorchHook(torch)")
        global _latest
        self.torch = torch_module
        self.federation = _complete(federation) if federation is not None else default_federation()
        _latest = self.federation
        self.local_worker.hook = self  # PySyft's ``sy.local_worker.hook``: the latest hook

    @property
    def local_worker(self) -> Worker:
        local = self.federation.local_worker
        assert local is not None  # _complete made it
        return local

    @property
    def workers(self) -> dict[str, Worker]:
        return self.federation.workers

    def settle(self, exclude: Worker | None = None, timeout: float | None = None) -> None:
        """Wait until every worker (but ``exclude``) has run the commands sent to it."""
        self.federation.settle(exclude, timeout)

    def __repr__(self) -> str:
        return f"<TorchHook workers={sorted(self.workers)}>"


# -- Tensor methods -----------------------------------------------------------------------


@overload
def send_tensor(tensor: torch.Tensor, worker: Worker, /) -> PointerTensor: ...


@overload
def send_tensor(tensor: torch.Tensor, w1: Worker, w2: Worker, /, *more: Worker) -> MultiPointerTensor: ...


def send_tensor(tensor: torch.Tensor, *workers: Worker) -> PointerTensor | MultiPointerTensor:
    """Send ``tensor`` to one worker (a pointer) or several (a MultiPointerTensor).

    The local tensor is left as it is.

    Example:
        >>> x_ptr = torch.tensor([1, 2, 3]).send(bob)
    """
    if not workers:
        raise PointerError("send() needs at least one worker")
    for w in workers:
        if not isinstance(w, Worker):
            raise TypeError(f"send() expects workers, got {type(w).__name__}")
    if len(workers) > 1:
        return MultiPointerTensor([_send_one(tensor, w) for w in workers])
    return _send_one(tensor, workers[0])


def _send_one(tensor: torch.Tensor, worker: Worker) -> PointerTensor:
    remote_id = new_id()
    seq = worker.store(
        tensor,
        obj_id=remote_id,
        tags=getattr(tensor, "tags", None) or (),
        description=getattr(tensor, "description", None),
    )
    return make_pointer(
        worker,
        remote_id,
        shape=tuple(tensor.shape),
        dtype=tensor.dtype,
        requires_grad=tensor.requires_grad,
        owner=worker.owner,
        id=new_id(),
        seq=seq,
    )


def _tag(tensor: torch.Tensor, *tags: str) -> torch.Tensor:
    """Add search tags (``worker.search("tag")`` finds the tensor once sent); returns it."""
    current = set(getattr(tensor, "tags", None) or ())
    current.update(tags)
    tensor.tags = current  # type: ignore[attr-defined]
    return tensor


def _describe(tensor: torch.Tensor, description: str) -> torch.Tensor:
    """Attach a human description that travels with the tensor; returns it."""
    tensor.description = description  # type: ignore[attr-defined]
    return tensor


# -- Module methods -----------------------------------------------------------------------


def module_send(module: nn.Module, worker: Worker) -> nn.Module:
    """Send every parameter and buffer to ``worker``; the module then runs there.

    Parameters stay the same Python objects (an optimizer built earlier keeps them); their
    gradients travel with them. Returns the module.
    """
    if not isinstance(worker, Worker):
        raise TypeError(f"Module.send expects a worker, got {type(worker).__name__}")
    for param in module.parameters():
        if isinstance(param, PointerTensor):
            raise PointerError(f"module is already on worker {param.location.id!r}; get() it first")
    for m in module.modules():
        for _name, local in list(m._parameters.items()):
            if local is not None:
                parameter_to_pointer(local, worker)
        for name, buf in list(m._buffers.items()):
            if buf is not None and not isinstance(buf, PointerTensor):
                m._buffers[name] = _send_one(buf, worker)
    return module


def module_get(module: nn.Module) -> nn.Module:
    """Bring every parameter (with its gradient) and buffer back; returns the module."""
    pending: list[tuple[str, nn.Module, str, PointerTensor, Future[Any]]] = []
    for m in module.modules():
        for name, param in m._parameters.items():
            if isinstance(param, PointerParameter):
                param.check_live()
                _, fut = param.location.submit(Kind.GET, param.id_at_location, True, want_value=True)
                assert fut is not None  # want_value=True always gives a future
                pending.append(("p", m, name, param, fut))
        for name, buf in m._buffers.items():
            if isinstance(buf, PointerTensor):
                _, fut = buf.location.submit(Kind.GET, buf.id_at_location, True, want_value=True)
                assert fut is not None
                pending.append(("b", m, name, buf, fut))
    for kind, m, name, ptr, fut in pending:  # all requests are out: one round trip in all
        value = wait(fut, ptr.location.call_timeout(), f"get of {name}")
        ptr.finish_get(value)
        if kind == "p":
            assert isinstance(ptr, PointerParameter)
            pointer_to_parameter(ptr, value)
        else:
            m._buffers[name] = value
    return module


def module_copy(module: nn.Module) -> nn.Module:
    """A deep copy; for a sent module the copy is made on the worker (remote clones)."""
    return copy.deepcopy(module)


def module_move(module: nn.Module, worker: Worker) -> nn.Module:
    """Move a sent module's parameters to ``worker`` node to node; returns the module."""
    for m in module.modules():
        for store in (m._parameters, m._buffers):
            for _name, ptr in store.items():
                if not isinstance(ptr, PointerTensor):
                    raise PointerError("move() needs a sent module; use send() for a local one")
                if ptr.location is worker:
                    continue
                # Re-point the same object, so optimizers holding it follow the move.
                ptr.take_over(ptr.move(worker))
    return module


def module_location(module: nn.Module) -> Worker | None:
    """Where a sent module's parameters are (None for a local module)."""
    for p in module.parameters():
        return p.location if isinstance(p, PointerTensor) else None
    return None


_installed = False


def _install() -> None:
    global _installed
    if _installed:
        return
    torch.Tensor.send = send_tensor  # type: ignore[attr-defined]
    torch.Tensor.tag = _tag  # type: ignore[attr-defined]
    torch.Tensor.describe = _describe  # type: ignore[attr-defined]
    nn.Module.send = module_send  # type: ignore[attr-defined]
    nn.Module.get = module_get  # type: ignore[attr-defined]
    nn.Module.copy = module_copy  # type: ignore[attr-defined]
    nn.Module.move = module_move  # type: ignore[attr-defined]
    # jit compiles every property of a module class unless marked unused; ours returns a
    # Worker, which TorchScript cannot type (torch.jit.trace/script failed after hooking).
    nn.Module.location = torch.jit.unused(property(module_location))  # type: ignore[attr-defined,arg-type]
    install_torch_compat()  # TorchScript calls and foreach optimizers on pointers
    torch.utils.data.Dataset.federate = dataset_federate  # type: ignore[attr-defined]
    install_smpc()
    _installed = True



def __getattr__(name: str) -> Any:
    """``sy.hook.local_worker`` (PySyft's Part 08 bis): the latest hook's worker ``me``."""
    if name == "local_worker":
        return (current_federation() or default_federation()).local_worker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
