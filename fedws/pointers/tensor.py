"""PointerTensor: what a user holds for data that lives on a worker.

A pointer is a ``torch.Tensor`` subclass with no data of its own: a meta-device shell that
carries the remote object's shape and dtype, plus ``(location, id_at_location)``. Its
``__torch_function__`` hands every torch call to the handler :mod:`.dispatch` installs
(see :func:`set_torch_function`), which turns it into a command; so ``nn.Module`` forward
passes and ``torch.optim`` optimizers work on pointers unchanged.

This module holds the object itself: its state, its life cycle (``get``, ``send``,
``move``), how it encodes on the wire, and the conversions between module parameters and
pointers that ``Module.send``/``get`` use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch._C import DisableTorchFunctionSubclass

from ..client.stream import get_chunked, should_stream
from ..exceptions import PointerError
from ..protocol.codec import DTYPE_NAMES, DTYPES, PointerRef
from ..protocol.ids import new_id
from ..protocol.messages import Kind
from .meta import Signature, meta_shell
from .ownership import Ownership, claim, remember
from .result import RemoteResult

if TYPE_CHECKING:
    from ..client.worker import Worker

__all__ = [
    "PointerTensor",
    "PointerParameter",
    "TorchFunction",
    "install_torch_function",
    "make_pointer",
    "pointer_from_description",
    "parameter_to_pointer",
    "pointer_to_parameter",
    "learn_shape",
    "reshape_shell",
    "set_local_requires_grad",
]

TorchFunction = Callable[[Callable[..., Any], Sequence[Any], dict[str, Any]], Any]
"""``handler(func, args, kwargs)``: what a torch call on a pointer does."""


def _not_installed(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    raise RuntimeError("fedws.pointers.dispatch is not loaded: import fedws.pointers")


_special: Mapping[Any, TorchFunction] = {}
_remote: TorchFunction = _not_installed


def install_torch_function(special: Mapping[Any, TorchFunction], remote: TorchFunction) -> None:
    """Install what torch calls on pointers do (:mod:`.dispatch` does, once, on import).

    ``special[func]`` handles the calls answered locally or specially; every other call
    goes to ``remote``, which sends it as a command. Both build result pointers of this
    module's class, so this module cannot import them without an import cycle; the package
    ``__init__`` imports :mod:`.dispatch`, so they are in place before any pointer exists.
    The lookup is inlined in ``__torch_function__``: it runs on every op.
    """
    global _special, _remote
    _special, _remote = special, remote


def _can_grad(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


class PointerTensor(RemoteResult, torch.Tensor):
    """A tensor that lives on ``location`` under ``id_at_location``.

    Attributes:
        location: the Worker holding the data.
        id_at_location: the object's id there.
        id: this pointer's own id (what a pointer chain stores it under).
        owner: the worker holding this pointer (``sy.local_worker`` on the coordinator).
        seq: the request that last changed the object (``await ptr`` waits for it).
        signature: shape, dtype and requires_grad as known locally; None while the shape
            is unknown (an op without a meta kernel), until it is asked of the node.
        ownership: deletes the remote object when the last pointer holding it dies.
        gotten: ``get()`` brought the value back; the remote object is gone.
    """

    location: Worker
    id_at_location: int
    id: int
    owner: Worker
    seq: int
    signature: Signature | None
    ownership: Ownership
    gotten: bool

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        handler = _special.get(func)
        if handler is not None:
            return handler(func, args, kwargs or {})
        return _remote(func, args, kwargs or {})

    # -- wire -----------------------------------------------------------------------------

    def __fedws_encode__(self) -> PointerRef:
        sig = self.signature
        return PointerRef(
            self.location.id,
            self.location.address,
            self.id_at_location,
            self.id,
            None if sig is None else sig.shape,
            DTYPE_NAMES[self._dtype()],
            sig.requires_grad if sig else False,
        )

    def _fedws_release(self) -> None:
        """This pointer's data now belongs to whoever received the pointer (the node calls it)."""
        self.ownership.active = False

    def _dtype(self) -> torch.dtype:
        with DisableTorchFunctionSubclass():
            return self.dtype

    # -- display --------------------------------------------------------------------------

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        owner = getattr(self.owner, "id", self.owner)
        return f"[{type(self).__name__} | {owner}:{self.id} -> {self.location.id}:{self.id_at_location}]"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format(repr(self), spec)

    # -- life cycle -----------------------------------------------------------------------

    def check_live(self) -> None:
        """Raise PointerError if ``get()`` already brought the value back."""
        if self.gotten:
            raise PointerError(f"{self!r} was already retrieved with get(); its remote object is gone")

    def get(self, *, timeout: float | None = None, dp: bool = False) -> Any:
        """Bring the value back and delete it from the worker.

        ``dp=True`` asks a private node for a differentially private copy of a private
        value (clipped and noised by the node, charged to your privacy budget there).

        Raises:
            RemoteError: the command that made this object failed on the node.
            PermissionDeniedError: the node's policy does not let the value leave.
            PrivacyBudgetExceededError: a DP release would exceed your budget on the node.
        """
        self.check_live()
        fields = (self.id_at_location, True, "dp") if dp else (self.id_at_location, True)
        sig = self.signature
        if sig is not None and should_stream(self.location, sig.shape, self._dtype()):  # over one frame
            value = get_chunked(self.location, self.id_at_location, release="dp" if dp else None, timeout=timeout)
        else:
            value = self.location.request(Kind.GET, *fields, timeout=timeout)
        self.finish_get(value)
        return value

    def persist(self) -> PointerTensor:
        """Keep the object on the node after this session ends; returns ``self``.

        A private node frees a session's objects once its last connection has been closed
        (or lost) for longer than the node's grace period (``session_grace_s``) without a
        reconnect of the same handle. A durable object stays, still this session's: the same
        handle reaches it after ``reconnect()``, and ``get()`` or ``del`` still free it. Only
        the object's owner may make it durable; ``ptr.wait()`` raises if the node refused.
        """
        self.check_live()
        self.seq, _ = self.location.submit(Kind.CMD, "fedws.persist", [self.id_at_location], {}, [])
        return self

    async def get_async(self, *, timeout: float | None = None) -> Any:
        """``await ptr.get_async()``: the async form of :meth:`get`."""
        self.check_live()
        value = await self.location.request_async(Kind.GET, self.id_at_location, True, timeout=timeout)
        self.finish_get(value)
        return value

    def finish_get(self, value: Any) -> None:
        """Account for ``value``, which a GET of this object returned.

        Callers that send the GET themselves (``Module.get`` sends every parameter's at
        once) call it too. If an in-place op on the object failed, the value is stored
        again under the same id, the pointer stays usable, and that op's error is raised.
        Otherwise the pointer is spent: the node deleted the object.

        Raises:
            RemoteError: the last in-place op on this object failed on the node.
        """
        err = self.location.error_of(self.seq) if self.seq else None
        if err is not None:
            self.seq = self.location.store(value, obj_id=self.id_at_location)
            raise err
        self.ownership.active = False
        self.gotten = True

    def send(self, *workers: Worker) -> PointerTensor:
        """Send this *pointer* to ``worker``: a pointer to a pointer (the data stays put).

        The pointer on ``worker`` owns the data from then on; this one gives its ownership
        up, and takes it up again if the pointer comes back (``p.get()``). Sent to the worker
        it points at, a pointer is that worker's own object: the result is a second pointer
        to the same object sharing this one's ownership, never a chain to itself (PySyft
        resolved such a pointer to the object too).
        """
        if len(workers) != 1:
            raise PointerError("a pointer can be sent to exactly one worker")
        (worker,) = workers
        self.check_live()
        if worker is self.location:
            return self._alias()
        # A private node lets another node reach our object only once we shared it.
        self.seq, _ = self.location.submit(Kind.CMD, "fedws.share", [self.id_at_location], {}, [])
        if self.seq > self.location.session.acked:
            # `worker` will reach our location over its own link, which can overtake the
            # commands still queued on ours: let the data exist before anyone follows us.
            self.wait()
        seq = worker.store(self, obj_id=self.id)
        if self.ownership.active:
            remember(self.owner, self.ownership)  # taken up again if the pointer comes back
        self.ownership.active = False  # the pointer on `worker` owns the data now
        sig = self.signature
        return make_pointer(
            worker,
            self.id,
            shape=None if sig is None else sig.shape,
            dtype=self._dtype(),
            requires_grad=bool(sig and sig.requires_grad),
            owner=self.owner,
            seq=seq,
            id=new_id(),
        )

    def _alias(self) -> PointerTensor:
        """A second pointer to this pointer's object, sharing its Ownership (one owner)."""
        sig = self.signature
        alias = make_pointer(
            self.location,
            self.id_at_location,
            shape=None if sig is None else sig.shape,
            dtype=self._dtype(),
            requires_grad=bool(sig and sig.requires_grad),
            owner=self.owner,
            seq=self.seq,
            id=new_id(),
            owns=False,  # the Ownership made here is replaced by ours before anyone holds it
        )
        alias.__dict__["ownership"] = self.ownership
        return alias

    def remote_get(self) -> PointerTensor:
        """For a pointer to a pointer: move the data to where the inner pointer is.

        The data goes node to node; the coordinator never sees it. Returns ``self``.
        """
        self.check_live()
        self.seq, _ = self.location.submit(Kind.CMD, "fedws.remote_get", [self.id_at_location], {}, [])
        return self

    def mid_get(self) -> PointerTensor:
        """PySyft's name for what :meth:`remote_get` asks the location to do: the pointer
        held there calls ``get()`` and the data takes its place. Returns ``self``."""
        return self.remote_get()

    def end_get(self) -> Any:
        """Call ``get()`` on the *last* pointer of the chain that starts here.

        For ``me -> alice -> bob`` the pointer alice holds gets bob's data, node to node, and
        this pointer (returned) then points at the data on alice. For a chain of one (this
        pointer points at the data) it is :meth:`get` and returns the value. One round trip
        per hop: each node asks the next whether its object is still a pointer.
        """
        self.check_live()
        further = new_id()
        self.location.submit(Kind.CMD, "fedws.end_get", [self.id_at_location], {}, [further])
        if self.location.request(Kind.GET, further, True):
            return self  # a pointer further down the chain did the get
        return self.get()

    def remote_send(self, worker: Worker, requires_grad: bool = False) -> PointerTensor:
        """Ask the location to send the data to ``worker`` itself, keeping a pointer to it.

        Afterwards this pointer points at that pointer (``me -> alice -> worker``); the
        data went node to node. ``requires_grad``: the copy on ``worker`` is a leaf that
        requires grad. Returns ``self``.
        """
        self.check_live()
        _check_worker(worker, "remote_send")
        self.seq, _ = self.location.submit(
            Kind.CMD, "fedws.remote_send", [self.id_at_location, worker.id, new_id(), bool(requires_grad)], {}, []
        )
        return self

    def move(self, worker: Worker, requires_grad: bool = False) -> Any:
        """Move the data to ``worker`` directly from its current location.

        The data goes node to node and leaves its old location (the pointer there is
        spent; use the returned one). Moving to the coordinator itself is :meth:`get`.

        ``requires_grad=True`` (SplitNN's cut): the data stays where it is, part of the
        graph there, and ``worker`` gets a detached copy that requires grad. The next
        ``backward()`` run on ``worker`` sends the copy's gradient back across the cut and
        runs ``backward`` with it on the original, so the layers before the cut learn too.
        """
        _check_worker(worker, "move")
        if worker is self.owner:
            return self.get()
        if worker is self.location:
            return self
        if requires_grad:
            return _cut(self, worker)
        return self.send(worker).remote_get()

    def copy(self) -> PointerTensor:
        """A new remote object with the same value (PySyft's ``copy``: a remote clone)."""
        self.check_live()
        return cast(PointerTensor, torch.Tensor.clone(self))

    def backward(
        self,
        gradient: Any = None,
        retain_graph: bool | None = None,
        create_graph: bool = False,
        inputs: Any = None,
    ) -> None:
        """``backward`` on the node; then gradients flow back across SplitNN cuts made by
        ``move(worker, requires_grad=True)`` into this pointer's location."""
        torch.Tensor.backward(self, gradient, retain_graph, create_graph, inputs)  # type: ignore[no-untyped-call]
        _flow_back(self.location)

    def take_over(self, other: PointerTensor) -> None:
        """Point at ``other``'s object from now on, owning it; ``other`` gives it up.

        ``Module.move`` re-points each Parameter object this way, so optimizers holding the
        Parameter follow the move.
        """
        d = self.__dict__
        d["location"], d["id_at_location"], d["seq"] = other.location, other.id_at_location, other.seq
        d["ownership"], other.__dict__["ownership"] = other.ownership, d["ownership"]
        other.ownership.active = False

    def __deepcopy__(self, memo: dict[int, Any]) -> PointerTensor:
        copy = cast(PointerTensor, torch.Tensor.clone(self))  # a remote clone
        if isinstance(self, PointerParameter):
            copy = _parameter_shell(copy, self.__dict__.get("_local_class", torch.nn.Parameter))
        memo[id(self)] = copy
        return copy

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise PointerError("pointers cannot be pickled; use get() to bring the value back")

    def shape_remote(self) -> torch.Size:
        """Ask the node for the shape (used when it could not be inferred locally)."""
        shape, _, _ = self.location.request(Kind.INFO, "meta", self.id_at_location)
        return torch.Size(shape)


class PointerParameter(PointerTensor, torch.nn.Parameter):
    """A module parameter whose data was sent to a worker (``model.send(bob)``).

    The Parameter object stays the same Python object — only its class changes while it is
    remote — so optimizers built before ``send`` keep working after ``get``.
    """


_POINTER_ATTRIBUTES = ("location", "id_at_location", "id", "owner", "seq", "signature", "ownership", "gotten")


def _attach(
    ptr: torch.Tensor,
    location: Worker,
    id_at_location: int,
    owner: Worker,
    id: int | None,
    seq: int,
    owns: bool,
    sig: Signature | None,
    ownership: Ownership | None = None,
) -> None:
    d = ptr.__dict__
    d["location"] = location
    d["id_at_location"] = id_at_location
    d["id"] = id_at_location if id is None else id
    d["owner"] = owner
    d["seq"] = seq
    d["signature"] = sig
    d["ownership"] = Ownership(location, id_at_location, owns) if ownership is None else ownership
    d["gotten"] = False


def _check_worker(worker: Any, what: str) -> None:
    if not hasattr(worker, "submit") or not hasattr(worker, "id"):
        raise TypeError(f"{what}() expects a worker, got {type(worker).__name__}")


def make_pointer(
    location: Worker,
    id_at_location: int,
    *,
    shape: Sequence[int] | None,
    dtype: torch.dtype | str,
    requires_grad: bool,
    owner: Worker,
    id: int | None = None,
    seq: int = 0,
    owns: bool = True,
    cls: type[PointerTensor] | None = None,
    arrived: bool = False,
) -> PointerTensor:
    """Build a pointer to ``id_at_location`` on ``location``.

    Args:
        owns: dropping the pointer deletes the remote object (False for search results).
        arrived: the pointer arrived at ``owner`` (a pointer chain, a pointer brought back
            by ``get``): if ``owner`` still holds the pointer it once sent on, the two share
            that pointer's ownership (see :mod:`.ownership`).
        shape: None when not known yet; it is asked of the node when needed.
        seq: the request that makes the object (``await ptr`` waits for it).
    """
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    rg = bool(requires_grad) and _can_grad(dtype)
    shp: tuple[int, ...] = tuple(shape) if shape is not None else ()
    ptr = torch.Tensor._make_subclass(cls or PointerTensor, meta_shell(shp, dtype), rg)
    # tuple.__new__: the named tuple's own __new__ is a Python function, and this runs per op.
    sig = tuple.__new__(Signature, (shp, dtype, rg)) if shape is not None else None
    _attach(ptr, location, id_at_location, owner, id, seq, owns, sig, claim(owner, location, id_at_location) if arrived else None)
    return ptr


def pointer_from_description(worker: Worker, d: Sequence[Any]) -> PointerTensor:
    """A non-owning pointer for one entry of a search reply ``(id, type, shape, dtype, rg)``."""
    obj_id, _type, shape, dtype, rg = d[0], d[1], d[2], d[3], d[4]
    return make_pointer(
        worker, obj_id, shape=shape, dtype=dtype, requires_grad=rg, owner=worker.owner, id=new_id(), owns=False
    )


# -- module parameters ------------------------------------------------------------------------


def parameter_to_pointer(param: torch.nn.Parameter, worker: Worker) -> PointerParameter:
    """Send ``param`` to ``worker`` and turn the same object into its PointerParameter.

    The object keeps its identity (optimizers hold it) but drops its memory: its data
    becomes a zero-stride shell of the same shape, and its class PointerParameter until
    :func:`pointer_to_parameter` turns it back.
    """
    remote_id = new_id()
    seq = worker.store(param, obj_id=remote_id)
    shape, dtype, rg = tuple(param.shape), param.dtype, param.requires_grad
    local_class = type(param)
    param.grad = None
    param.data = torch.empty_strided(shape, [0] * len(shape), dtype=dtype)
    param.__class__ = PointerParameter
    _attach(param, worker, remote_id, worker.owner, new_id(), seq, True, Signature(shape, dtype, rg))
    param.__dict__["_local_class"] = local_class
    return cast(PointerParameter, param)


def pointer_to_parameter(ptr: PointerParameter, value: torch.Tensor) -> torch.nn.Parameter:
    """Turn ``ptr`` back into the local Parameter it was, holding ``value`` and its grad."""
    local_class = ptr.__dict__.pop("_local_class", torch.nn.Parameter)
    for key in _POINTER_ATTRIBUTES:
        ptr.__dict__.pop(key, None)
    param = cast(torch.nn.Parameter, ptr)
    param.__class__ = local_class
    param.data = value.detach()
    param.grad = value.grad
    return param


def _parameter_shell(ptr: PointerTensor, local_class: type) -> PointerTensor:
    """``ptr`` as a PointerParameter on a CPU zero-stride shell, like ``Module.send`` makes.

    A meta-device pointer cannot become a local Parameter on ``get`` (torch refuses to set
    CPU data into a meta tensor), so parameters of a copied module get the same shell as
    parameters of a sent one.
    """
    sig = ptr.signature
    if sig is None:
        ptr.__class__ = PointerParameter
        return ptr
    shape, dtype, rg = sig
    shell = torch.nn.Parameter(torch.empty_strided(shape, [0] * len(shape), dtype=dtype), requires_grad=rg)
    shell.__class__ = PointerParameter
    shell.__dict__.update(ptr.__dict__)  # location, ids and the same Ownership object
    shell.__dict__["_local_class"] = local_class
    return cast(PointerTensor, shell)


# -- the local shell ------------------------------------------------------------------------


def learn_shape(ptr: PointerTensor) -> None:
    """Ask the node for the shape of a pointer whose shape was unknown; record it locally."""
    shape = ptr.shape_remote()
    with DisableTorchFunctionSubclass():
        ptr.set_(torch.empty(shape, dtype=ptr.dtype, device="meta"))  # type: ignore[call-overload]
        rg = bool(ptr.requires_grad)
    ptr.signature = Signature(tuple(shape), ptr._dtype(), rg)


def reshape_shell(ptr: PointerTensor, shape: tuple[int, ...]) -> None:
    """An in-place op changed the remote shape (``unsqueeze_``): follow it locally."""
    sig = ptr.signature
    assert sig is not None
    if tuple(sig.shape) == tuple(shape):
        return
    with DisableTorchFunctionSubclass():
        if ptr.device.type == "meta":
            ptr.set_(torch.empty(shape, dtype=sig.dtype, device="meta"))  # type: ignore[call-overload]
        else:
            ptr.data = torch.empty_strided(shape, [0] * len(shape), dtype=sig.dtype)
    ptr.signature = Signature(tuple(shape), sig.dtype, sig.requires_grad)


def set_local_requires_grad(ptr: PointerTensor, flag: bool) -> None:
    """``requires_grad_`` ran on the node: mirror the flag on the local shell."""
    with DisableTorchFunctionSubclass():
        if ptr.is_leaf:
            ptr.requires_grad_(flag)
    sig = ptr.signature
    if sig is not None:
        ptr.signature = Signature(sig.shape, sig.dtype, flag)


# -- SplitNN cuts -----------------------------------------------------------------------------

# location -> cuts made into it by move(..., requires_grad=True): (the copy there, the original).
# Both are held until the next backward on that location: the copy's gradient must still be
# reachable then even if the user kept no pointer to the copy (``top(a.move(w, True))``).
_cuts: dict[Any, list[tuple[PointerTensor, PointerTensor]]] = {}
_cuts_lock = threading.Lock()


def _cut(origin: PointerTensor, worker: Worker) -> PointerTensor:
    """A detached copy of ``origin`` on ``worker`` that requires grad, linked back to it."""
    copy = cast(PointerTensor, torch.Tensor.detach(origin)).send(worker).remote_get()
    copy = cast(PointerTensor, torch.Tensor.requires_grad_(copy))
    with _cuts_lock:
        _cuts.setdefault(worker, []).append((copy, origin))
    return copy


def _flow_back(location: Any) -> None:
    """A backward ran on ``location``: send each cut's gradient back to its original."""
    with _cuts_lock:
        cuts = _cuts.pop(location, None)
    for copy, origin in cuts or ():
        if copy.gotten or origin.gotten:
            continue
        grad = copy.grad
        if grad is None:
            continue
        origin.backward(cast(PointerTensor, grad).copy().move(origin.location))
