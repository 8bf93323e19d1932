"""Node: the worker side of the protocol, with no I/O.

``Node.handle(frame) -> reply`` is the whole interface: bytes in, bytes out. Both the
in-process VirtualWorker and the WebSocket server feed it, so a behaviour tested with one
holds for the other. Requests of a frame run in order; a failing request never stops the
ones after it, and its results are stored as :class:`Failure` so that later commands using
them fail with the same error, chained.

A node enforces a :class:`~fedws.node.policy.Policy`. In the open (development) mode
nothing is checked. In the private mode every request runs as a
:class:`~fedws.node.policy.Caller` (principal and session, given by the transport with
each frame): objects belong to the caller that made them, served data is read-only and
private, privacy follows derived values, and private values leave only through the
policy's release rules. Refusals are :class:`~fedws.exceptions.PermissionDeniedError`
replies and lines in the audit log (:mod:`fedws.node.audit`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from ..exceptions import (
    DecodeError,
    DependencyError,
    EncodeError,
    FedwsError,
    OpNotAllowedError,
    PermissionDeniedError,
    PointerError,
)
from ..protocol import codec
from ..protocol.codec import ObjRef, PointerRef
from ..protocol.errors import error_from_wire, error_to_wire
from ..protocol.ids import new_id, planned_result_ids
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
from ..protocol.plan import PlanCode
from ..protocol.tree import tree_map
from .audit import Audit
from .dp_ops import node_ops as dp_ops
from .interpreter import (
    TENSOR_FEDWS_OPS,
    StoredPlan,
    check_call,
    execute,
    flat_tensors,
    load_plan,
    run_plan,
    store_plan,
)
from .limits import MemoryBudget, check_listing, default_budget, enter_frame, leave_frame
from .policy import (
    BACKWARD_OPS,
    LOCAL,
    Caller,
    Policy,
    PrivacyAccountant,
    dp_noise,
    guarded,
    may_write,
    plan_digest,
    refuse_writes,
    storage_key,
    written_args,
)
from .random_shares import node_ops as smpc_ops
from .secagg import node_ops as secagg_ops
from .status import Started, node_status
from .store import Entry, Failure, ObjectStore
from .streams import stream_ops

__all__ = ["Node"]

log = logging.getLogger("fedws.node")

_NO_VALUE: Any = object()
# How a DependencyError's message begins; a chain of them is cut back to the first cause.
_DEPENDENCY_PREFIX = re.compile(r"object \d+ is the result of a command that failed: [\w.]{1,200}: ")
# What each permission of a role lets a principal do (refusals say it in these words).
_PERMISSION_TEXT = {
    "compute": "compute on the data this node serves",
    "plans": "store or run plans",
    "dp": "take differentially private releases",
    "peers": "make this node link to its peers",
    "status": "see the whole node's status",
    "smpc": "draw secret shares or Beaver triples (secure computation)",
    "secagg": "take part in secure aggregation (masked updates)",
}


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
        policy: what callers may do and what may leave (default: open, development).
    """

    def __init__(
        self,
        id: str,
        *,
        max_store_bytes: int | None = None,
        max_memory_bytes: int | None = None,
        pointer_factory: Callable[[PointerRef], Any] | None = None,
        add_peer: Callable[[str, str | None], None] | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.id = id
        self.store = ObjectStore(id, max_store_bytes)
        self.budget = MemoryBudget(max_memory_bytes or default_budget(max_store_bytes), id)
        self.pointer_factory = pointer_factory
        self.add_peer = add_peer
        self.audit = Audit(id)
        self.started = Started()
        # principal -> open connections, given by the runtime that has them (INFO "status").
        self.connections: Callable[[], dict[str, int]] | None = None
        self._frame = threading.local()
        self._callers: dict[tuple[str, str], Caller] = {}
        self._callers_lock = threading.Lock()
        self._guarded_ops: dict[str, Callable[..., Any]] = {}
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
        # The same kinds under a private policy: every request checked for its caller.
        self._checked: dict[Kind, Callable[[Any], Any]] = {
            **self._handlers,
            Kind.CMD: self._cmd_checked,
            Kind.STORE: self._store_checked,
            Kind.GET: self._get_checked,
            Kind.DELETE: self._delete_checked,
            Kind.SEARCH: self._search_checked,
            Kind.INFO: self._info_checked,
            Kind.CLEAR: self._clear_checked,
            Kind.RUN_PLAN: self._run_plan_checked,
            Kind.STORE_PLAN: self._store_plan_checked,
            Kind.ADD_PEER: self._add_peer_checked,
        }
        self.fedws_ops: dict[str, Callable[..., Any]] = {
            **TENSOR_FEDWS_OPS,
            "fedws.remote_get": self._remote_get,
            "fedws.end_get": self._end_get,
            "fedws.remote_send": self._remote_send,
            "fedws.share": self._share,
            "fedws.persist": self._persist,
        }
        self.fedws_ops.update(smpc_ops(self))
        self.fedws_ops.update(dp_ops(self))
        self.fedws_ops.update(secagg_ops(self))
        self.streams, ops = stream_ops(self)  # tensors larger than one frame (fedws.node.streams)
        self.fedws_ops.update(ops)
        self.policy = policy or Policy()

    # -- policy ---------------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        """The node's :class:`~fedws.node.policy.Policy` (settable; takes effect at once)."""
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self._policy = policy
        self.enforce = policy.enforce
        self.accountant = PrivacyAccountant(policy.dp) if policy.dp is not None else None

    def caller(self, principal: str, session: str, address: str | None = None) -> Caller:
        """The one :class:`Caller` of (principal, session) on this node (made on first use).

        A coordinator that reconnects with the same session gets the same caller, and with
        it its objects.
        """
        key = (principal, session)
        found = self._callers.get(key)
        if found is None:
            with self._callers_lock:
                found = self._callers.setdefault(key, Caller(principal, session, address))
        return found

    def end_session(self, caller: Caller) -> tuple[int, int]:
        """Free what ``caller``'s session left: every object it owns but made durable.

        Called by the runtime once a session ended (its last connection closed, and no
        reconnect within the grace period). Served data (owned by the node) and other
        sessions' objects are never touched. Under the open policy objects have no owner:
        nothing is freed. A caller left with no object is forgotten; one that keeps durable
        objects stays, so a later connection with the same session reaches them.

        Returns:
            (objects freed, bytes freed).
        """
        self.streams.drop_caller(caller)
        freed, nbytes = self.store.free_session(caller)
        kept = self.store.owns_any(caller)  # what is left is durable
        if not kept:
            with self._callers_lock:
                key = (caller.principal, caller.session)
                if self._callers.get(key) is caller:
                    del self._callers[key]
        if freed:
            log.info(
                "node %s: session %s/%s ended: freed %d object(s), %d bytes%s",
                self.id, caller.principal, caller.session[:8], freed, nbytes,
                "; kept its durable objects" if kept else "",
            )
        self.audit.record("session_end", caller, freed=freed, bytes=nbytes, kept_durable=kept)
        return freed, nbytes

    def serve(self, obj_id: int, obj: Any, tags: Any = (), description: str | None = None) -> None:
        """Hold ``obj`` as data this node serves: private and read-only under a private policy."""
        if self.enforce:
            self.store.serve(obj_id, obj, tags, description)
        else:
            self.store.set(obj_id, obj, tags, description)

    def add_dataset(
        self, dataset: Any, key: str, tags: Any = (), description: str | None = None
    ) -> tuple[int, int]:
        """Serve a dataset: its features tagged ``#<key> #data``, its targets ``#<key> #target``.

        A coordinator finds it by search (``sy.FederatedDataset.from_workers(workers, key)``)
        and cuts batches of it on this node; under a private policy it is served data
        (read-only, private) like the tensors of the node's config.

        Args:
            dataset: a ``(data, targets)`` pair of tensors, or an object with tensors
                ``.data`` and ``.targets`` (``sy.BaseDataset``; its transform is not applied
                here: ``VirtualWorker.add_dataset`` applies it first).
            key: the dataset's name (``"mnist"``); ``"#mnist"`` is the same.
            tags, description: more tags for both tensors, and a description.

        Returns:
            the ids of the data and targets tensors.
        """
        data, targets = dataset if isinstance(dataset, tuple) else (dataset.data, dataset.targets)
        if not isinstance(data, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError("add_dataset needs tensors: (data, targets), or an object with .data and .targets")
        if data.dim() == 0 or targets.dim() == 0 or len(data) != len(targets):
            raise ValueError(f"data {tuple(data.shape)} and targets {tuple(targets.shape)} differ in length")
        name = key.removeprefix("#")
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"dataset key {key!r} must be a non-empty word")
        extra = {str(t) for t in tags}
        ids = new_id(), new_id()
        for obj_id, tensor, role in zip(ids, (data, targets), ("#data", "#target")):
            self.serve(obj_id, tensor, {f"#{name}", role, *extra}, description or f"dataset {name}: {role[1:]}")
        return ids

    # -- the interface ------------------------------------------------------------------

    def handle(self, frame: bytes | bytearray | memoryview, caller: Caller | None = None) -> list[bytes | memoryview]:
        """Run every request of ``frame`` in order, as ``caller``, and return the encoded reply.

        ``caller`` is who sent the frame (see :meth:`caller`); None: the local coordinator
        of an in-process node.
        """
        values: list[list[Any]] = []
        errors: list[list[Any]] = []
        watermark = 0
        # Per-thread: a WebSocket node runs one handler thread per connection.
        state = self._frame
        state.after_reply = []
        enter_frame(frame)
        state.caller = caller or LOCAL
        handlers = self._checked if self.enforce else self._handlers
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
                out = handlers[kind](REQUESTS[kind].parse(fields))
            except Exception as exc:  # any failure becomes an error reply, never a crash
                errors.append([seq, *self._describe_failure(exc, kind, fields)])
                if isinstance(exc, PermissionDeniedError):
                    self.audit.refused(state.caller, kind.name, str(exc), exc.obj_id)
                    log.warning("node %s: refused %s of %s: %s", self.id, kind.name, _who(state.caller), exc,
                                extra={"event": "refuse", "principal": state.caller.principal})
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
            # Under a policy only the caller's own ids (or new ones) take the failure.
            self.store.record_failure(result_ids, wire, self._frame.caller if self.enforce else None)
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
            # The message carries the root cause (type and text), so the caller reads why,
            # once: a failure that was itself a dependency's is not nested again.
            cause = str(value.error.get("message"))
            while (m := _DEPENDENCY_PREFIX.match(cause)) is not None:
                cause = cause[m.end():]
            text = f"object {leaf.id} is the result of a command that failed: {value.error.get('type')}: {cause}"
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

    def store_results(
        self, op: str, result: Any, result_ids: list[int], owner: Caller | None = None, private: bool = False
    ) -> None:
        """Store ``result`` under ``result_ids``: one id takes it whole, several split it."""
        n = len(result_ids)
        if n == 0:
            return
        if n == 1:
            self.store.set(result_ids[0], result, owner=owner, private=private)
            return
        if not isinstance(result, (tuple, list)) or len(result) != n:
            raise TypeError(
                f"{op} returned {type(result).__name__}, expected {n} results"
            )
        for rid, item in zip(result_ids, result):
            self.store.set(rid, item, owner=owner, private=private)

    def _store(self, req: Store) -> Any:
        self.store.set(req.obj_id, req.obj, req.tags, req.description)
        return _NO_VALUE

    def _get(self, req: Get) -> Any:
        value = self.store.get(req.obj_id)
        if type(value) is Failure:  # get() surfaces the error of the command that made it
            raise error_from_wire(value.error)
        if self.audit.enabled:
            self.audit.released(self._frame.caller, req.obj_id, _nbytes(value), "open")
        return self._finish_get(req, _plan_wire(value))

    def release_for_stream(self, obj_id: Any, remove: Any, release: Any) -> Any:
        """What a GET of ``obj_id`` by the current caller would return, every check and
        release rule applied once: a read stream (:mod:`fedws.node.streams`) sends it by ranges."""
        req = Get.parse([obj_id, remove] if release is None else [obj_id, remove, release])
        return (self._checked if self.enforce else self._handlers)[Kind.GET](req)

    def _finish_get(self, req: Get, value: Any) -> Any:
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
        if what == "status":
            return self._status(None)
        assert what == "meta" and req.obj_id is not None  # Info.parse admits nothing else
        return _meta(self.store.get(req.obj_id))

    def _status(self, caller: Caller | None) -> dict[str, Any]:
        return node_status(
            self.id, self.store, self.policy, caller=caller, started=self.started,
            budget=self.budget.limit, connections=self.connections,
        )

    def _clear(self, req: Clear) -> Any:
        self.store.clear()
        return _NO_VALUE

    def _ping(self, req: Ping) -> Any:
        return "pong"

    def _add_peer_checked(self, req: AddPeer) -> Any:
        self._require(self._frame.caller, "peers")
        return self._add_peer(req)

    def _add_peer(self, req: AddPeer) -> Any:
        if self.add_peer is None:
            raise PointerError(f"worker {self.id!r} cannot open links to other workers")
        self.add_peer(req.worker_id, req.address)
        return _NO_VALUE

    def _run_plan(self, req: RunPlan) -> Any:
        started = time.perf_counter()
        run_plan(
            self.store, req, resolve_args=self.resolve_args, resolver=self.resolve_op, worker=self.id,
            guard=self.budget.plan_guard(self.store.nbytes),
        )
        ms = (time.perf_counter() - started) * 1000
        log.info("node %s: plan %d ran in %.1f ms", self.id, req.plan_id, ms,
                 extra={"event": "run_plan", "plan": req.plan_id, "ms": round(ms, 3)})
        return _NO_VALUE

    def _store_plan(self, req: StorePlan) -> Any:
        store_plan(self.store, req, worker=self.id)
        return _NO_VALUE

    # -- requests under a private policy -------------------------------------------------
    #
    # The frame's thread-local state carries the caller and, while one request runs, what
    # its arguments were: ``refs`` (id, object) of every stored object it used,
    # ``tainted`` (one of them is private) and ``derived`` (one is private and not data
    # the node serves, i.e. already the result of some computation).

    def _deny(self, message: str, obj_id: int | None = None, op: str | None = None) -> PermissionDeniedError:
        return PermissionDeniedError(message, worker=self.id, obj_id=obj_id, op=op)

    def _require(self, caller: Caller, permission: str, obj_id: int | None = None) -> None:
        """Refuse unless the operator granted ``caller``'s principal ``permission``."""
        if not self.policy.allows(caller.principal, permission):
            raise self._deny(
                f"principal {caller.principal!r} may not {_PERMISSION_TEXT[permission]} on worker "
                f"{self.id!r} (the operator did not grant it {permission!r})",
                obj_id,
            )

    def _not_yours(self, obj_id: int) -> PermissionDeniedError:
        if obj_id in self.store.readonly:
            return self._deny(
                f"object {obj_id} is data worker {self.id!r} serves: it is read-only and never leaves",
                obj_id,
            )
        return self._deny(
            f"object {obj_id} on worker {self.id!r} belongs to another session: "
            "only its owner may use, read, change or delete it",
            obj_id,
        )

    def _may_use(self, obj_id: int, caller: Caller) -> bool:
        store = self.store
        return store.owners.get(obj_id) is caller or obj_id in store.readonly or obj_id in store.shared

    def _check_writable(self, obj_ids: list[int], caller: Caller) -> None:
        """Refuse to (re)write ids that exist and are not the caller's."""
        owners, objects = self.store.owners, self.store.objects
        for i in obj_ids:
            if owners.get(i) is not caller and i in objects:
                raise self._not_yours(i)

    def _resolve_checked(self, leaf: Any) -> Any:
        if type(leaf) is not ObjRef:
            return leaf
        state = self._frame
        obj_id = leaf.id
        store = self.store
        if store.owners.get(obj_id) is not state.caller and obj_id not in store.shared:
            if obj_id in store.readonly:
                self._require(state.caller, "compute", obj_id)
            elif obj_id in store.objects:
                raise self._not_yours(obj_id)
        value = self._resolve_ref(leaf)
        if obj_id in store.private:
            state.tainted = True
            if obj_id not in store.readonly:
                state.derived = True
        state.refs.append((obj_id, value))
        return value

    def _share_results(self, refs: list[tuple[int, Any]], result_ids: list[int]) -> None:
        """Results computed from a shared object are shared too: along a pointer chain the
        next node computes in its own session, and the coordinator holding the ids reaches
        the results (the ids are the capability, as for the object shared first)."""
        shared = self.store.shared
        if any(i in shared for i, _ in refs):
            shared.update(result_ids)

    def _begin(self) -> Any:
        state = self._frame
        state.tainted = state.derived = state.dp_released = False
        state.refs = []
        return state

    def _snapshot(self, refs: list[tuple[int, Any]], backward: bool) -> tuple[list[Any], dict[int, Any] | None]:
        """What to compare after a computation on private data: versions of the non-private
        tensors it used, and (for backward) every stored leaf's gradient."""
        private = self.store.private
        versions = [(i, t, t._version) for i, t in refs if type(i) is int and i not in private
                    and isinstance(t, torch.Tensor)]
        grads = self._grads() if backward else None
        return versions, grads

    def _grads(self) -> dict[int, Any]:
        with self.store.lock:
            items = list(self.store.objects.items())
        return {
            i: (id(t.grad), t.grad._version if t.grad is not None else -1)
            for i, t in items
            if isinstance(t, torch.Tensor) and t.requires_grad
        }

    def _taint_after(self, snapshot: tuple[list[Any], dict[int, Any] | None], also: list[int]) -> None:
        """Mark private whatever a computation on private data wrote into: tensors whose
        version moved, ``also``, gradients that changed, and every object sharing storage
        with one of them (views)."""
        versions, grads = snapshot
        changed = {i for i, t, v in versions if t._version != v}
        changed.update(also)
        if grads is not None:
            after = self._grads()
            changed.update(i for i, g in after.items() if grads.get(i) != g)
        changed -= self.store.private
        if not changed:
            return
        store = self.store
        with store.lock:
            keys = {storage_key(store.objects.get(i)) for i in changed} - {0}
            if keys:
                changed.update(i for i, o in store.objects.items() if storage_key(o) in keys)
            store.mark_private(changed - store.readonly)

    def _cmd_checked(self, req: Cmd) -> Any:
        op = req.op
        fn = self.resolve_op(op)
        if fn is None:
            raise OpNotAllowedError(f"op {op!r} is not allowed on worker {self.id!r}", worker=self.id, op=op)
        state = self._begin()
        caller = state.caller
        self._check_writable(req.result_ids, caller)
        args = tree_map(self._resolve_checked, req.args)
        kwargs = tree_map(self._resolve_checked, req.kwargs) if req.kwargs else {}
        writes = may_write(op, kwargs)
        if writes:
            refuse_writes(op, args, kwargs, self.store.readonly_storage, self.id)
        self.budget.check_op(op, fn, args, kwargs, self.store.nbytes)
        tainted = state.tainted
        snapshot = self._snapshot(state.refs, op in BACKWARD_OPS) if tainted else None
        if req.grad_enabled == torch.is_grad_enabled():
            result = self.call(fn, args, kwargs, req.result_ids)
        else:
            with torch.set_grad_enabled(req.grad_enabled):
                result = self.call(fn, args, kwargs, req.result_ids)
        if state.dp_released:  # fedws.dp.clip_and_noise charged a release: its results may leave
            tainted = state.dp_released = False
        self.store_results(op, result, req.result_ids, caller, tainted)
        if self.store.shared and not tainted:
            self._share_results(state.refs, req.result_ids)
        if snapshot is not None:
            targets = {id(t) for t in written_args(op, args, kwargs)} if writes else set()
            also = [i for i, t in state.refs if id(t) in targets]
            self._taint_after(snapshot, also)
        return _NO_VALUE

    def _store_checked(self, req: Store) -> Any:
        caller = self._frame.caller
        self._check_writable([req.obj_id], caller)
        self.store.set(req.obj_id, req.obj, req.tags, req.description, owner=caller)
        return _NO_VALUE

    def _get_checked(self, req: Get) -> Any:
        caller = self._frame.caller
        obj_id = req.obj_id
        store = self.store
        value = store.get(obj_id)
        if store.owners.get(obj_id) is not caller and obj_id not in store.shared:
            raise self._not_yours(obj_id)
        if req.remove and obj_id in store.readonly:  # (shared never holds served data)
            raise self._not_yours(obj_id)
        if type(value) is Failure:
            raise error_from_wire(value.error)
        rule = "not-private"
        extra: dict[str, Any] = {}
        if obj_id in store.private:
            dp = self.policy.dp
            if type(value) is StoredPlan:  # its state ran on private data: no release rule fits a plan
                raise self._deny(f"plan {obj_id} on worker {self.id!r} is private: it ran on private data", obj_id)
            if dp is None or (req.release != "dp" and not dp.always):
                how = "the output of a plan the operator approved"
                if dp is not None:
                    how += ", or a differentially private copy: ptr.get(dp=True)"
                raise self._deny(
                    f"object {obj_id} on worker {self.id!r} is private (computed from the data the node "
                    f"serves); it leaves only through a release rule of this node: {how}",
                    obj_id,
                )
            self._require(caller, "dp", obj_id)
            assert self.accountant is not None
            eps = self.accountant.charge(caller.principal, worker=self.id)
            value = dp_noise(value, dp)
            rule, extra = "dp", {"epsilon": round(eps, 6), "delta": dp.delta}
        if self.audit.enabled:
            self.audit.released(caller, obj_id, _nbytes(value), rule, **extra)
        # A caller fetching what it computed itself is a reply, not an event: one INFO line per
        # get was 7% of the node loop (and a coordinator thread reading it). Rule releases stay INFO.
        level = logging.DEBUG if rule == "not-private" else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "node %s: released object %d (%d bytes, %s) to %s", self.id, obj_id, _nbytes(value), rule,
                    _who(caller), extra={"event": "release", "principal": caller.principal, "bytes": _nbytes(value)})
        return self._finish_get(req, _plan_wire(value))

    def _delete_checked(self, req: Delete) -> Any:
        caller = self._frame.caller
        store = self.store
        mine, refused = [], []
        for i in req.ids:
            if store.owners.get(i) is caller or (i in store.shared and i not in store.readonly):
                mine.append(i)
            elif i in store.objects:
                refused.append(i)
        store.delete_many(mine)
        if refused:
            raise self._deny(
                f"{len(refused)} object(s) were not deleted: they belong to another session or are "
                f"data worker {self.id!r} serves (first: {refused[0]})",
                refused[0],
            )
        return _NO_VALUE

    def _search_checked(self, req: Search) -> Any:
        store = self.store
        # Only what the caller may see is compared: another session's tags, ids and
        # descriptions never take part in the match (nor in its timing).
        found = store.search(req.tags, store.visible(self._frame.caller))
        check_listing(len(found), self.id)
        return [_describe(e) for e in store.entries(found)]

    def _info_checked(self, req: Info) -> Any:
        caller = self._frame.caller
        store = self.store
        what = req.what
        if what == "count":
            return len(store.visible(caller))
        if what == "list":
            visible = store.visible(caller)
            check_listing(len(visible), self.id)
            return [_describe(e) for e in store.entries(visible)]
        if what == "nbytes":
            return store.nbytes
        if what == "status":
            return self._status(caller)
        assert req.obj_id is not None
        obj_id = req.obj_id
        if obj_id in store.objects and not self._may_use(obj_id, caller):
            raise self._not_yours(obj_id)
        if obj_id in store.private and obj_id not in store.readonly:
            # A computed private value's shape can depend on the data (nonzero, unique ...).
            raise self._deny(f"object {obj_id} is private: its shape may depend on the data", obj_id)
        return _meta(store.get(obj_id))

    def _clear_checked(self, req: Clear) -> Any:
        self.store.clear(owner=self._frame.caller)
        return _NO_VALUE

    def _guarded_op(self, name: str) -> Callable[..., Any] | None:
        """Resolver for plan steps: the op, refusing to write into served data."""
        fn = self._guarded_ops.get(name)
        if fn is None:
            base = self.resolve_op(name)
            if base is None:
                return None
            fn = self._guarded_ops[name] = guarded(base, name, self.store.readonly_storage, self.id)
        return fn

    def _run_plan_checked(self, req: RunPlan) -> Any:
        state = self._begin()
        caller = state.caller
        self._require(caller, "plans", req.plan_id)
        store = self.store
        plan_id = req.plan_id
        self._check_writable(req.result_ids, caller)
        if plan_id in store.objects and store.owners.get(plan_id) is not caller and plan_id not in store.shared:
            raise self._not_yours(plan_id)
        stored = load_plan(store, plan_id, self.id)
        code = stored.code
        check_call(code, req)
        inputs = flat_tensors(tree_map(self._resolve_checked, req.args))
        plan_private = plan_id in store.private
        tainted = state.tainted or plan_private
        approved = stored.digest in self.policy.approved_plans
        # An approved plan releases what it computes from served data; a value that is
        # already private-derived (or a plan whose state is) keeps its privacy.
        released = approved and not state.derived and not plan_private
        refs = state.refs
        snapshot = None
        if tainted and not released:
            snapshot = self._snapshot(refs, any(op.name in BACKWARD_OPS for op in code.ops))
        started = time.perf_counter()
        outputs = execute(
            code, inputs, stored.state, self._guarded_op, worker=self.id,
            guard=self.budget.plan_guard(self.store.nbytes),
        )
        ms = (time.perf_counter() - started) * 1000
        log.info("node %s: plan %r sha256 %s ran for %s in %.1f ms", self.id, code.name, stored.digest, _who(caller),
                 ms, extra={"event": "run_plan", "plan": stored.digest, "ms": round(ms, 3)})
        private = tainted and not released
        for rid, value in zip(req.result_ids, outputs):
            store.set(rid, value, owner=caller, private=private)
        if store.shared and not private:
            self._share_results(refs, req.result_ids)
        if snapshot is not None:
            # The plan may have written into any argument (.data =, .grad =): all are private now.
            self._taint_after(snapshot, [i for i, _ in refs])
            store.mark_private([plan_id])
        self.audit.record(
            "run_plan", caller, plan=stored.digest, name=code.name, approved=approved,
            private_inputs=tainted, outputs_private=private,
        )
        return _NO_VALUE

    def _store_plan_checked(self, req: StorePlan) -> Any:
        caller = self._frame.caller
        self._require(caller, "plans", req.plan_id)
        self._check_writable([req.plan_id], caller)
        code, plan_state = PlanCode.from_wire(req.plan, worker=self.id)
        digest = plan_digest(code, plan_state)
        approved = digest in self.policy.approved_plans
        log.log(
            logging.INFO if approved else logging.WARNING,
            "node %s: plan %r from %s/%s, sha256 %s (%s):\n%s",
            self.id, code.name, caller.principal, caller.session[:8], digest,
            "approved" if approved else "not approved: its outputs stay private",
            code.pretty(),
        )
        # The plan's code is the coordinator's program, not the node's data: the operator
        # reviews it from here (``fedws plan show``).
        self.audit.record(
            "store_plan", caller, plan=digest, name=code.name, ops=len(code.ops), approved=approved,
            code=code.pretty(),
        )
        self.store.set(req.plan_id, StoredPlan(code, plan_state, digest), req.tags, req.description, owner=caller)
        return _NO_VALUE

    # -- fedws ops ----------------------------------------------------------------------

    def _remote_get(self, obj_id: int) -> None:
        """Replace the pointer stored under ``obj_id`` by the data it points to."""
        enforce = self.enforce
        # A stored Failure raises, chained; under a policy, only the owner's pointer.
        ptr = (self._resolve_checked if enforce else self._resolve_ref)(ObjRef(obj_id))
        get = getattr(ptr, "get", None)
        if get is None or not hasattr(ptr, "id_at_location"):
            raise PointerError(
                f"remote_get: object {obj_id} on worker {self.id!r} is not a pointer"
            )
        value = get()
        self.store.set(obj_id, value, owner=self._frame.caller if enforce else None)

    def _end_get(self, obj_id: int) -> bool:
        """``ptr.end_get()`` reaching this node: is ``obj_id`` a pointer (then its own
        ``end_get`` runs, and the data ends up one hop before the end of the chain)?

        Returns False when ``obj_id`` is data: the pointer before it is the last one, and
        its holder gets the data itself. Under a policy only the owner's pointer is followed.
        """
        enforce = self.enforce
        ptr = (self._resolve_checked if enforce else self._resolve_ref)(ObjRef(obj_id))
        if not _is_pointer(ptr):
            return False
        value = ptr.end_get()
        if value is not ptr:  # ptr was the last pointer: its data is here now
            self.store.set(obj_id, value, owner=self._frame.caller if enforce else None)
        return True

    def _remote_send(self, obj_id: int, worker_id: str, remote_id: int, requires_grad: bool) -> None:
        """Send the data under ``obj_id`` to peer ``worker_id`` (as ``remote_id``) and keep a
        pointer to it in its place (``ptr.remote_send(worker)``).

        Under a policy the data leaves this node, so the rule of :meth:`_share` applies and
        more: only the owner's own, non-private value is sent; served data never is.

        Raises:
            PointerError: ``worker_id`` is not a peer of this node, or ``obj_id`` is a pointer.
        """
        if not isinstance(worker_id, str) or not isinstance(remote_id, int):
            raise TypeError("fedws.remote_send takes (object id, worker id, new id, requires_grad)")
        enforce = self.enforce
        if enforce:
            self._check_may_leave(obj_id, shared_ok=False)  # only the owner's own value goes
        value = self._resolve_ref(ObjRef(obj_id))
        if _is_pointer(value) or not isinstance(value, torch.Tensor):
            raise PointerError(f"remote_send: object {obj_id} on worker {self.id!r} is not a tensor holding data")
        if self.pointer_factory is None:
            raise PointerError(f"worker {self.id!r} cannot open links to other workers")
        if requires_grad and (value.dtype.is_floating_point or value.dtype.is_complex):
            value = value.detach().requires_grad_(True)
        ref = PointerRef(
            worker_id, None, remote_id, obj_id, tuple(value.shape), codec.DTYPE_NAMES[value.dtype],
            bool(value.requires_grad),
        )
        ptr = self.pointer_factory(ref)  # raises PointerError naming a peer this node does not know
        ptr.seq = ptr.location.store(value, obj_id=remote_id)
        self.store.set(obj_id, ptr, owner=self._frame.caller if enforce else None)

    def _share(self, obj_id: int) -> None:
        """Let any holder of ``obj_id`` use it (the owner sends a pointer to it elsewhere).

        The other node follows the pointer over its own link, in its own session; the
        object's id, a random 63-bit number, is then the capability. Private values are
        never shared: they do not leave, not even as a pointer held elsewhere.
        """
        if not self.enforce:
            return
        self._check_may_leave(obj_id, shared_ok=True)
        self.store.shared.add(obj_id)

    def _check_may_leave(self, obj_id: int, *, shared_ok: bool) -> None:
        """Refuse to let ``obj_id`` (or a pointer to it) leave this node unless the caller owns
        it (or, with ``shared_ok``, its owner shared it) and it is not private."""
        store = self.store
        if store.owners.get(obj_id) is not self._frame.caller and not (shared_ok and obj_id in store.shared):
            if obj_id in store.objects:
                raise self._not_yours(obj_id)
            store.get(obj_id)  # raises ObjectNotFoundError
        if obj_id in store.private:
            raise self._deny(
                f"object {obj_id} on worker {self.id!r} is private: it cannot be sent to another worker",
                obj_id,
            )

    def _persist(self, obj_id: int) -> None:
        """Keep ``obj_id`` past the end of its owner's session (see :meth:`end_session`).

        Only the owner may; the object stays the owner's (a durable object is still freed by
        ``delete``, ``get`` or ``clear_objects``). Open policy: a no-op (nothing is freed).
        """
        if not self.enforce:
            return
        store = self.store
        with store.lock:
            if store.owners.get(obj_id) is not self._frame.caller:
                if obj_id in store.objects:
                    raise self._not_yours(obj_id)
                store.get(obj_id)  # raises ObjectNotFoundError
            store.durable.add(obj_id)


def _who(caller: Caller) -> str:
    """``principal/session`` as log lines name a caller (the first 8 digits of the session)."""
    return f"{caller.principal}/{caller.session[:8]}"


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return int(value.numel() * value.element_size())
    return 0


def _describe(entry: Entry) -> list[Any]:
    """``[id, type, shape, dtype, requires_grad, tags, description]`` of a stored object."""
    obj = entry.obj
    shape: list[int] | None = None
    dtype, rg = "float32", False
    if isinstance(obj, torch.Tensor):
        shape, dtype, rg = list(obj.shape), codec.DTYPE_NAMES[obj.dtype], obj.requires_grad
    return [entry.id, type(obj).__name__, shape, dtype, rg, sorted(entry.tags), entry.description]


def _is_pointer(obj: Any) -> bool:
    """A live pointer (a chain): it has a location and an id there."""
    return hasattr(obj, "id_at_location") and hasattr(obj, "location")
def _plan_wire(value: Any) -> Any:
    """A plan leaves as its wire form (code and state), the form it arrived in."""
    if type(value) is StoredPlan:
        return value.code.to_wire(value.state)
    return value


def _recorder(seen: list[PointerRef]) -> Callable[[PointerRef], PointerRef]:
    def record(ref: PointerRef) -> PointerRef:
        seen.append(ref)
        return ref

    return record


def _meta(obj: Any) -> list[Any]:
    if not isinstance(obj, torch.Tensor):
        raise TypeError(f"object is a {type(obj).__name__}, not a tensor")
    return [list(obj.shape), codec.DTYPE_NAMES[obj.dtype], obj.requires_grad]
