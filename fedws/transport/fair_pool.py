"""One bounded compute pool for many connections, fair between them, ordered within each.

A connection answers its frames in a thread, so a long computation never stops the event
loop. With one thread per connection, a host of 1,000 dial-out nodes would run 1,000
threads (each with its own stack, all contending for 2 cores). :class:`FairPool` runs every
connection's frames on ``threads`` threads instead:

- a connection's frames run one at a time, in the order they arrived (the protocol needs
  it: a reply follows its request, a command sees the results of the ones before);
- connections take turns, one frame each (round robin over the connections that have work
  waiting), so a node with a queue of heavy frames delays its neighbours by at most one
  frame each, never by its whole queue.

The pool is bounded, so ``threads`` frames that each wait on something (a peer's answer)
hold every thread until they finish or time out; a host with such workloads sets
``threads`` higher. Pings and other bounded requests are answered on the event loop and
never wait for the pool.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

__all__ = ["FairPool", "default_threads"]


def default_threads() -> int:
    """Threads of a host's pool by default: a few per core (frames are short and some wait)."""
    return min(32, 4 + 2 * (os.cpu_count() or 1))


_Job = tuple[Callable[[Any], Any], Any, "Future[Any]"]


class FairPool:
    """``threads`` threads running the jobs of many keys: serial per key, round robin across.

    Threads start as work arrives (at most ``threads``) and live until :meth:`shutdown`.
    """

    def __init__(self, threads: int | None = None, name: str = "fedws-pool") -> None:
        self.max_threads = default_threads() if threads is None else threads
        if self.max_threads < 1:
            raise ValueError("a pool needs at least one thread")
        self.name = name
        self._lock = threading.Condition()
        self._queues: dict[Hashable, deque[_Job]] = {}
        self._ready: deque[Hashable] = deque()  # keys with work waiting and none running
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False

    def submit(self, key: Hashable, fn: Callable[[Any], Any], arg: Any) -> Future[Any]:
        """Run ``fn(arg)`` after every job of ``key`` submitted before it.

        Raises:
            RuntimeError: the pool was shut down.
        """
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the compute pool is shut down")
            queue = self._queues.get(key)
            if queue is None:  # neither waiting nor running: it becomes ready
                queue = self._queues[key] = deque()
                self._ready.append(key)
            queue.append((fn, arg, future))
            if self._idle:
                self._lock.notify()
            elif len(self._threads) < self.max_threads:
                thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._ready:
                    if self._closed:
                        return
                    self._idle += 1
                    self._lock.wait()
                    self._idle -= 1
                key = self._ready.popleft()
                fn, arg, future = self._queues[key].popleft()
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(arg)
                except BaseException as exc:  # handed to whoever awaits the future
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            with self._lock:
                if self._queues[key]:
                    self._ready.append(key)  # to the back: the others go first
                else:
                    del self._queues[key]

    def pending(self) -> int:
        """Jobs waiting or running."""
        with self._lock:
            return sum(len(q) for q in self._queues.values())

    @property
    def threads(self) -> int:
        """Threads started so far (at most ``max_threads``)."""
        return len(self._threads)

    def shutdown(self) -> None:
        """Finish what is queued, then let the threads end (does not wait for them)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
