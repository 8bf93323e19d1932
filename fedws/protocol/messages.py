"""Message kinds, the typed request records, and the shapes of requests and replies.

A request is a msgpack array ``[kind, seq, *fields]``; a frame carries one or more
requests, which a node runs in order. A node answers each frame with one reply::

    [watermark, values, errors]

``watermark`` is the highest seq the node has finished; ``values`` lists ``[seq, value]``
for requests that return something (get, search, info); ``errors`` lists
``[seq, error, result_ids]`` for requests that failed. A seq below the watermark with no
error entry succeeded: plain commands are acknowledged without a message of their own,
which is what lets thousands of pipelined commands cost one small reply.

Each kind has a small frozen record (:class:`Cmd`, :class:`Store`, ...). ``Record.parse(fields)``
checks the count and types of the fields after ``[kind, seq]`` and raises
:class:`~fedws.exceptions.DecodeError` naming the request kind; ``record.fields()`` gives
them back as they travel, and ``record.to_wire(seq)`` the whole request. The records add
nothing to the wire: a request built by hand as a list is the same bytes.

Example:
    >>> Cmd.parse(["torch.add", [1, 2], {}, [7]])
    Cmd(op='torch.add', args=[1, 2], kwargs={}, result_ids=[7], grad_enabled=True)
    >>> Get(5, True).to_wire(seq=3)
    [3, 3, 5, True]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, NamedTuple, TypeVar

from ..exceptions import DecodeError

__all__ = [
    "Kind",
    "FRAME_ERROR_SEQ",
    "Request",
    "Blame",
    "Cmd",
    "Store",
    "Get",
    "Delete",
    "Search",
    "Info",
    "Clear",
    "RunPlan",
    "AddPeer",
    "Ping",
    "StorePlan",
    "REQUESTS",
    "INFO_WHATS",
    "MAX_RESULT_IDS",
    "MAX_DELETE_IDS",
    "MAX_SEARCH_TERMS",
    "MAX_SEARCH_TERM_CHARS",
    "MAX_TAGS",
    "MAX_TAG_CHARS",
    "MAX_DESCRIPTION_CHARS",
    "RELEASE_MODES",
    "split_request",
    "parse_request",
]


class Kind(IntEnum):
    """What a request asks a node to do. Fields follow ``[kind, seq]``."""

    CMD = 1  # op, args, kwargs, result_ids[, grad_enabled] — run an allowlisted op, store results
    STORE = 2  # id, obj, tags, description — store a value
    GET = 3  # id, remove[, release] — return a value (and remove it); release "dp": a DP copy
    DELETE = 4  # ids — forget objects; missing ids are ignored
    SEARCH = 5  # terms — ids and metadata of objects matching every term (tag, id or description text)
    INFO = 6  # what — "count" | "list" | "nbytes" | "status" | "meta" (+ id)
    CLEAR = 7  # — forget every object
    RUN_PLAN = 8  # plan_id, args, result_ids — run a stored plan
    ADD_PEER = 9  # worker_id, address — tell the node where another node is
    PING = 10  # — round trip, nothing else
    STORE_PLAN = 11  # id, plan[, tags, description] — check a plan against the allowlist and store it


# Seq used in an error entry that concerns the whole frame (it could not be decoded).
FRAME_ERROR_SEQ = -1

# Result ids of one CMD or RUN_PLAN, and ids of one DELETE. A command with 10^6 result ids
# made the node hold 10^6 failures (and every later INFO list describe them); real commands
# have a few (``unbind`` of a batch: its length). Clients split larger deletes.
MAX_RESULT_IDS = 4096
MAX_DELETE_IDS = 4096

# A search is a few terms (PySyft's tutorials use one to three). Every term is matched
# against every visible object's tags and description, on the node's event loop: the
# bounds keep one request's work proportional to the store, not to what a peer sends.
MAX_SEARCH_TERMS = 32
MAX_SEARCH_TERM_CHARS = 256
# What an object may carry to be found by: tags and a description (searched as text).
MAX_TAGS = 256
MAX_TAG_CHARS = 256
MAX_DESCRIPTION_CHARS = 16384

# Release modes a GET may ask for.
RELEASE_MODES = frozenset({"dp"})

# What an INFO request may ask.
INFO_WHATS = frozenset({"count", "list", "nbytes", "meta", "status"})


class Blame(NamedTuple):
    """What a failed request was about: its op, its object, the ids its results would have had."""

    op: str | None = None
    obj_id: int | None = None
    result_ids: list[int] = []


_NO_BLAME = Blame()
R = TypeVar("R", bound="Request")


# -- field checks ---------------------------------------------------------------------------


def _is_id(v: Any) -> bool:
    return type(v) is int


def _bad(kind: Kind, what: str, v: Any) -> DecodeError:
    return DecodeError(f"malformed {kind.name} request: {what}, got {type(v).__name__} {v!r:.60}")


def _count(kind: Kind, fields: Sequence[Any], *allowed: int) -> None:
    if len(fields) not in allowed:
        want = " or ".join(str(n) for n in allowed)
        raise DecodeError(f"malformed {kind.name} request: {want} fields expected, got {len(fields)}")


def _id(kind: Kind, name: str, v: Any) -> int:
    if not _is_id(v):
        raise _bad(kind, f"{name} must be an int", v)
    return int(v)


def _ids(kind: Kind, name: str, v: Any, cap: int = MAX_RESULT_IDS) -> list[int]:
    if type(v) is not list or not all([type(i) is int for i in v]):
        raise _bad(kind, f"{name} must be a list of ints", v)
    if len(v) > cap:
        raise DecodeError(f"malformed {kind.name} request: {len(v)} {name}, at most {cap}")
    return v


def _strs(kind: Kind, name: str, v: Any) -> list[str]:
    if type(v) is not list or not all([type(s) is str for s in v]):
        raise _bad(kind, f"{name} must be a list of strings", v)
    return v


def _bounded_strs(kind: Kind, name: str, v: Any, count: int, chars: int) -> list[str]:
    """A list of at most ``count`` strings of at most ``chars`` characters each."""
    strs = _strs(kind, name, v)
    if len(strs) > count:
        raise DecodeError(f"malformed {kind.name} request: {len(strs)} {name}, at most {count}")
    if any([len(s) > chars for s in strs]):
        raise DecodeError(f"malformed {kind.name} request: one of the {name} is longer than {chars} characters")
    return strs


def _description(kind: Kind, v: Any) -> str | None:
    d = _opt_str(kind, "description", v)
    if d is not None and len(d) > MAX_DESCRIPTION_CHARS:
        raise DecodeError(
            f"malformed {kind.name} request: description of {len(d)} characters, at most {MAX_DESCRIPTION_CHARS}"
        )
    return d


def _str(kind: Kind, name: str, v: Any) -> str:
    if type(v) is not str:
        raise _bad(kind, f"{name} must be a string", v)
    return v


def _opt_str(kind: Kind, name: str, v: Any) -> str | None:
    if v is not None and type(v) is not str:
        raise _bad(kind, f"{name} must be a string or None", v)
    return v


def _bool(kind: Kind, name: str, v: Any) -> bool:
    if type(v) is not bool:
        raise _bad(kind, f"{name} must be a bool", v)
    return v


def _ids_at(fields: Sequence[Any], i: int) -> list[int]:
    """Lenient read for :meth:`Request.blame`: the ints of a list field, or none (also when
    there are more than :data:`MAX_RESULT_IDS`: a node holds no failure for those)."""
    v = fields[i] if len(fields) > i else None
    return [x for x in v if _is_id(x)] if type(v) is list and len(v) <= MAX_RESULT_IDS else []


def _id_at(fields: Sequence[Any], i: int) -> int | None:
    v = fields[i] if len(fields) > i else None
    return v if _is_id(v) else None


# -- records --------------------------------------------------------------------------------


class Request:
    """Base of the request records: ``parse`` checks wire fields, ``fields`` gives them back."""

    __slots__ = ()
    KIND: ClassVar[Kind]

    @classmethod
    def parse(cls: type[R], fields: Sequence[Any]) -> R:
        """Check the fields after ``[kind, seq]`` and build the record.

        Raises:
            DecodeError: wrong number of fields or a field of the wrong type.
        """
        raise NotImplementedError

    def fields(self) -> list[Any]:
        """The fields after ``[kind, seq]``, as they travel."""
        raise NotImplementedError

    def to_wire(self, seq: int) -> list[Any]:
        """The whole request: ``[kind, seq, *fields]``."""
        return [int(self.KIND), seq, *self.fields()]

    @classmethod
    def blame(cls, fields: Sequence[Any]) -> Blame:
        """What a failure of this request is about, read leniently from fields that may
        be malformed: the node reports it and holds the failure under ``result_ids``."""
        return _NO_BLAME


@dataclass(frozen=True, slots=True)
class Cmd(Request):
    """Run an allowlisted op and store its results under ``result_ids``.

    ``grad_enabled`` is the caller's grad mode; it travels only when it is off.
    """

    KIND: ClassVar[Kind] = Kind.CMD
    op: str
    args: list[Any]
    kwargs: dict[str, Any]
    result_ids: list[int]
    grad_enabled: bool = True

    @classmethod
    def parse(cls, fields: Sequence[Any]) -> Cmd:
        k = cls.KIND
        _count(k, fields, 4, 5)
        op, args, kwargs, result_ids = fields[:4]
        if type(args) is not list:
            raise _bad(k, "args must be a list", args)
        if type(kwargs) is not dict or (kwargs and not all([type(key) is str for key in kwargs])):
            raise _bad(k, "kwargs must be a dict with string keys", kwargs)
        grad = _bool(k, "grad_enabled", fields[4]) if len(fields) == 5 else True
        return cls(_str(k, "op", op), args, kwargs, _ids(k, "result_ids", result_ids), grad)

    def fields(self) -> list[Any]:
        head = [self.op, self.args, self.kwargs, self.result_ids]
        return head if self.grad_enabled else [*head, False]

    @classmethod
    def blame(cls, fields: Sequence[Any]) -> Blame:
        op = fields[0] if fields and type(fields[0]) is str else None
        return Blame(op, None, _ids_at(fields, 3))


@dataclass(frozen=True, slots=True)
class Store(Request):
    """Store a value under ``obj_id`` with tags and a description."""

    KIND: ClassVar[Kind] = Kind.STORE
    obj_id: int
    obj: Any
    tags: list[str]
    description: str | None

    @classmethod
    def parse(cls, fields: Sequence[Any]) -> Store:
        k = cls.KIND
        _count(k, fields, 4)
        obj_id, obj, tags, description = fields
        tags = [] if tags is None else _bounded_strs(k, "tags", tags, MAX_TAGS, MAX_TAG_CHARS)
        return cls(_id(k, "obj_id", obj_id), obj, tags, _description(k, description))

    def fields(self) -> list[Any]:
        return [self.obj_id, self.obj, self.tags, self.description]

    @classmethod
    def blame(cls, fields: Sequence[Any]) -> Blame:
        # A store that failed (store full, a pointer to an unknown peer) leaves its error
        # where the object would be, so commands using it fail with this cause.
        obj_id = _id_at(fields, 0)
        return Blame(None, obj_id, [] if obj_id is None else [obj_id])


@dataclass(frozen=True, slots=True)
class Get(Request):
    """Return the value under ``obj_id``; ``remove`` deletes it once the reply is built.

    ``release`` asks for a release mode (one of :data:`RELEASE_MODES`; ``"dp"``: a
    differentially private copy of a private value); it travels only when given.
    """

    KIND: ClassVar[Kind] = Kind.GET
    obj_id: int
    remove: bool
    release: str | None = None

    @classmethod
    def parse(cls, fields: Sequence[Any]) -> Get:
        k = cls.KIND
        _count(k, fields, 2, 3)
        release = fields[2] if len(fields) == 3 else None
        if release is not None and release not in RELEASE_MODES:
            raise _bad(k, f"release must be one of {sorted(RELEASE_MODES)}", release)
        return cls(_id(k, "obj_id", fields[0]), _bool(k, "remove", fields[1]), release)

    def fields(self) -> list[Any]:
        return [self.obj_id, self.remove] if self.release is None else [self.obj_id, self.remove, self.release]

    @classmethod
    def blame(cls, fields: Sequence[Any]) -> Blame:
        return Blame(None, _id_at(fields, 0), [])


@dataclass(frozen=True, slots=True)
class Delete(Request):
    """Forget the objects under ``ids``; missing ids are ignored."""

    KIND: ClassVar[Kind] = Kind.DELETE
    ids: list[int]

    @classmethod
    def parse(cls, fields: Sequence[Any]) -> Delete:
        _count(cls.KIND, fields, 1)
        return cls(_ids(cls.KIND, "ids", fields[0], MAX_DELETE_IDS))

    def fields(self) -> list[Any]:
        return [self.ids]


@dataclass(frozen=True, slots=True)
class Search(Request):
    """Describe the objects that match every one of ``tags`` (the query's terms).

    As in PySyft 0.2, a term matches an object when it is one of the object's tags, its
    id written in decimal, or a piece of its description. At most
    :data:`MAX_SEARCH_TERMS` terms of :data:`MAX_SEARCH_TERM_CHARS` characters each.
    """

    KIND: ClassVar[Kind] = Kind.SEARCH
    tags: list[str]

    @classmethod
    def parse(cls, fields: Sequence[Any]) -> Search:
        _count(cls.KIND, fields, 1)
        return cls(_bounded_strs(cls.KIND, "tags", fields[0], MAX_SEARCH_TERMS, MAX_SEARCH_TERM_CHARS))

    def fields(self) -> list[Any]:
        return [self.tags]


@dataclass(frozen=True, slots=True)
class Info(Request):
    """Ask about the store: ``what`` is one of :data:`INFO_WHATS`; ``"meta"`` names an object."""

    KIND: ClassVar[Kind] = Kind.INFO
    what: str
    obj_id: int | None = None

    @classmethod
    def parse(cls, fields: Sequence[Any]) -> Info:
        k = cls.KIND
        _count(k, fields, 1, 2)
        what = fields[0]
        if type(what) is not str or what not in INFO_WHATS:
            raise _bad(k, f"what must be one of {sorted(INFO_WHATS)}", what)
        if (what == "meta") != (len(fields) == 2):
            raise DecodeError("malformed INFO request: an object id goes with 'meta' and nothing else")
        return cls(what, _id(k, "obj_id", fields[1]) if len(fields) == 2 else None)

    def fields(self) -> list[Any]:
        return [self.what] if self.obj_id is None else [self.what, self.obj_id]

    @classmethod
    def blame(cls, fields: Sequence[Any]) -> Blame:
        return Blame(None, _id_at(fields, 1), [])


@dataclass(frozen=True, slots=True)
class Clear(Request):
    """Forget every object."""

    KIND: ClassVar[Kind] = Kind.CLEAR

    @classmethod
    def parse(cls, fields: Sequence[Any]) -> Clear:
        _count(cls.KIND, fields, 0)
        return cls()

    def fields(self) -> list[Any]:
        return []


@dataclass(frozen=True, slots=True)
class RunPlan(Request):
    """Run the stored plan ``plan_id`` on ``args``; store its outputs under ``result_ids``."""

    KIND: ClassVar[Kind] = Kind.RUN_PLAN
    plan_id: int
    args: list[Any]
    result_ids: list[int]

    @classmethod
    def parse(cls, fields: Sequence[Any]) -> RunPlan:
        k = cls.KIND
        _count(k, fields, 3)
        plan_id, args, result_ids = fields
        if type(args) is not list:
            raise _bad(k, "args must be a list", args)
        return cls(_id(k, "plan_id", plan_id), args, _ids(k, "result_ids", result_ids))

    def fields(self) -> list[Any]:
        return [self.plan_id, self.args, self.result_ids]

    @classmethod
    def blame(cls, fields: Sequence[Any]) -> Blame:
        return Blame(None, _id_at(fields, 0), _ids_at(fields, 2))


@dataclass(frozen=True, slots=True)
class AddPeer(Request):
    """Tell the node where another node is (``address`` None: it should know already)."""

    KIND: ClassVar[Kind] = Kind.ADD_PEER
    worker_id: str
    address: str | None

    @classmethod
    def parse(cls, fields: Sequence[Any]) -> AddPeer:
        k = cls.KIND
        _count(k, fields, 2)
        worker_id = _str(k, "worker_id", fields[0])
        return cls(worker_id, _opt_str(k, "address", fields[1]))

    def fields(self) -> list[Any]:
        return [self.worker_id, self.address]


@dataclass(frozen=True, slots=True)
class Ping(Request):
    """A round trip, nothing else (a barrier for the requests before it)."""

    KIND: ClassVar[Kind] = Kind.PING

    @classmethod
    def parse(cls, fields: Sequence[Any]) -> Ping:
        _count(cls.KIND, fields, 0)
        return cls()

    def fields(self) -> list[Any]:
        return []


@dataclass(frozen=True, slots=True)
class StorePlan(Request):
    """Check a plan (``PlanCode`` wire form) against the allowlist and store it.

    ``tags`` and ``description`` (``plan.tag(...)``, ``plan.describe(...)``) let
    ``worker.search`` find the plan; they travel only when one is given.
    """

    KIND: ClassVar[Kind] = Kind.STORE_PLAN
    plan_id: int
    plan: Any
    tags: list[str] = field(default_factory=list)
    description: str | None = None

    @classmethod
    def parse(cls, fields: Sequence[Any]) -> StorePlan:
        k = cls.KIND
        _count(k, fields, 2, 4)
        if len(fields) == 2:
            return cls(_id(k, "plan_id", fields[0]), fields[1])
        tags = [] if fields[2] is None else _bounded_strs(k, "tags", fields[2], MAX_TAGS, MAX_TAG_CHARS)
        return cls(_id(k, "plan_id", fields[0]), fields[1], tags, _description(k, fields[3]))

    def fields(self) -> list[Any]:
        if not self.tags and self.description is None:
            return [self.plan_id, self.plan]
        return [self.plan_id, self.plan, self.tags, self.description]

    @classmethod
    def blame(cls, fields: Sequence[Any]) -> Blame:
        # A refused plan leaves its error under its id: running it later fails with the reason.
        plan_id = _id_at(fields, 0)
        return Blame(None, plan_id, [] if plan_id is None else [plan_id])


REQUESTS: dict[Kind, type[Request]] = {
    cls.KIND: cls for cls in (Cmd, Store, Get, Delete, Search, Info, Clear, RunPlan, AddPeer, Ping, StorePlan)
}
_KINDS: dict[int, Kind] = {int(k): k for k in Kind}  # Kind(n) is slow on a hot path


def split_request(msg: Any) -> tuple[Kind, int, list[Any]]:
    """``[kind, seq, *fields]`` -> ``(kind, seq, fields)``, checking the envelope only.

    Raises:
        DecodeError: not a list, an unknown kind, or a seq that is not an int.
    """
    if type(msg) is not list or len(msg) < 2:
        raise DecodeError(f"malformed request: expected [kind, seq, *fields], got {type(msg).__name__}")
    kind = _KINDS.get(msg[0]) if type(msg[0]) is int else None
    if kind is None:
        raise DecodeError(f"malformed request: unknown kind {msg[0]!r:.40}")
    seq = msg[1]
    if type(seq) is not int:
        raise DecodeError(f"malformed {kind.name} request: seq must be an int, got {type(seq).__name__}")
    return kind, seq, msg[2:]


def parse_request(kind: Kind, fields: Sequence[Any]) -> Request:
    """The record of a request of ``kind`` (see :meth:`Request.parse`)."""
    return REQUESTS[kind].parse(fields)
