"""The IO thread: one asyncio loop (uvloop when available) per process, in a daemon thread.

The sync API submits to this loop and blocks on a future; the async API awaits the same
future from its own loop. Because the loop is never the caller's loop, the sync API works
inside Jupyter, whose loop is already running. Blocking on the loop from the loop's own
thread would deadlock, so :func:`wait` refuses it with :class:`WrongThreadError`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from ..exceptions import FedwsTimeoutError, WrongThreadError
from .memory import tune_malloc

__all__ = ["IOThread", "wait", "in_io_thread"]

T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency, but not on Windows
        return asyncio.new_event_loop()


class IOThread:
    """The process's IO loop. Use :meth:`get`; it is started on first use."""

    _instance: IOThread | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        tune_malloc()  # this process is about to move frames (see fedws.transport.memory)
        self.loop = _new_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fedws-io", daemon=True)
        self.thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    @classmethod
    def get(cls) -> IOThread:
        inst = cls._instance
        if inst is None:
            with cls._lock:
                inst = cls._instance
                if inst is None:
                    inst = cls._instance = IOThread()
        return inst

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Schedule ``coro`` on the IO loop; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None, what: str = "call") -> T:
        """Run ``coro`` on the IO loop and block for its result."""
        if in_io_thread():
            coro.close()
            raise WrongThreadError(
                f"blocking {what} called from the fedws IO thread; use the async API there"
            )
        return wait(self.submit(coro), timeout, what)


def in_io_thread() -> bool:
    inst = IOThread._instance
    return inst is not None and threading.current_thread() is inst.thread


def wait(fut: Future[T], timeout: float | None, what: str) -> T:
    """Block on ``fut``; translate a timeout into :class:`FedwsTimeoutError`."""
    if not fut.done() and in_io_thread():
        raise WrongThreadError(
            f"blocking {what} called from the fedws IO thread would deadlock; "
            "use the async form (await ...) there"
        )
    try:
        return fut.result(timeout)
    except FutureTimeout:
        raise FedwsTimeoutError(f"{what} did not finish within {timeout} s") from None


def _after_fork() -> None:
    IOThread._instance = None  # the thread did not survive the fork
    IOThread._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
