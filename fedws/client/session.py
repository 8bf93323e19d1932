"""Session: the coordinator's bookkeeping for one link to one node, with no I/O.

It numbers requests, queues their encoded bytes until a transport takes a frame, and turns
the node's replies into resolved futures. A reply it cannot use fails the requests it
answers and nothing else: the link stays up. Commands are acknowledged by the reply's
watermark, so a command nobody awaits costs no future at all; a future is made only when
someone asks (``ack_future``) or when a request returns a value.

Thread-safety: user threads submit while the IO thread takes frames and feeds replies;
one lock guards the counters, and futures are resolved outside it.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ..exceptions import FedwsError, ProtocolError, RemoteError
from ..protocol import codec
from ..protocol.codec import PointerRef
from ..protocol.errors import error_from_wire
from ..protocol.messages import FRAME_ERROR_SEQ, MAX_DELETE_IDS, Kind
from ..protocol.tree import tree_map

__all__ = ["Session"]

_MAX_REMEMBERED_ERRORS = 10_000
_MAX_LOST_RANGES = 10_000  # one per lost link; the oldest are forgotten past this
# Requests whose answer depends on what the node holds. Deletes queued before one of these
# are sent before it; other requests may overtake deletes (a dead pointer's id cannot be
# named by a later command), which lets many deletes share one message.
_OBSERVING = frozenset({Kind.INFO, Kind.SEARCH, Kind.CLEAR, Kind.PING, Kind.GET})
# Messages larger than this stay borrowed (not copied) until the transport writes them.
COPY_LIMIT = 1 << 20


class Session:
    """Requests in flight on one link, and what became of them."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._last_seq = 0
        self._outbox: list[bytes | memoryview] = []
        self._outbox_msgs = 0
        self._deletes: deque[int] = deque()
        self._acked = 0
        self._requests: dict[int, Future[Any]] = {}
        self._waiters: list[tuple[int, int, Future[Any]]] = []
        self._tie = itertools.count()
        # Wire descriptions, not exception objects: a raised exception carries a traceback
        # whose frames hold pointers, and remembering it would keep their objects alive.
        self._errors: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._lost: FedwsError | None = None
        # Requests a lost link took with it, as (first seq, last seq, the loss), oldest
        # first: none of them was acknowledged, so none may ever report success, even when
        # asked after the loss or after a reconnect (seqs go on from where they were).
        # The loss is kept as type and args: a raised exception's traceback holds pointers.
        self._lost_ranges: list[tuple[int, int, type[FedwsError], tuple[Any, ...]]] = []
        # Seq range of each frame taken and not answered yet, oldest first: a node answers
        # one reply per frame, in order, so an unreadable reply names the requests it fails.
        self._outbox_first = 0
        self._in_flight: deque[tuple[int, int]] = deque()
        self.frames_taken = 0
        self.messages_sent = 0
        self.bytes_received = 0

    # -- producing requests -------------------------------------------------------------

    def submit(self, kind: Kind, *fields: Any, want_value: bool = False) -> tuple[int, Future[Any] | None, bool]:
        """Queue a request. Returns (seq, value future or None, borrowed).

        ``borrowed`` is True when the message holds large tensor memory by reference: the
        caller must not let the tensor change until the transport has written the frame.
        """
        with self._lock:
            if self._lost is not None:
                raise self._lost_error()
            if self._deletes and kind in _OBSERVING:  # it must see the deletes queued before it
                self._queue_deletes()
            seq = next(self._seq)
            message = [int(kind), seq, *fields]
            blob = codec.encode_plain(message)  # a command on pointers: one msgpack call
            if blob is None:  # tensors, tuples, ...: the general encoder
                chunks = codec.encode(message)
            if not self._outbox:
                self._outbox_first = seq
            borrowed = False
            if blob is not None:
                self._outbox.append(blob)
            else:
                borrowed = sum(len(c) for c in chunks) > COPY_LIMIT
                if borrowed:
                    self._outbox.extend(chunks)
                else:
                    self._outbox.append(b"".join(chunks))
            self._outbox_msgs += 1
            self._last_seq = seq
            fut: Future[Any] | None = None
            if want_value:
                fut = Future()
                self._requests[seq] = fut
            return seq, fut, borrowed

    def queue_delete(self, obj_id: int) -> None:
        """Ask for ``obj_id`` to be deleted with the next frame. Safe from ``__del__``."""
        self._deletes.append(obj_id)

    def has_outgoing(self) -> bool:
        return bool(self._outbox) or bool(self._deletes)

    def take_frame(self) -> list[bytes | memoryview] | None:
        """Everything queued, as the chunks of one frame; None if nothing is queued."""
        with self._lock:
            if self._deletes:
                self._queue_deletes()
            if not self._outbox:
                return None
            frame, self._outbox = self._outbox, []
            self._in_flight.append((self._outbox_first, self._last_seq))
            self.messages_sent += self._outbox_msgs
            self._outbox_msgs = 0
            self.frames_taken += 1
            return frame

    def _queue_deletes(self) -> None:
        while self._deletes:  # at most MAX_DELETE_IDS ids per message (nodes refuse more)
            ids: list[int] = []
            while self._deletes and len(ids) < MAX_DELETE_IDS:
                ids.append(self._deletes.popleft())
            seq = next(self._seq)
            self._last_seq = seq
            if not self._outbox:
                self._outbox_first = seq
            self._outbox.append(codec.encode_bytes([int(Kind.DELETE), seq, ids]))
            self._outbox_msgs += 1

    # -- consuming replies --------------------------------------------------------------

    def receive(self, reply: bytes | bytearray | memoryview, pointer_factory: Callable[[Any], Any] | None) -> None:
        """Apply one reply frame from the node (they arrive one per frame, in order).

        Pointers in reply values become live pointers through ``pointer_factory`` one value
        at a time: a pointer this coordinator cannot follow fails that request only. A
        reply that cannot be decoded at all fails the requests of the frame it answers.
        """
        self.bytes_received += len(reply)
        with self._lock:
            answered = self._in_flight.popleft() if self._in_flight else None
        try:
            watermark, values, errors = codec.decode(reply)  # pointers stay inert refs
            if not isinstance(watermark, int):
                raise ProtocolError(f"watermark is a {type(watermark).__name__}")
            values = [(seq, value) for seq, value in values]
            errors = [(seq, err) for seq, err, *_ in errors]
        except Exception as exc:
            self._unreadable(answered, exc)
            return
        live: list[tuple[int, bool, Any]] = []
        for seq, value in values:
            try:
                if pointer_factory is not None:
                    value = tree_map(_live_pointers(pointer_factory), value)
                live.append((seq, True, value))
            except Exception as exc:  # e.g. a pointer to a worker this coordinator does not know
                live.append((seq, False, exc))
        settle: list[tuple[Future[Any], bool, Any]] = []
        with self._lock:
            for seq, err in errors:
                error = error_from_wire(err)
                if seq == FRAME_ERROR_SEQ:
                    # The node could not read part of a frame: whatever waits now fails.
                    for waiting in self._requests.values():
                        settle.append((waiting, False, error))
                    self._requests.clear()
                    continue
                self._remember_error(seq, err)
                fut = self._requests.pop(seq, None)
                if fut is not None:
                    settle.append((fut, False, error))
            for seq, ok, value in live:
                fut = self._requests.pop(seq, None)
                if fut is not None:
                    settle.append((fut, ok, value))
            self._advance(watermark, settle)
            for seq in [s for s in self._requests if s <= self._acked]:
                settle.append((self._requests.pop(seq), False, ProtocolError(
                    f"worker {self.worker_id!r} finished request {seq} without answering it")))
        _settle(settle)

    def _remember_error(self, seq: int, err: dict[str, Any]) -> None:
        self._errors[seq] = err
        if len(self._errors) > _MAX_REMEMBERED_ERRORS:
            self._errors.popitem(last=False)

    def _advance(self, watermark: int, settle: list[tuple[Future[Any], bool, Any]]) -> None:
        """Move the acknowledged watermark and release the waiters it passes (lock held)."""
        if watermark > self._acked:
            self._acked = watermark
        while self._waiters and self._waiters[0][0] <= self._acked:
            seq, _, fut = heapq.heappop(self._waiters)
            failed = self.error_of(seq)
            settle.append((fut, failed is None, failed))

    def _unreadable(self, answered: tuple[int, int] | None, exc: Exception) -> None:
        """A reply that cannot be decoded fails the requests of its frame, nothing else."""
        if answered is None:
            raise ProtocolError(f"malformed reply from {self.worker_id!r}: {exc}") from exc
        lo, hi = answered
        error = ProtocolError(
            f"unreadable reply from worker {self.worker_id!r} to requests {lo}..{hi}: {exc}"
        )
        settle: list[tuple[Future[Any], bool, Any]] = []
        with self._lock:
            for seq in [s for s in self._requests if lo <= s <= hi]:
                settle.append((self._requests.pop(seq), False, error))
            keep = []
            for item in self._waiters:
                if lo <= item[0] <= hi:
                    settle.append((item[2], False, error))
                else:
                    keep.append(item)
            if len(keep) != len(self._waiters):
                heapq.heapify(keep)
                self._waiters = keep
            self._advance(hi, settle)
        _settle(settle)

    # -- waiting ------------------------------------------------------------------------

    def ack_future(self, seq: int) -> Future[Any]:
        """A future that completes when the node has run request ``seq``.

        It fails with the request's remote error if the request failed.
        """
        fut: Future[Any] = Future()
        with self._lock:
            lost = self._lost_with(seq)
            if lost is not None:
                fut.set_exception(lost)
            elif seq <= self._acked:
                failed = self.error_of(seq)
                if failed is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(failed)
            elif self._lost is not None:
                fut.set_exception(self._lost_error())
            else:
                heapq.heappush(self._waiters, (seq, next(self._tie), fut))
        return fut

    def error_of(self, seq: int) -> RemoteError | None:
        """The remote error of request ``seq`` if it failed and is still remembered.

        A fresh exception each call, so no traceback of an earlier raise comes with it.
        """
        err = self._errors.get(seq)
        return None if err is None else error_from_wire(err)

    def _lost_with(self, seq: int) -> FedwsError | None:
        """A fresh copy of the loss that took request ``seq``, if a lost link took it (lock held)."""
        i = bisect.bisect_right(self._lost_ranges, seq, key=lambda r: r[0]) - 1
        if i >= 0:
            lo, hi, cls, args = self._lost_ranges[i]
            if lo <= seq <= hi:
                return cls(*args)
        return None

    def _lost_error(self) -> FedwsError:
        assert self._lost is not None
        return type(self._lost)(*self._lost.args)

    @property
    def acked(self) -> int:
        return self._acked

    @property
    def last_seq(self) -> int:
        """The seq of the latest request queued."""
        return self._last_seq

    @property
    def pending(self) -> int:
        """Requests sent or queued that the node has not acknowledged yet."""
        return self._last_seq - self._acked

    def fail_all(self, exc: FedwsError, *, permanent: bool = True) -> None:
        """The link is gone: every pending future fails with ``exc``.

        Every request not acknowledged yet is remembered as lost: its ``ack_future`` fails
        with ``exc`` from now on, never reports success.
        """
        with self._lock:
            if self._last_seq > self._acked:
                self._lost_ranges.append((self._acked + 1, self._last_seq, type(exc), exc.args))
                if len(self._lost_ranges) > _MAX_LOST_RANGES:
                    del self._lost_ranges[0]
            if permanent:
                self._lost = exc
            settle = [(f, False, exc) for f in self._requests.values()]
            settle += [(f, False, exc) for _, _, f in self._waiters]
            self._requests.clear()
            self._waiters.clear()
            self._outbox.clear()
            self._outbox_msgs = 0
            self._in_flight.clear()
            self._acked = self._last_seq  # nothing pending any more: the rest is lost
        _settle(settle)

    def reset(self) -> None:
        """Start afresh after a reconnect (pending work was failed by ``fail_all``)."""
        with self._lock:
            self._lost = None


def _live_pointers(pointer_factory: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def leaf(value: Any) -> Any:
        return pointer_factory(value) if isinstance(value, PointerRef) else value

    return leaf


def _settle(items: list[tuple[Future[Any], bool, Any]]) -> None:
    for fut, ok, value in items:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
