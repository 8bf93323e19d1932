"""Worker: the coordinator's handle to one node = a :class:`Session` + a :class:`Link`.

The session does the bookkeeping (seqs, acks, futures) without I/O; the link moves the
frames (in this process, over a WebSocket, or into a test's mock). Everything above —
pointers, plans, training — talks to this class only, and no subclass changes how frames
move: that is the link's whole job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from contextvars import ContextVar
from typing import Any

import torch

from ..exceptions import FedwsError, FedwsTimeoutError, PointerError
from ..protocol.codec import PointerRef
from ..protocol.ids import new_id
from ..protocol.messages import MAX_SEARCH_TERM_CHARS, MAX_SEARCH_TERMS, Kind
from ..transport.inproc import InprocLink
from ..transport.io_thread import wait
from ..transport.link import Chunks, Endpoint, Link
from .federation import Federation
from .session import Session
from .status import NodeStatus
from .stream import store_chunked

__all__ = [
    "Worker",
    "LinkFactory",
    "SessionEndpoint",
    "executing_on",
    "as_federation",
    "search_terms",
    "search_result_makers",
    "found_tags",
]

LinkFactory = Callable[[Endpoint], Link]
"""Builds a worker's link, bound to the worker's endpoint (``MockLink`` is one)."""

# Requests that look at a node's store. Before one is sent, commands pending on the other
# workers of the federation are waited for, so what the sync API shows follows program
# order even across nodes (a command to alice may create objects on bob).
_OBSERVING = frozenset({Kind.INFO, Kind.SEARCH})

# The worker whose node is running the current request, if any: pointers that arrive
# while it runs belong to that worker, not to the coordinator.
executing_on: ContextVar[Worker | None] = ContextVar("executing_on", default=None)


SearchResultMaker = Callable[["Worker", list[Any]], Any]
"""Turns one search reply entry ``[id, type, shape, dtype, rg, tags, description]`` into a
handle, or returns None when the entry is not its kind."""

# Layers above register what a search result that is not a tensor becomes (plans register
# "a stored plan -> PointerPlan"): this layer cannot import them.
search_result_makers: list[SearchResultMaker] = []


def search_terms(query: tuple[Any, ...]) -> list[str]:
    """PySyft's query forms as one list of terms: ``search("#a", "#b")``, ``search(["#a",
    "#b"])`` and ids (``search(obj_id)``) all mean the same thing; duplicates are dropped."""
    terms: list[str] = []
    for q in query:
        for term in q if isinstance(q, (list, tuple, set, frozenset)) else (q,):
            if isinstance(term, bool) or not isinstance(term, (str, int)):
                raise TypeError(f"search terms are strings (tags, words of a description) or ids, got {term!r:.60}")
            text = str(term)
            if len(text) > MAX_SEARCH_TERM_CHARS:
                raise ValueError(f"a search term is at most {MAX_SEARCH_TERM_CHARS} characters, got {len(text)}")
            if text not in terms:
                terms.append(text)
    if len(terms) > MAX_SEARCH_TERMS:
        raise ValueError(f"a search has at most {MAX_SEARCH_TERMS} terms, got {len(terms)}")
    return terms


def found_tags(d: list[Any]) -> tuple[set[str], str | None]:
    """The tags and description of one search reply entry (only strings are kept)."""
    tags = d[5] if len(d) > 5 and isinstance(d[5], list) else []
    description = d[6] if len(d) > 6 and isinstance(d[6], str) else None
    return {t for t in tags if isinstance(t, str)}, description


def as_federation(hook: Any) -> Federation[Worker] | None:
    """The federation behind a worker constructor's first argument (a TorchHook or a Federation)."""
    if hook is None or isinstance(hook, Federation):
        return hook
    federation = getattr(hook, "federation", None)
    if not isinstance(federation, Federation):
        raise TypeError(f"expected a TorchHook or a Federation, got {type(hook).__name__}")
    return federation


class SessionEndpoint:
    """What a link sees of a worker: the session's frames, its replies, the loss of the link."""

    __slots__ = ("session", "worker")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.session = worker.session

    def take_frame(self) -> Chunks | None:
        return self.session.take_frame()

    def receive(self, reply: bytes | bytearray | memoryview, /) -> None:
        self.session.receive(reply, self.worker.pointer_factory)

    def link_lost(self, error: FedwsError, /) -> None:
        self.session.fail_all(error)


class Worker:
    """A handle to one node: a :class:`Session` whose frames a :class:`Link` moves.

    Users get workers from ``sy.VirtualWorker``, ``sy.WebsocketClientWorker`` or
    ``sy.connect``; a test of the layers above may build one on a mock link.

    Args:
        hook: the TorchHook or :class:`Federation` the worker joins (None: none).
        id: the node's id.
        link: builds the link from the worker's endpoint (None: set ``link`` later).
        timeout: default seconds a blocking call waits.

    Example:
        >>> from fedws.testing import MockLink
        >>> w = Worker(sy.Federation(), "bob", link=MockLink)
    """

    def __init__(
        self,
        hook: Any,
        id: str,
        *,
        link: LinkFactory | None = None,
        timeout: float | None = None,
    ) -> None:
        if not isinstance(id, str) or not id:
            raise ValueError(f"worker id must be a non-empty string, got {id!r}")
        self.id = id
        self.federation: Federation[Worker] | None = as_federation(hook)
        # PySyft's ``worker.hook`` (tutorials reach the hook through ``sy.local_worker.hook``);
        # None when the worker was built from a bare Federation.
        self.hook: Any = None if hook is None or isinstance(hook, Federation) else hook
        self.timeout = timeout
        self.session = Session(id)
        self.endpoint = SessionEndpoint(self)
        self.link: Link = link(self.endpoint) if link is not None else _NoLink()
        self.peers: dict[str, Worker] = {}
        self.is_client_worker = True  # seed attribute; fedws nodes always store objects
        if self.federation is not None:
            self.federation.register(self)

    @property
    def address(self) -> str | None:
        """Where the node is (``ws://host:port``, ``inproc://bob``), as its link says."""
        return self.link.address

    @property
    def connected(self) -> bool:
        return self.link.connected

    # -- moving frames (the link's job) --------------------------------------------------

    def flush(self) -> None:
        """Send every queued request now."""
        self.link.flush()

    def flush_soon(self) -> None:
        """Send queued requests shortly; safe from ``__del__`` and any thread."""
        self.link.flush_soon()

    def queue_delete(self, obj_id: int) -> None:
        """Delete ``obj_id`` on the node with the next frame; safe from ``__del__``."""
        self.session.queue_delete(obj_id)
        self.link.flush_soon()

    def ack_future(self, seq: int) -> Future[Any]:
        """A future that completes once the node has run request ``seq`` (or failed it)."""
        fut = self.session.ack_future(seq)
        if not fut.done():
            self.link.flush()
        return fut

    def error_of(self, seq: int) -> Exception | None:
        """The remote error of request ``seq``, if it failed (and is still remembered)."""
        return self.session.error_of(seq)

    def call_timeout(self, timeout: float | None = None) -> float | None:
        """The timeout a blocking call uses: ``timeout`` if given, else the worker's."""
        return self.timeout if timeout is None else timeout

    def close(self) -> None:
        """Close the link. Objects on the node stay there."""
        self.link.close()

    async def aclose(self) -> None:
        await self.link.aclose()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Worker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- requests ------------------------------------------------------------------------

    def submit(self, kind: Kind, *fields: Any, want_value: bool = False) -> tuple[int, Future[Any] | None]:
        """Queue a request and get it moving; returns (seq, value future or None)."""
        seq, fut, borrowed = self.session.submit(kind, *fields, want_value=want_value)
        if borrowed:  # the frame holds the tensor's memory: return once it is written
            self.link.flush_and_wait(self.timeout)
        else:  # nobody waits on a plain command yet: the link may batch it
            self.link.flush(urgent=want_value)
        return seq, fut

    def request(self, kind: Kind, *fields: Any, timeout: float | None = None) -> Any:
        """Send a request that returns a value and block for it."""
        if kind in _OBSERVING and self.federation is not None:
            self.federation.settle(exclude=self, timeout=self.call_timeout(timeout))
        _, fut = self.submit(kind, *fields, want_value=True)
        assert fut is not None
        return wait(fut, self.call_timeout(timeout), f"{Kind(kind).name.lower()} on worker {self.id!r}")

    async def request_async(self, kind: Kind, *fields: Any, timeout: float | None = None) -> Any:
        _, fut = self.submit(kind, *fields, want_value=True)
        assert fut is not None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.call_timeout(timeout))
        except TimeoutError:
            raise FedwsTimeoutError(
                f"{Kind(kind).name.lower()} on worker {self.id!r} did not finish within "
                f"{self.call_timeout(timeout)} s"
            ) from None

    def pointer_factory(self, ref: PointerRef) -> Any:
        """Turn a pointer that arrived in a reply into a live pointer."""
        owner = executing_on.get()
        if owner is not None:
            return owner.pointer_from_ref(ref)
        local = self.federation.local_worker if self.federation is not None else None
        if not isinstance(local, Worker):
            raise PointerError(f"received a pointer to {ref.location!r} but worker {self.id!r} has no federation")
        return local.pointer_from_ref(ref)

    # -- the user API --------------------------------------------------------------------

    def store(self, obj: Any, *, obj_id: int, tags: Iterable[str] = (), description: str | None = None) -> int:
        """Store ``obj`` on the node under ``obj_id``; returns the request's seq.

        A tensor too large for one frame of the link goes in chunks (:mod:`fedws.client.stream`).
        """
        above = getattr(self.link, "stream_above", None)
        if above is not None and isinstance(obj, torch.Tensor) and not tags and description is None:
            if obj.numel() * obj.element_size() > above:
                return store_chunked(self, obj, obj_id=obj_id, chunk_bytes=getattr(self.link, "chunk_bytes", 1 << 20))
        seq, _ = self.submit(Kind.STORE, obj_id, obj, sorted(set(tags)), description)
        return seq

    def search(self, *query: Any) -> list[Any]:
        """Pointers to the node's objects that match every term of ``query`` (PySyft's search).

        A term matches an object when it is one of its tags, its id, or a piece of its
        description: ``bob.search("#boston", "#data")`` and ``bob.search(["#boston",
        "#data"])`` are the same query. Each result carries ``.tags`` and ``.description``;
        a stored plan comes back as a :class:`~fedws.plans.PointerPlan`. A private node
        searches only what the caller may see. The pointers do not own the data: dropping
        them never deletes it.

        Raises:
            ValueError: more than 32 terms, or a term longer than 256 characters (a node
                refuses such a query too).
        """
        return [self._search_result(d) for d in self.request(Kind.SEARCH, search_terms(query))]

    async def search_async(self, *query: Any) -> list[Any]:
        """``await worker.search_async(...)``: the async form of :meth:`search`."""
        found = await self.request_async(Kind.SEARCH, search_terms(query))
        return [self._search_result(d) for d in found]

    def request_search(self, query: Any, location: Worker) -> list[Any]:
        """PySyft's ``me.request_search(query, location=bob)``: ``bob.search(query)``."""
        return location.search(query)

    def _search_result(self, d: list[Any]) -> Any:
        """A handle that does not own the object, with the object's tags and description."""
        for make in search_result_makers:
            found = make(self, d)
            if found is not None:
                return found
        obj_id, _type, shape, dtype, rg = d[0], d[1], d[2], d[3], d[4]
        ptr = self._federation().make_pointer(
            self, obj_id, shape=shape, dtype=dtype, requires_grad=rg, owner=self.owner, id=new_id(), owns=False
        )
        ptr.tags, ptr.description = found_tags(d)
        return ptr

    @property
    def owner(self) -> Worker:
        """Who owns the pointers this worker hands out: the federation's local worker."""
        local = self.federation.local_worker if self.federation is not None else None
        return local if isinstance(local, Worker) else self

    def _federation(self) -> Federation[Worker]:
        if self.federation is None:
            raise PointerError(f"worker {self.id!r} belongs to no federation: it cannot make pointers")
        return self.federation

    def objects_count_remote(self) -> int:
        """How many objects the node holds (after pending deletes are applied)."""
        return int(self.request(Kind.INFO, "count"))

    def list_objects_remote(self) -> list[dict[str, Any]]:
        """What the node holds: id, type, shape, dtype, tags and description of each object."""
        keys = ("id", "type", "shape", "dtype", "requires_grad", "tags", "description")
        return [dict(zip(keys, d)) for d in self.request(Kind.INFO, "list")]

    def clear_objects_remote(self) -> Worker:
        """Delete every object the node holds."""
        self.request(Kind.PING)  # a barrier: earlier commands have run
        self.submit(Kind.CLEAR)
        self.request(Kind.PING)
        return self

    def clear_objects(self) -> Worker:
        """Same as :meth:`clear_objects_remote` (the seed's name); returns the worker."""
        return self.clear_objects_remote()

    def ping(self, timeout: float | None = None) -> float:
        """Round trip to the node, in seconds; also a barrier for every command sent before it."""
        start = time.perf_counter()
        self.request(Kind.PING, timeout=timeout)
        return time.perf_counter() - start

    def info(self, timeout: float | None = None) -> NodeStatus:
        """The node's status (what ``fedws status`` shows); a private node shows a
        principal without the ``status`` permission only its own session's numbers."""
        url = getattr(self, "address", None)
        return NodeStatus.from_wire(self.request(Kind.INFO, "status", timeout=timeout), url=url)

    def add_worker(self, worker: Worker) -> Worker:
        """Tell this node where ``worker`` is, so pointers between them can be followed."""
        self.peers[worker.id] = worker
        return self

    def resolve_peer(self, worker_id: str) -> Worker:
        """The handle this worker uses to reach ``worker_id`` (itself included).

        Its peers first (``add_worker``, a node's listed peers); then, for an in-process
        worker, the other in-process workers of its federation: VirtualWorkers of one hook
        know each other, as in PySyft. A node process's federation holds no in-process
        worker but its own, so a real node still reaches only the peers its operator listed.

        Raises:
            PointerError: ``worker_id`` is unknown here; the message names it and says how
                to make it known.
        """
        if worker_id == self.id:
            return self
        peer = self.peers.get(worker_id)
        if peer is not None:
            return peer
        peer = self._inproc_sibling(worker_id)
        if peer is not None:
            return peer
        raise PointerError(
            f"worker {self.id!r} does not know worker {worker_id!r}, so it cannot follow a pointer "
            f"there: on a node, list {worker_id!r} under [[peers]] in {self.id!r}'s config (a "
            f"--insecure-dev node also accepts {self.id}.add_worker({worker_id})); in-process "
            f"workers need to share a federation (the same hook)"
        )

    def _inproc_sibling(self, worker_id: str) -> Worker | None:
        """``worker_id`` if it and this worker are in-process workers of one federation."""
        federation = self.federation
        if federation is None or not isinstance(self.link, InprocLink):
            return None
        peer = federation.workers.get(worker_id)
        # The local worker "me" is the coordinator, not a node its workers follow pointers to.
        if peer is None or peer is federation.local_worker or not isinstance(peer.link, InprocLink):
            return None
        return peer

    def pointer_from_ref(self, ref: PointerRef) -> Any:
        """A pointer owned by this worker for a PointerRef that arrived here."""
        return self._federation().make_pointer(
            self.resolve_peer(ref.location),
            ref.id_at_location,
            shape=ref.shape,
            dtype=ref.dtype,
            requires_grad=ref.requires_grad,
            owner=self,
            id=ref.id,
            arrived=True,
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id:{self.id}>"


class _NoLink:
    """The link of a worker built without one: nothing moves until a real link is set."""

    address: str | None = None
    connected = False

    def flush(self, *, urgent: bool = True) -> None:
        pass

    def flush_soon(self) -> None:
        pass

    def flush_and_wait(self, timeout: float | None) -> None:
        pass

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass
