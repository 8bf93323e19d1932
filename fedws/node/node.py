"""Node: the worker side of the protocol, with no I/O.

``Node.handle(frame) -> reply`` is the whole interface: bytes in, bytes out. Both the
in-process VirtualWorker and the WebSocket server feed it, so a behaviour tested with one
holds for the other. Requests of a frame run in order; a failing request never stops the
ones after it, and its results are stored as :class:`Failure` so that later commands using
them fail with the same error, chained.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from ..exceptions import (
    DecodeError,
    DependencyError,
    EncodeError,
    FedwsError,
    OpNotAllowedError,
    PointerError,
    ProtocolError,
)
from ..protocol import codec
from ..protocol.codec import ObjRef, PointerRef
from ..protocol.errors import error_from_wire, error_to_wire
from ..protocol.ids import planned_result_ids
from ..protocol.messages import FRAME_ERROR_SEQ, Kind
from ..protocol.ops import resolve
from .interpreter import TENSOR_FEDWS_OPS, run_plan, store_plan
from .store import Failure, ObjectStore

__all__ = ["Node"]

log = logging.getLogger("fedws.node")

_NO_VALUE = object()


class Node:
    """One worker's objects and the rules for acting on them.

    Args:
        id: the worker id, used in every error message.
        max_store_bytes: cap on tensor bytes held (None: no cap).
        pointer_factory: turns a PointerRef that arrives (a pointer chain) into a live
            pointer this node can use; given by the runtime that owns the node.
        add_peer: called for ADD_PEER requests; a node without it refuses them.
    """

    def __init__(
        self,
        id: str,
        *,
        max_store_bytes: int | None = None,
        pointer_factory: Callable[[PointerRef], Any] | None = None,
        add_peer: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self.id = id
        self.store = ObjectStore(id, max_store_bytes)
        self.pointer_factory = pointer_factory
        self.add_peer = add_peer
        self.plans: dict[int, Any] = {}
        self._frame = threading.local()
        self._handlers: dict[int, Callable[[list[Any]], Any]] = {
            Kind.CMD: self._cmd,
            Kind.STORE: self._store,
            Kind.GET: self._get,
            Kind.DELETE: self._delete,
            Kind.SEARCH: self._search,
            Kind.INFO: self._info,
            Kind.CLEAR: self._clear,
            Kind.RUN_PLAN: self._run_plan,
            Kind.ADD_PEER: self._add_peer,
            Kind.PING: lambda msg: "pong",
            Kind.STORE_PLAN: self._store_plan,
        }
        self.fedws_ops: dict[str, Callable[..., Any]] = {
            **TENSOR_FEDWS_OPS,
            "fedws.remote_get": self._remote_get,
        }

    # -- the interface ------------------------------------------------------------------

    def handle(self, frame: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
        """Run every request of ``frame`` in order and return the encoded reply."""
        values: list[list[Any]] = []
        errors: list[list[Any]] = []
        watermark = 0
        # Per-thread: a WebSocket node runs one handler thread per connection.
        self._frame.after_reply = []
        try:
            blobs = list(codec.iter_blobs(frame))
        except DecodeError as exc:
            log.warning("node %s: rejected frame: %s", self.id, exc)
            errors.append([FRAME_ERROR_SEQ, error_to_wire(exc, worker=self.id), []])
            blobs = []
        for blob in blobs:
            arrived: list[PointerRef] = []
            try:
                # Pointers that arrive stay inert refs while decoding: turning one into a live
                # pointer can fail (an unknown peer), and that failure belongs to this request
                # (its seq, its object), not to the frame.
                msg = codec.decode(blob, _recorder(arrived) if self.pointer_factory else None)
                kind, seq = msg[0], msg[1]
                if not isinstance(seq, int) or isinstance(seq, bool):
                    raise TypeError("seq must be an int")
                handler = self._handlers[kind]
            except (DecodeError, TypeError, KeyError, IndexError, ValueError) as exc:
                bad = exc if isinstance(exc, DecodeError) else DecodeError(f"malformed request: {exc!r}")
                log.warning("node %s: rejected request: %s", self.id, bad)
                errors.append([FRAME_ERROR_SEQ, error_to_wire(bad, worker=self.id), []])
                continue
            watermark = max(watermark, seq)
            try:
                if arrived:
                    msg = self._materialize(msg)
                out = handler(msg)
            except Exception as exc:  # any failure becomes an error reply, never a crash
                errors.append([seq, *self._describe_failure(exc, kind, msg)])
                continue
            if out is not _NO_VALUE:
                values.append([seq, out])
        return self._encode_reply(watermark, values, errors)

    def _encode_reply(
        self, watermark: int, values: list[list[Any]], errors: list[list[Any]]
    ) -> list[bytes | memoryview]:
        try:
            reply = codec.encode([watermark, values, errors])
        except EncodeError:
            # One value cannot travel: answer that request with the error, keep the rest.
            good = []
            for seq, value in values:
                try:
                    codec.encode(value)
                    good.append([seq, value])
                except EncodeError as exc:
                    errors.append([seq, error_to_wire(exc, worker=self.id), []])
                    self._frame.after_reply = [f for f in self._frame.after_reply if getattr(f, "seq", None) != seq]
            reply = codec.encode([watermark, good, errors])
        for finish in self._frame.after_reply:  # removals of gotten objects, once the reply exists
            finish()
        self._frame.after_reply = []
        return reply

    def _describe_failure(self, exc: BaseException, kind: int, msg: list[Any]) -> list[Any]:
        op = msg[2] if kind == Kind.CMD and len(msg) > 2 else None
        result_ids: list[int] = []
        obj_id = None
        if kind == Kind.CMD and len(msg) > 5 and isinstance(msg[5], list):
            result_ids = [i for i in msg[5] if isinstance(i, int)]
        elif kind == Kind.RUN_PLAN and len(msg) > 4 and isinstance(msg[4], list):
            result_ids = [i for i in msg[4] if isinstance(i, int)]
        elif kind in (Kind.GET, Kind.STORE) and len(msg) > 2:
            obj_id = msg[2]
            if kind == Kind.STORE and isinstance(obj_id, int):
                # A store that failed (store full, a pointer to an unknown peer) leaves its error
                # where the object would be, so commands using it fail with this cause.
                result_ids = [obj_id]
        if result_ids:
            obj_id = result_ids[0]
        if not isinstance(exc, FedwsError):
            log.info("node %s: %s failed: %s: %s", self.id, op or Kind(kind).name, type(exc).__name__, exc)
        wire = error_to_wire(exc, worker=self.id, obj_id=obj_id, op=op)
        failure = Failure(wire)
        for rid in result_ids:  # later commands that use these fail the same way
            self.store.objects[rid] = failure
        return [wire, result_ids]

    # -- arguments ----------------------------------------------------------------------

    def _materialize(self, obj: Any) -> Any:
        """Replace every PointerRef in a decoded request by a live pointer of this node."""
        t = type(obj)
        if t is PointerRef:
            assert self.pointer_factory is not None
            return self.pointer_factory(obj)
        if t is list:
            return [self._materialize(x) for x in obj]
        if t is tuple:
            return tuple(self._materialize(x) for x in obj)
        if t is dict:
            return {k: self._materialize(v) for k, v in obj.items()}
        if t is set:
            return {self._materialize(x) for x in obj}
        return obj

    def resolve_args(self, obj: Any) -> Any:
        """Replace every ObjRef in ``obj`` by the stored object it names."""
        t = type(obj)
        if t is ObjRef:
            value = self.store.get(obj.id)
            if type(value) is Failure:
                # The message carries the cause (type and text), so the caller reads why.
                text = (
                    f"object {obj.id} is the result of a command that failed: "
                    f"{value.error.get('type')}: {value.error.get('message')}"
                )
                raise DependencyError(
                    text,
                    worker=self.id,
                    obj_id=obj.id,
                    remote_type=value.error.get("type"),
                    remote_message=text,
                )
            return value
        if t is list:
            return [self.resolve_args(x) for x in obj]
        if t is tuple:
            return tuple(self.resolve_args(x) for x in obj)
        if t is dict:
            return {k: self.resolve_args(v) for k, v in obj.items()}
        return obj

    # -- requests -----------------------------------------------------------------------

    def _cmd(self, msg: list[Any]) -> Any:
        _, _, op, args, kwargs, result_ids, *rest = msg
        grad_enabled = bool(rest[0]) if rest else True  # the caller's (thread-local) grad mode
        fn = self.fedws_ops.get(op) or resolve(op)
        if fn is None:
            raise OpNotAllowedError(
                f"op {op!r} is not allowed on worker {self.id!r}", worker=self.id, op=op
            )
        args = self.resolve_args(args)
        kwargs = self.resolve_args(kwargs) if kwargs else {}
        if grad_enabled == torch.is_grad_enabled():
            result = self.call(fn, args, kwargs, result_ids)
        else:
            with torch.set_grad_enabled(grad_enabled):
                result = self.call(fn, args, kwargs, result_ids)
        self.store_results(op, result, result_ids)
        return _NO_VALUE

    def call(self, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], result_ids: list[int]) -> Any:
        """Call ``fn`` with pointer results planned under ``result_ids`` (pointer chains)."""
        token = planned_result_ids.set(list(result_ids))
        try:
            return fn(*args, **kwargs)
        finally:
            planned_result_ids.reset(token)

    def store_results(self, op: str, result: Any, result_ids: list[int]) -> None:
        n = len(result_ids)
        if n == 0:
            return
        if n == 1:
            self.store.set(result_ids[0], result)
            return
        if not isinstance(result, (tuple, list)) or len(result) != n:
            raise TypeError(
                f"{op} returned {type(result).__name__}, expected {n} results"
            )
        for rid, item in zip(result_ids, result):
            self.store.set(rid, item)

    def _store(self, msg: list[Any]) -> Any:
        _, _, obj_id, obj, tags, description = msg
        self.store.set(obj_id, obj, tags or (), description)
        return _NO_VALUE

    def _get(self, msg: list[Any]) -> Any:
        _, _, obj_id, remove = msg
        value = self.store.get(obj_id)
        if type(value) is Failure:  # get() surfaces the error of the command that made it
            raise error_from_wire(value.error)
        if remove:
            def finish(obj_id: int = obj_id, value: Any = value) -> None:
                release = getattr(value, "_fedws_release", None)
                if release is not None:  # a pointer leaves: its new holder owns the data
                    release()
                self.store.delete(obj_id)

            finish.seq = msg[1]  # type: ignore[attr-defined]
            self._frame.after_reply.append(finish)
        return value

    def _delete(self, msg: list[Any]) -> Any:
        for obj_id in msg[2]:
            self.store.delete(obj_id)
        return _NO_VALUE

    def _search(self, msg: list[Any]) -> Any:
        tags = msg[2]
        return [self._describe(i) for i in self.store.search(tags)]

    def _describe(self, obj_id: int) -> list[Any]:
        obj = self.store.objects[obj_id]
        shape: list[int] | None = None
        dtype, rg = "float32", False
        if isinstance(obj, torch.Tensor):
            shape, dtype, rg = list(obj.shape), codec.DTYPE_NAMES[obj.dtype], obj.requires_grad
        return [
            obj_id,
            type(obj).__name__,
            shape,
            dtype,
            rg,
            sorted(self.store.tags.get(obj_id, ())),
            self.store.descriptions.get(obj_id),
        ]

    def _info(self, msg: list[Any]) -> Any:
        what = msg[2]
        if what == "count":
            return len(self.store)
        if what == "list":
            return [self._describe(i) for i in self.store.objects]
        if what == "nbytes":
            return self.store.nbytes
        if what == "meta":
            return _meta(self.store.get(msg[3]))
        raise ProtocolError(f"unknown info request {what!r}")

    def _clear(self, msg: list[Any]) -> Any:
        self.store.clear()
        return _NO_VALUE

    def _add_peer(self, msg: list[Any]) -> Any:
        if self.add_peer is None:
            raise PointerError(f"worker {self.id!r} cannot open links to other workers")
        self.add_peer(msg[2], msg[3])
        return _NO_VALUE

    def _run_plan(self, msg: list[Any]) -> Any:
        run_plan(self, msg)
        return _NO_VALUE

    def _store_plan(self, msg: list[Any]) -> Any:
        store_plan(self, msg)
        return _NO_VALUE

    # -- fedws ops ----------------------------------------------------------------------

    def _remote_get(self, obj_id: int) -> None:
        """Replace the pointer stored under ``obj_id`` by the data it points to."""
        ptr = self.resolve_args(ObjRef(obj_id))  # a stored Failure raises, chained
        get = getattr(ptr, "get", None)
        if get is None or not hasattr(ptr, "id_at_location"):
            raise PointerError(
                f"remote_get: object {obj_id} on worker {self.id!r} is not a pointer"
            )
        value = get()
        self.store.set(obj_id, value)


def _recorder(seen: list[PointerRef]) -> Callable[[PointerRef], PointerRef]:
    def record(ref: PointerRef) -> PointerRef:
        seen.append(ref)
        return ref

    return record


def _meta(obj: Any) -> list[Any]:
    if not isinstance(obj, torch.Tensor):
        raise TypeError(f"object is a {type(obj).__name__}, not a tensor")
    return [list(obj.shape), codec.DTYPE_NAMES[obj.dtype], obj.requires_grad]
