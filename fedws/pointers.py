"""PointerTensor: what a user holds for data that lives on a worker.

A pointer is a ``torch.Tensor`` subclass with no data of its own: a meta-device shell that
carries the remote object's shape and dtype, plus ``(location, id_at_location)``. Its
``__torch_function__`` turns every torch call — functions, methods, operators, ``.grad`` —
into a command, so ``nn.Module`` forward passes and ``torch.optim`` optimizers work on
pointers unchanged. Result ids are drawn here, before anything is sent, so the result
pointer exists at once; ``await ptr`` (or ``ptr.wait()``) says when the node has made it.

The result's shape comes from running the op on meta tensors. On this torch that costs
20-150 us, so results are cached by (op, argument signatures); the cache makes a repeated
op cost a dict lookup. When the meta run fails (no meta kernel, data-dependent shape, or a
genuine error) the command is sent anyway and the pointer's shape is asked of the node
when needed; a genuine error surfaces on ``get``/``await``, like every remote error.
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Self

import torch
from torch._C import DisableTorchFunctionSubclass

from .exceptions import LocationError, OpNotAllowedError, PointerError
from .protocol.codec import DTYPE_NAMES, DTYPES, ObjRef, PointerRef
from .protocol.ids import new_id, planned_result_ids
from .protocol.messages import Kind
from .protocol.ops import is_inplace, op_name

if TYPE_CHECKING:
    from .client.worker import Worker

__all__ = ["PointerTensor", "PointerParameter", "MultiPointerTensor", "RemoteResult", "make_pointer"]

Sig = tuple[tuple[int, ...], torch.dtype, bool]


class _Ownership:
    """Deletes the remote object when the last pointer holding it is collected."""

    __slots__ = ("worker", "obj_id", "active", "__weakref__")

    def __init__(self, worker: Worker, obj_id: int, active: bool) -> None:
        self.worker = worker
        self.obj_id = obj_id
        self.active = active

    def __del__(self) -> None:
        if self.active:
            try:
                self.worker.queue_delete(self.obj_id)
            except Exception:  # interpreter shutdown; nothing useful left to do
                pass


_SHELLS: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}


def _shell(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    key = (shape, dtype)
    t = _SHELLS.get(key)
    if t is None:
        t = torch.empty(shape, dtype=dtype, device="meta")
        if len(_SHELLS) < 4096:
            _SHELLS[key] = t
    return t


def _can_grad(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


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
) -> PointerTensor:
    """Build a pointer to ``id_at_location`` on ``location``.

    ``owns``: dropping the pointer deletes the remote object (False for search results).
    ``shape=None``: the shape is not known yet; it is asked of the node when needed.
    """
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    rg = bool(requires_grad) and _can_grad(dtype)
    known = shape is not None
    shp: tuple[int, ...] = tuple(shape) if shape is not None else ()
    ptr = torch.Tensor._make_subclass(cls or PointerTensor, _shell(shp, dtype), rg)
    _attach(ptr, location, id_at_location, owner, id, seq, owns, (shp, dtype, rg) if known else None)
    return ptr  # type: ignore[return-value]


def _attach(
    ptr: torch.Tensor,
    location: Worker,
    id_at_location: int,
    owner: Worker,
    id: int | None,
    seq: int,
    owns: bool,
    sig: Sig | None,
) -> None:
    d = ptr.__dict__
    d["location"] = location
    d["id_at_location"] = id_at_location
    d["id"] = id_at_location if id is None else id
    d["owner"] = owner
    d["_seq"] = seq
    d["_sig"] = sig
    d["_ownership"] = _Ownership(location, id_at_location, owns)
    d["_gotten"] = False


class RemoteResult:
    """Something a request made on ``location`` (request ``_seq``): it can be awaited.

    Shared by pointers and pointer plans, so ``await``, ``wait()`` and ``future()`` mean
    the same everywhere: the node has run the request, or its error is raised.
    """

    location: Worker
    _seq: int

    def future(self) -> Future[Any]:
        """A future that completes (with None) once the node has run the request.

        It fails with the remote error if the request failed.
        """
        return self.location.ack_future(self._seq)

    def wait(self, timeout: float | None = None) -> Self:
        """Block until the node has run the request; raise its error if it failed."""
        from .client.io_thread import wait

        wait(self.future(), self.location.call_timeout(timeout), f"waiting for {self!r}")
        return self

    def __await__(self) -> Any:
        return self._await_made().__await__()

    async def _await_made(self) -> Self:
        await asyncio.wrap_future(self.future())
        return self


class PointerTensor(RemoteResult, torch.Tensor):
    """A tensor that lives on ``location`` under ``id_at_location``.

    Attributes:
        location: the Worker holding the data.
        id_at_location: the object's id there.
        id: this pointer's own id (what a pointer chain stores it under).
        owner: the worker holding this pointer (``sy.local_worker`` on the coordinator).
    """

    location: Worker
    id_at_location: int
    id: int
    owner: Worker
    _seq: int
    _sig: Sig | None
    _ownership: _Ownership
    _gotten: bool

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        local = _LOCAL.get(func)
        if local is not None:
            return local(func, args, kwargs)
        return _remote_call(func, args, kwargs)

    # -- wire -----------------------------------------------------------------------------

    def __fedws_encode__(self) -> PointerRef:
        sig = self._sig
        return PointerRef(
            self.location.id,
            self.location.address,
            self.id_at_location,
            self.id,
            None if sig is None else sig[0],
            DTYPE_NAMES[self._dtype()],
            bool(sig[2]) if sig else False,
        )

    def _fedws_release(self) -> None:
        """This pointer's data now belongs to whoever received the pointer."""
        self._ownership.active = False

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

    def _check_live(self) -> None:
        if self._gotten:
            raise PointerError(
                f"{self!r} was already retrieved with get(); its remote object is gone"
            )

    def get(self, *, timeout: float | None = None) -> Any:
        """Bring the value back and delete it from the worker.

        Raises:
            RemoteError: the command that made this object failed on the node.
        """
        self._check_live()
        value = self.location.request(Kind.GET, self.id_at_location, True, timeout=timeout)
        self._raise_if_last_op_failed(value)
        self._mark_gotten()
        return value

    def _raise_if_last_op_failed(self, value: Any) -> None:
        """An in-place op on this object failed: put the value back and raise its error.

        The value is not lost: it is stored again under the same id, and the pointer stays
        usable.
        """
        err = self.location.error_of(self._seq) if self._seq else None
        if err is not None:
            self.__dict__["_seq"] = self.location.store(value, obj_id=self.id_at_location)
            raise err

    async def get_async(self, *, timeout: float | None = None) -> Any:
        """``await ptr.get_async()``: the async form of :meth:`get`."""
        self._check_live()
        value = await self.location.request_async(Kind.GET, self.id_at_location, True, timeout=timeout)
        self._raise_if_last_op_failed(value)
        self._mark_gotten()
        return value

    def _mark_gotten(self) -> None:
        self._ownership.active = False
        self.__dict__["_gotten"] = True

    def send(self, *workers: Worker) -> PointerTensor:
        """Send this *pointer* to ``worker``: a pointer to a pointer (the data stays put)."""
        if len(workers) != 1:
            raise PointerError("a pointer can be sent to exactly one worker")
        (worker,) = workers
        self._check_live()
        if worker is not self.location and self._seq > self.location.session.acked:
            # `worker` will reach our location over its own link, which can overtake the
            # commands still queued on ours: let the data exist before anyone follows us.
            self.wait()
        seq = worker.store(self, obj_id=self.id)
        self._ownership.active = False  # the pointer on `worker` owns the data now
        sig = self._sig
        return make_pointer(
            worker,
            self.id,
            shape=None if sig is None else sig[0],
            dtype=self._dtype(),
            requires_grad=bool(sig and sig[2]),
            owner=self.owner,
            seq=seq,
            id=new_id(),
        )

    def remote_get(self) -> PointerTensor:
        """For a pointer to a pointer: move the data to where the inner pointer is.

        The data goes node to node; the coordinator never sees it. Returns ``self``.
        """
        self._check_live()
        seq, _ = self.location.submit(Kind.CMD, "fedws.remote_get", [self.id_at_location], {}, [])
        self.__dict__["_seq"] = seq
        return self

    def move(self, worker: Worker) -> PointerTensor:
        """Move the data to ``worker`` directly from its current location."""
        if worker is self.location:
            return self
        return self.send(worker).remote_get()

    def __deepcopy__(self, memo: dict[int, Any]) -> PointerTensor:
        copy = _remote_call(torch.Tensor.clone, (self,), {})
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


def _parameter_shell(ptr: PointerTensor, local_class: type) -> PointerTensor:
    """``ptr`` as a PointerParameter on a CPU zero-stride shell, like ``Module.send`` makes.

    A meta-device pointer cannot become a local Parameter on ``get`` (torch refuses to set
    CPU data into a meta tensor), so parameters of a copied module get the same shell as
    parameters of a sent one.
    """
    sig = ptr._sig
    if sig is None:
        ptr.__class__ = PointerParameter
        return ptr
    shape, dtype, rg = sig
    shell = torch.nn.Parameter(torch.empty_strided(shape, [0] * len(shape), dtype=dtype), requires_grad=rg)
    shell.__class__ = PointerParameter
    shell.__dict__.update(ptr.__dict__)  # location, ids and the same _Ownership object
    shell.__dict__["_local_class"] = local_class
    return shell  # type: ignore[return-value]


# -- results and commands -------------------------------------------------------------------


class _Scan:
    __slots__ = ("location", "key", "cacheable", "first", "any_grad", "local")

    def __init__(self) -> None:
        self.location: Worker | None = None
        self.key: list[Any] = []
        self.cacheable = True
        self.first: PointerTensor | None = None
        self.any_grad = False
        self.local: torch.Tensor | None = None

    def check(self) -> None:
        if self.local is not None:
            raise LocationError(
                f"cannot mix a local tensor with {self.first!r}, which lives on worker "
                f"{self.location.id!r}: send the tensor there first (tensor.send(worker)) "  # type: ignore[union-attr]
                f"or bring the pointer back (ptr.get()); local tensor: {self.local!r:.60}"
            )


_SIMPLE = (int, float, bool, str, type(None), torch.dtype)


def _wire(obj: Any, scan: _Scan) -> Any:
    """Replace pointers by ObjRefs, check they share a location, build the cache key."""
    if isinstance(obj, PointerTensor):
        if obj._gotten:
            obj._check_live()
        loc = obj.location
        if scan.location is None:
            scan.location = loc
            scan.first = obj
        elif loc is not scan.location:
            raise LocationError(
                f"{obj!r} is on worker {loc.id!r} but {scan.first!r} is on worker "
                f"{scan.location.id!r}; move one of them first (ptr.move(worker))"
            )
        sig = obj._sig
        if sig is None:
            scan.cacheable = False
        else:
            scan.key.append(sig)
            if sig[2]:
                scan.any_grad = True
        return ObjRef(obj.id_at_location)
    t = type(obj)
    if t is list or t is tuple:
        scan.key.append((t, len(obj)))
        out = [_wire(x, scan) for x in obj]
        return out if t is list else tuple(out)
    if t is dict:
        scan.key.append((dict, tuple(obj)))
        return {k: _wire(v, scan) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        scan.local = obj  # reported once every pointer was seen, so the message names them
        return obj
    if isinstance(obj, MultiPointerTensor):
        raise LocationError("cannot mix a MultiPointerTensor into a single-worker op")
    if t in _SIMPLE:
        scan.key.append((t, obj))
    elif t is slice:
        scan.key.append((slice, obj.start, obj.stop, obj.step))
    elif isinstance(obj, (torch.Size, torch.device)) or obj is Ellipsis:
        scan.key.append((t, obj))
    else:
        scan.cacheable = False
    return obj


def _to_meta(obj: Any) -> Any:
    if isinstance(obj, PointerTensor):
        sig = obj._sig
        assert sig is not None
        return torch.empty(sig[0], dtype=sig[1], device="meta")
    t = type(obj)
    if t is list or t is tuple:
        out = [_to_meta(x) for x in obj]
        return out if t is list else tuple(out)
    if t is dict:
        return {k: _to_meta(v) for k, v in obj.items()}
    return obj


# A result spec: ("T", shape, dtype) | ("S", container_type, [specs]) | ("N",) | ("U",)
_UNKNOWN = ("U",)
_NONE = ("N",)
_SPECS: dict[tuple[Any, ...], Any] = {}
_SPEC_CACHE_MAX = 65536


def _spec_of(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return ("T", tuple(out.shape), out.dtype)
    if out is None:
        return _NONE
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return ("S", type(out), [_spec_of(o) for o in out])
    return _UNKNOWN


def _infer(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], scan: _Scan) -> Any:
    key = None
    if scan.cacheable:
        key = (func, *scan.key)
        try:
            spec = _SPECS.get(key)
        except TypeError:
            key, spec = None, None
        if spec is not None:
            return spec
    if not scan.cacheable and any(
        isinstance(a, PointerTensor) and a._sig is None for a in _iter_leaves((args, kwargs))
    ):
        return _UNKNOWN
    try:
        with DisableTorchFunctionSubclass(), torch.no_grad():
            out = func(*_to_meta(list(args)), **_to_meta(kwargs))
        spec = _spec_of(out)
    except Exception:
        spec = _UNKNOWN
    if key is not None and len(_SPECS) < _SPEC_CACHE_MAX:
        _SPECS[key] = spec
    return spec


def _iter_leaves(obj: Any) -> Iterator[Any]:
    if isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _iter_leaves(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _iter_leaves(x)
    else:
        yield obj


_NON_DIFFERENTIABLE = frozenset(
    {"Tensor.detach", "torch.detach", "Tensor.data", "Tensor.grad"}
)


def _grad_mode() -> tuple[bool, ...]:
    """The caller's grad mode, sent only when off (optimizer steps run under no_grad).

    Grad mode is thread-local: the node must be told, or an in-place update of a parameter
    that requires grad fails there.
    """
    return () if torch.is_grad_enabled() else (False,)


def _take_ids(n: int) -> list[int]:
    planned = planned_result_ids.get()
    if planned:
        ids, planned[:] = planned[:n], planned[n:]
        while len(ids) < n:
            ids.append(new_id())
        return ids
    return [new_id() for _ in range(n)]


def _count(spec: Any) -> int:
    if spec[0] == "S":
        return sum(_count(s) for s in spec[2])
    if spec[0] == "N":
        return 0
    return 1


def _build(spec: Any, ids: Iterator[int], location: Worker, owner: Worker, seq: int, rg: bool) -> Any:
    kind = spec[0]
    if kind == "T":
        rid = next(ids)
        return make_pointer(location, rid, shape=spec[1], dtype=spec[2], requires_grad=rg, owner=owner, seq=seq)
    if kind == "S":
        items = [_build(s, ids, location, owner, seq, rg) for s in spec[2]]
        ctype = spec[1]
        if ctype is list:
            return items
        if ctype is tuple:
            return tuple(items)
        try:
            return ctype(items)  # torch.return_types.* named tuples
        except TypeError:
            return tuple(items)
    if kind == "N":
        return None
    rid = next(ids)
    return make_pointer(location, rid, shape=None, dtype=torch.float32, requires_grad=rg, owner=owner, seq=seq)


def _remote_call(
    func: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    name: str | None = None,
    spec: Any = None,
) -> Any:
    name = name or op_name(func)
    if name is None:
        raise OpNotAllowedError(
            f"{getattr(func, '__qualname__', func)!r} is not an allowed remote op",
            op=str(getattr(func, "__name__", func)),
        )
    if "out" in kwargs and kwargs["out"] is not None:
        raise PointerError(f"{name}: out= is not supported on pointers; use the returned pointer")
    scan = _Scan()
    wire_args = [_wire(a, scan) for a in args]
    wire_kwargs = {k: _wire(v, scan) for k, v in kwargs.items()} if kwargs else {}
    scan.check()
    location = scan.location
    assert location is not None and scan.first is not None
    target = scan.first
    if is_inplace(name) and args and isinstance(args[0], PointerTensor):
        target = args[0]
        spec = _infer(func, args, kwargs, scan) if name.endswith(_SHAPE_CHANGING) else None
        seq, _ = location.submit(Kind.CMD, name, wire_args, wire_kwargs, [], *_grad_mode())
        target.__dict__["_seq"] = seq
        if spec is not None and spec[0] == "T" and target._sig is not None:
            _reshape_shell(target, spec[1])
        if name.endswith("requires_grad_"):
            flag = bool(args[1]) if len(args) > 1 else bool(kwargs.get("requires_grad", True))
            _set_local_requires_grad(target, flag)
        return target if "__setitem__" not in name else None
    if spec is None:
        spec = _infer(func, args, kwargs, scan)
    n = _count(spec)
    ids = _take_ids(n)
    seq, _ = location.submit(Kind.CMD, name, wire_args, wire_kwargs, ids, *_grad_mode())
    rg = scan.any_grad and torch.is_grad_enabled() and name not in _NON_DIFFERENTIABLE
    return _build(spec, iter(ids), location, target.owner, seq, rg)


_SHAPE_CHANGING = (
    "unsqueeze_", "squeeze_", "t_", "transpose_", "resize_", "resize_as_", "swapdims_",
    "swapaxes_", "as_strided_",
)


def _reshape_shell(ptr: PointerTensor, shape: tuple[int, ...]) -> None:
    sig = ptr._sig
    assert sig is not None
    if tuple(sig[0]) == tuple(shape):
        return
    with DisableTorchFunctionSubclass():
        if ptr.device.type == "meta":
            ptr.set_(torch.empty(shape, dtype=sig[1], device="meta"))  # type: ignore[call-overload]
        else:
            ptr.data = torch.empty_strided(shape, [0] * len(shape), dtype=sig[1])
    ptr.__dict__["_sig"] = (tuple(shape), sig[1], sig[2])


def _set_local_requires_grad(ptr: PointerTensor, flag: bool) -> None:
    with DisableTorchFunctionSubclass():
        if ptr.is_leaf:
            ptr.requires_grad_(flag)
    sig = ptr._sig
    if sig is not None:
        ptr.__dict__["_sig"] = (sig[0], sig[1], flag)


# -- calls answered without the node ---------------------------------------------------------


def _local(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    ptr = args[0]
    if isinstance(ptr, PointerTensor) and ptr._sig is None and func in _SHAPE_QUERIES:
        shape = ptr.shape_remote()
        with DisableTorchFunctionSubclass():
            ptr.set_(torch.empty(shape, dtype=ptr.dtype, device="meta"))  # type: ignore[call-overload]
        ptr.__dict__["_sig"] = (tuple(shape), ptr._dtype(), bool(ptr.requires_grad))
    with DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def _none(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    return None


def _grad_get(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    ptr = args[0]
    sig = ptr._sig
    if not (sig and sig[2]):
        return None
    return _remote_call(func, args, kwargs, name="Tensor.grad", spec=("T", sig[0], sig[1]))


def _setter(op: str) -> Callable[..., Any]:
    def set_remote(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        ptr, value = args[0], args[1]
        scan = _Scan()
        wire = [_wire(ptr, scan), _wire(value, scan)]
        scan.check()
        seq, _ = ptr.location.submit(Kind.CMD, op, wire, {}, [], *_grad_mode())
        ptr.__dict__["_seq"] = seq
        return None

    return set_remote


def _requires_grad_set(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    return _remote_call(torch.Tensor.requires_grad_, (args[0], bool(args[1])), {})


def _backward(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    scan = _Scan()
    wire_args = [_wire(a, scan) for a in args]
    wire_kwargs = {k: _wire(v, scan) for k, v in kwargs.items() if v is not None and v is not False}
    scan.check()
    ptr = args[0]
    seq, _ = ptr.location.submit(Kind.CMD, "Tensor.backward", wire_args, wire_kwargs, [])
    ptr.__dict__["_seq"] = seq
    return None


def _iter(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    return iter(_remote_call(torch.Tensor.unbind, (args[0], 0), {}))


def _data_dependent(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    name = getattr(func, "__name__", str(func))
    raise PointerError(
        f"{name} needs the value of {args[0]!r}, which lives on worker "
        f"{args[0].location.id!r}; call .get() first"
    )


_T: Any = torch.Tensor  # Any: the stubs type properties as values, not descriptors
_SHAPE_QUERIES = {
    _T.shape.__get__, _T.size, _T.dim, _T.ndim.__get__, _T.numel, _T.nelement,
    _T.__len__, _T.ndimension, _T.stride,
}
_LOCAL: dict[Any, Callable[..., Any]] = {}
_LOCAL_NAMES = (
    "dtype", "requires_grad", "is_leaf", "device", "layout", "is_sparse", "is_quantized",
    "is_cuda", "is_cpu", "is_meta", "retains_grad", "output_nr", "_version", "is_mkldnn",
    "is_nested", "itemsize", "nbytes", "names",
)
for _f in (
    *_SHAPE_QUERIES,
    *(getattr(_T, n).__get__ for n in _LOCAL_NAMES if hasattr(_T, n)), _T.element_size, _T.is_floating_point,
    _T.is_complex, _T.is_signed, _T.__hash__, _T.is_contiguous, _T._is_view, _T.get_device, _T.is_inference, _T.dim_order,
):
    _LOCAL[_f] = _local
_LOCAL[_T.grad_fn.__get__] = _none
_LOCAL[_T.grad.__get__] = _grad_get
_LOCAL[_T.grad.__set__] = _setter("fedws.set_grad")
_LOCAL[_T.data.__set__] = _setter("fedws.set_data")
_LOCAL[_T.requires_grad.__set__] = _requires_grad_set
_LOCAL[_T.backward] = _backward
_LOCAL[_T.__iter__] = _iter
for _f in (
    _T.__bool__, _T.item, _T.tolist, _T.numpy, _T.__int__, _T.__float__, _T.__index__,
    _T.__complex__, _T.__array__, _T.__contains__, _T.__reversed__,
):
    _LOCAL[_f] = _data_dependent


# -- search results and multi-pointers -------------------------------------------------------


def pointer_from_description(worker: Worker, d: Sequence[Any]) -> PointerTensor:
    """A non-owning pointer for one entry of a search reply."""
    obj_id, _type, shape, dtype, rg = d[0], d[1], d[2], d[3], d[4]
    return make_pointer(
        worker, obj_id, shape=shape, dtype=dtype, requires_grad=rg, owner=worker.owner, id=new_id(), owns=False
    )


class MultiPointerTensor:
    """The same tensor sent to several workers (``x.send(bob, alice)``).

    Arithmetic applies to every child; ``get()`` returns the values as a list, or their sum
    with ``sum_results=True``.
    """

    def __init__(self, children: Sequence[PointerTensor]) -> None:
        self.children: dict[str, PointerTensor] = {p.location.id: p for p in children}

    def get(self, sum_results: bool = False) -> Any:
        values = [p.get() for p in self.children.values()]
        if sum_results:
            total = values[0]
            for v in values[1:]:
                total = total + v
            return total
        return values

    def _map(self, fn: Callable[..., Any], other: Any = None) -> MultiPointerTensor:
        out = []
        for wid, p in self.children.items():
            if isinstance(other, MultiPointerTensor):
                if wid not in other.children:
                    raise LocationError(f"the other MultiPointerTensor has nothing on worker {wid!r}")
                o = other.children[wid]
            else:
                o = other
            out.append(fn(p, o))
        return MultiPointerTensor(out)

    def __getattr__(self, name: str) -> Callable[..., MultiPointerTensor]:
        """Any tensor method applies to every child: ``mp.sum()``, ``mp.view(-1)``."""
        if name.startswith("_") or not callable(getattr(torch.Tensor, name, None)):
            raise AttributeError(f"MultiPointerTensor has no attribute {name!r}")

        def method(*args: Any, **kwargs: Any) -> MultiPointerTensor:
            return self._map(lambda p, _: getattr(p, name)(*args, **kwargs))

        return method

    def __repr__(self) -> str:
        inner = "\n\t-> ".join(f"{wid}: {p!r}" for wid, p in self.children.items())
        return f"[MultiPointerTensor]\n\t-> {inner}"


def _binary(op: Callable[[Any, Any], Any]) -> Callable[[MultiPointerTensor, Any], MultiPointerTensor]:
    def apply(self: MultiPointerTensor, other: Any) -> MultiPointerTensor:
        return self._map(op, other)

    return apply


def _reflected(op: Callable[[Any, Any], Any]) -> Callable[[MultiPointerTensor, Any], MultiPointerTensor]:
    def apply(self: MultiPointerTensor, other: Any) -> MultiPointerTensor:
        return self._map(lambda p, o: op(o, p), other)

    return apply


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
              "and", "or", "xor", "eq", "ne", "lt", "le", "gt", "ge"):
    _op = getattr(operator, _name if _name not in ("and", "or") else f"{_name}_")
    setattr(MultiPointerTensor, f"__{_name}__", _binary(_op))
    if _name not in ("eq", "ne", "lt", "le", "gt", "ge"):
        setattr(MultiPointerTensor, f"__r{_name}__", _reflected(_op))
for _name in ("neg", "abs", "pos", "invert"):
    setattr(MultiPointerTensor, f"__{_name}__", (lambda f: lambda self: self._map(lambda p, _: f(p)))(getattr(operator, _name)))
