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
)
from ..protocol import codec
from ..protocol.codec import ObjRef, PointerRef
from ..protocol.errors import error_from_wire, error_to_wire
from ..protocol.ids import planned_result_ids
from ..protocol.messages import (
    FRAME_ERROR_SEQ,
    REQUESTS,
    AddPeer,
    Clear,
    Cmd,
    Delete,
    Get,
    Info,
    Kind,
    Ping,
    RunPlan,
    Search,
    Store,
    StorePlan,
    split_request,
)
from ..protocol.ops import resolve
from ..protocol.tree import tree_map
from .interpreter import TENSOR_FEDWS_OPS, run_plan, store_plan
from .limits import MemoryBudget, check_listing, default_budget, enter_frame, leave_frame
from .store import Entry, Failure, ObjectStore

__all__ = ["Node"]

log = logging.getLogger("fedws.node")

_NO_VALUE: Any = object()


class Node:
    """One worker's objects and the rules for acting on them.

    Safe to share between threads: each thread's frames run in order, and the store keeps
    its own concurrency contract (see :mod:`fedws.node.store`).

    Args:
        id: the worker id, used in every error message.
        max_store_bytes: cap on the bytes held (None: no cap).
        max_memory_bytes: memory budget: bytes held plus what one command allocates,
            checked before it runs (None: :func:`~fedws.node.limits.default_budget`).
        pointer_factory: turns a PointerRef that arrives (a pointer chain) into a live
            pointer this node can use; given by the runtime that owns the node.
        add_peer: called for ADD_PEER requests; a node without it refuses them.
    """

    def __init__(
        self,
        id: str,
        *,
        max_store_bytes: int | None = None,
        max_memory_bytes: int | None = None,
        pointer_factory: Callable[[PointerRef], Any] | None = None,
        add_peer: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self.id = id
        self.store = ObjectStore(id, max_store_bytes)
        self.budget = MemoryBudget(max_memory_bytes or default_budget(max_store_bytes), id)
        self.pointer_factory = pointer_factory
        self.add_peer = add_peer
        self._frame = threading.local()
        # Each handler takes the record of its kind (see fedws.protocol.messages).
        self._handlers: dict[Kind, Callable[[Any], Any]] = {
            Kind.CMD: self._cmd,
            Kind.STORE: self._store,
            Kind.GET: self._get,
            Kind.DELETE: self._delete,
            Kind.SEARCH: self._search,
            Kind.INFO: self._info,
            Kind.CLEAR: self._clear,
            Kind.RUN_PLAN: self._run_plan,
            Kind.ADD_PEER: self._add_peer,
            Kind.PING: self._ping,
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
        state = self._frame
        state.after_reply = []
        enter_frame(frame)
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
                kind, seq, fields = split_request(msg)
            except (DecodeError, TypeError, KeyError, IndexError, ValueError) as exc:
                bad = exc if isinstance(exc, DecodeError) else DecodeError(f"malformed request: {exc!r}")
                log.warning("node %s: rejected request: %s", self.id, bad)
                errors.append([FRAME_ERROR_SEQ, error_to_wire(bad, worker=self.id), []])
                continue
            watermark = max(watermark, seq)
            state.seq = seq
            try:
                if arrived:
                    fields = tree_map(self._materialize, fields)
                out = self._handlers[kind](REQUESTS[kind].parse(fields))
            except Exception as exc:  # any failure becomes an error reply, never a crash
                errors.append([seq, *self._describe_failure(exc, kind, fields)])
                continue
            if out is not _NO_VALUE:
                values.append([seq, out])
        return self._encode_reply(watermark, values, errors)

    def _encode_reply(
        self, watermark: int, values: list[list[Any]], errors: list[list[Any]]
    ) -> list[bytes | memoryview]:
        after: list[tuple[int, Callable[[], None]]] = self._frame.after_reply
        leave_frame()
        try:
            reply = codec.encode([watermark, values, errors])
        except (EncodeError, RuntimeError, MemoryError, ValueError):
            # One value cannot travel: answer that request with the error, keep the rest.
            good = []
            for seq, value in values:
                try:
                    codec.encode(value)
                    good.append([seq, value])
                except (EncodeError, RuntimeError, MemoryError, ValueError) as exc:
                    errors.append([seq, error_to_wire(exc, worker=self.id), []])
                    after = [(s, f) for s, f in after if s != seq]
            reply = codec.encode([watermark, good, errors])
        self._frame.after_reply = []
        for _, finish in after:  # removals of gotten objects, once the reply exists
            finish()
        return reply

    def _after_reply(self, finish: Callable[[], None]) -> None:
        """Run ``finish`` once the reply to the current frame is encoded (if its value is in it)."""
        self._frame.after_reply.append((self._frame.seq, finish))

    def _describe_failure(self, exc: BaseException, kind: Kind, fields: list[Any]) -> list[Any]:
        blame = REQUESTS[kind].blame(fields)
        result_ids = list(blame.result_ids)
        obj_id = result_ids[0] if result_ids else blame.obj_id
        if not isinstance(exc, FedwsError):
            log.info("node %s: %s failed: %s: %s", self.id, blame.op or kind.name, type(exc).__name__, exc)
        wire = error_to_wire(exc, worker=self.id, obj_id=obj_id, op=blame.op)
        if result_ids:  # later commands that use these fail the same way
            self.store.record_failure(result_ids, wire)
        return [wire, result_ids]

    # -- arguments ----------------------------------------------------------------------

    def _materialize(self, leaf: Any) -> Any:
        """A PointerRef that arrived becomes a live pointer of this node."""
        if type(leaf) is PointerRef:
            assert self.pointer_factory is not None
            return self.pointer_factory(leaf)
        return leaf

    def resolve_args(self, obj: Any) -> Any:
        """Replace every ObjRef in ``obj`` by the stored object it names.

        Raises:
            ObjectNotFoundError: a ref names no stored object.
            DependencyError: a ref names the result of a command that failed.
        """
        return tree_map(self._resolve_ref, obj)

    def _resolve_ref(self, leaf: Any) -> Any:
        if type(leaf) is not ObjRef:
            return leaf
        value = self.store.get(leaf.id)
        if type(value) is Failure:
            # The message carries the cause (type and text), so the caller reads why.
            text = (
                f"object {leaf.id} is the result of a command that failed: "
                f"{value.error.get('type')}: {value.error.get('message')}"
            )
            raise DependencyError(
                text,
                worker=self.id,
                obj_id=leaf.id,
                remote_type=value.error.get("type"),
                remote_message=text,
            )
        return value

    def resolve_op(self, name: str) -> Callable[..., Any] | None:
        """The callable an op name stands for on this node: its own ops, then the allowlist."""
        return self.fedws_ops.get(name) or resolve(name)

    # -- requests -----------------------------------------------------------------------

    def _cmd(self, req: Cmd) -> Any:
        fn = self.resolve_op(req.op)
        if fn is None:
            raise OpNotAllowedError(
                f"op {req.op!r} is not allowed on worker {self.id!r}", worker=self.id, op=req.op
            )
        args = self.resolve_args(req.args)
        kwargs = self.resolve_args(req.kwargs) if req.kwargs else {}
        self.budget.check_op(req.op, fn, args, kwargs, self.store.nbytes)
        if req.grad_enabled == torch.is_grad_enabled():  # the caller's (thread-local) grad mode
            result = self.call(fn, args, kwargs, req.result_ids)
        else:
            with torch.set_grad_enabled(req.grad_enabled):
                result = self.call(fn, args, kwargs, req.result_ids)
        self.store_results(req.op, result, req.result_ids)
        return _NO_VALUE

    def call(self, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], result_ids: list[int]) -> Any:
        """Call ``fn`` with pointer results planned under ``result_ids`` (pointer chains)."""
        token = planned_result_ids.set(list(result_ids))
        try:
            return fn(*args, **kwargs)
        finally:
            planned_result_ids.reset(token)

    def store_results(self, op: str, result: Any, result_ids: list[int]) -> None:
        """Store ``result`` under ``result_ids``: one id takes it whole, several split it."""
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

    def _store(self, req: Store) -> Any:
        self.store.set(req.obj_id, req.obj, req.tags, req.description)
        return _NO_VALUE

    def _get(self, req: Get) -> Any:
        value = self.store.get(req.obj_id)
        if type(value) is Failure:  # get() surfaces the error of the command that made it
            raise error_from_wire(value.error)
        self.budget.check_reply(value, req.obj_id)
        if req.remove:
            def finish(obj_id: int = req.obj_id, value: Any = value) -> None:
                release = getattr(value, "_fedws_release", None)
                if release is not None:  # a pointer leaves: its new holder owns the data
                    release()
                self.store.delete(obj_id)

            self._after_reply(finish)
        return value

    def _delete(self, req: Delete) -> Any:
        self.store.delete_many(req.ids)
        return _NO_VALUE

    def _search(self, req: Search) -> Any:
        found = self.store.search(req.tags)
        check_listing(len(found), self.id)
        return [_describe(e) for e in self.store.entries(found)]

    def _info(self, req: Info) -> Any:
        what = req.what
        if what == "count":
            return len(self.store)
        if what == "list":
            check_listing(len(self.store), self.id)
            return [_describe(e) for e in self.store.entries()]
        if what == "nbytes":
            return self.store.nbytes
        assert what == "meta" and req.obj_id is not None  # Info.parse admits nothing else
        return _meta(self.store.get(req.obj_id))

    def _clear(self, req: Clear) -> Any:
        self.store.clear()
        return _NO_VALUE

    def _ping(self, req: Ping) -> Any:
        return "pong"

    def _add_peer(self, req: AddPeer) -> Any:
        if self.add_peer is None:
            raise PointerError(f"worker {self.id!r} cannot open links to other workers")
        self.add_peer(req.worker_id, req.address)
        return _NO_VALUE

    def _run_plan(self, req: RunPlan) -> Any:
        run_plan(
            self.store, req, resolve_args=self.resolve_args, resolver=self.resolve_op, worker=self.id,
            guard=self.budget.plan_guard(self.store.nbytes),
        )
        return _NO_VALUE

    def _store_plan(self, req: StorePlan) -> Any:
        store_plan(self.store, req, worker=self.id)
        return _NO_VALUE

    # -- fedws ops ----------------------------------------------------------------------

    def _remote_get(self, obj_id: int) -> None:
        """Replace the pointer stored under ``obj_id`` by the data it points to."""
        ptr = self._resolve_ref(ObjRef(obj_id))  # a stored Failure raises, chained
        get = getattr(ptr, "get", None)
        if get is None or not hasattr(ptr, "id_at_location"):
            raise PointerError(
                f"remote_get: object {obj_id} on worker {self.id!r} is not a pointer"
            )
        value = get()
        self.store.set(obj_id, value)


def _describe(entry: Entry) -> list[Any]:
    """``[id, type, shape, dtype, requires_grad, tags, description]`` of a stored object."""
    obj = entry.obj
    shape: list[int] | None = None
    dtype, rg = "float32", False
    if isinstance(obj, torch.Tensor):
        shape, dtype, rg = list(obj.shape), codec.DTYPE_NAMES[obj.dtype], obj.requires_grad
    return [entry.id, type(obj).__name__, shape, dtype, rg, sorted(entry.tags), entry.description]


def _recorder(seen: list[PointerRef]) -> Callable[[PointerRef], PointerRef]:
    def record(ref: PointerRef) -> PointerRef:
        seen.append(ref)
        return ref

    return record


def _meta(obj: Any) -> list[Any]:
    if not isinstance(obj, torch.Tensor):
        raise TypeError(f"object is a {type(obj).__name__}, not a tensor")
    return [list(obj.shape), codec.DTYPE_NAMES[obj.dtype], obj.requires_grad]
