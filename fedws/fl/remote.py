"""Non-blocking requests the coordinator needs, and waiting on many of them at once.

Federated rounds must issue work on every node before waiting on any, and must stop
waiting at a deadline. The blocking user API (``ptr.get()``, ``worker.search()``) waits
one request at a time with no shared deadline, so this module submits the same requests
through :meth:`Worker.submit` and hands back futures. Nothing here is specific to FedAvg.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any, TypeVar

from ..client.worker import Worker
from ..exceptions import FedwsTimeoutError, RemoteError
from ..pointers import PointerTensor, pointer_from_description
from ..protocol.messages import Kind

__all__ = [
    "search_nowait",
    "fetch_nowait",
    "mark",
    "barrier_nowait",
    "first_error",
    "wait_all",
    "stream_all",
    "Deadline",
]


class Deadline:
    """A point in time that several waits share (``remaining()`` never goes below 0)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())


def search_nowait(worker: Worker, tags: list[str]) -> Future[list[PointerTensor]]:
    """``worker.search(*tags)`` without blocking: a future of non-owning pointers."""
    _, raw = worker.submit(Kind.SEARCH, list(tags), want_value=True)
    assert raw is not None
    out: Future[list[PointerTensor]] = Future()

    def convert(f: Future[Any]) -> None:
        try:
            out.set_result([pointer_from_description(worker, d) for d in f.result()])
        except BaseException as exc:  # the remote error, or a malformed description
            out.set_exception(exc)

    raw.add_done_callback(convert)
    return out


def _ask(worker: Worker, kind: Kind, *fields: Any, urgent: bool) -> tuple[int, Future[Any]]:
    """Submit a request for a value; ``urgent=False`` lets the link hold it for the next
    urgent flush (the caller flushes the worker before it waits): one frame per burst."""
    if urgent:
        seq, fut = worker.submit(kind, *fields, want_value=True)
    else:
        seq, fut, _borrowed = worker.session.submit(kind, *fields, want_value=True)  # no tensor: never borrowed
        worker.link.flush(urgent=False)
    assert fut is not None
    return seq, fut


def fetch_nowait(ptr: PointerTensor, *, urgent: bool = True) -> Future[Any]:
    """A copy of the pointed-to value, without removing it from the node.

    The node keeps the object until the pointer is dropped, so a fetch that arrives too
    late (a dropped node) leaves nothing behind either. ``urgent=False``: the caller
    flushes the worker (``worker.flush()``) once its burst of requests is queued.
    """
    return _ask(ptr.location, Kind.GET, ptr.id_at_location, False, urgent=urgent)[1]


def mark(worker: Worker) -> int:
    """Queue a no-op and return its seq: the start of a range for :func:`first_error`."""
    seq, _ = worker.submit(Kind.PING)
    return seq


def barrier_nowait(worker: Worker, *, urgent: bool = True) -> tuple[int, Future[Any]]:
    """A ping whose future resolves once every request sent before it has run
    (``urgent=False``: as for :func:`fetch_nowait`)."""
    return _ask(worker, Kind.PING, urgent=urgent)


def first_error(worker: Worker, start_seq: int, end_seq: int) -> RemoteError | None:
    """The first remote error among requests ``start_seq..end_seq`` (once they have run).

    In-place commands (``param.add_``) have no result to poison, so a failure among them
    is only visible here, not in a later ``get``.
    """
    for seq in range(start_seq, end_seq + 1):
        err = worker.session.error_of(seq)
        if err is not None:
            return err
    return None


_K = TypeVar("_K", bound=Hashable)


def wait_all(
    futures: Mapping[_K, list[Future[Any]]], deadline: Deadline
) -> tuple[dict[_K, list[Any]], dict[_K, BaseException]]:
    """Wait for groups of futures until ``deadline``.

    A group succeeds when all its futures do. Returns ``(results, failures)``: results
    per successful group in submission order; for the others the first exception, or a
    :class:`FedwsTimeoutError` if the deadline passed first.
    """
    every = [f for group in futures.values() for f in group]
    wait_futures(every, timeout=deadline.remaining())  # a failed future counts as done
    results: dict[_K, list[Any]] = {}
    failures: dict[_K, BaseException] = {}
    for key, group in futures.items():
        for f in group:
            if not f.done():
                failures[key] = FedwsTimeoutError(f"no answer within the {deadline.seconds:g} s round timeout")
                break
            exc = f.exception()
            if exc is not None:
                failures[key] = exc
                break
        else:
            results[key] = [f.result() for f in group]
    return results, failures


def stream_all(
    futures: Mapping[_K, list[Future[Any]]],
    deadline: Deadline,
    on_done: Callable[[_K, list[Any]], None],
) -> dict[_K, BaseException]:
    """Like :func:`wait_all`, but hand each group to ``on_done`` as soon as it completes.

    A round then consumes an update while others are still in flight (and may free it at
    once: see :class:`fedws.fl.aggregate.RunningAverage`) instead of holding every answer
    until the last one. ``on_done(key, results)`` runs on the calling thread, one group at
    a time; an exception it raises becomes that group's failure. Work is O(futures): each
    group counts its own completions, no repeated scans.

    Groups still pending at the deadline fail with :class:`FedwsTimeoutError` and their
    futures are cancelled: their answers, when they come, are dropped by the session
    instead of being delivered to anyone (the protocol has no way to stop a node's queued
    commands; the caller frees what they made by dropping its pointers).

    Returns the failures, by key.
    """
    ready: queue.SimpleQueue[_K] = queue.SimpleQueue()
    lock = threading.Lock()
    left = {key: len(group) for key, group in futures.items()}

    def counter(key: _K) -> Callable[[Future[Any]], None]:
        def done(_f: Future[Any]) -> None:
            with lock:
                left[key] -= 1
                last = left[key] == 0
            if last:
                ready.put(key)

        return done

    pending = set(futures)
    for key, group in futures.items():
        if not group:
            ready.put(key)
        for f in group:
            f.add_done_callback(counter(key))
    failures: dict[_K, BaseException] = {}
    while pending:
        try:
            key = ready.get(timeout=deadline.remaining()) if deadline.remaining() > 0 else ready.get_nowait()
        except queue.Empty:
            break
        pending.discard(key)
        group = futures[key]
        exc = _group_error(group)
        if exc is not None:
            failures[key] = exc
            continue
        try:
            on_done(key, [f.result() for f in group])
        except Exception as err:
            failures[key] = err
    for key in pending:
        for f in futures[key]:
            f.cancel()
        failures[key] = FedwsTimeoutError(f"no answer within the {deadline.seconds:g} s round timeout")
    return failures


def _group_error(group: list[Future[Any]]) -> BaseException | None:
    for f in group:
        if f.cancelled():
            return FedwsTimeoutError("the request was cancelled")
        exc = f.exception()
        if exc is not None:
            return exc
    return None
