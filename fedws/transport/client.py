"""WebsocketClientWorker: a handle to a node in another process, over a WebSocket.

Requests are queued by the session in the caller's thread; one writer task on the IO loop
drains the queue into frames, so every command issued while the previous frame was being
written goes out together in the next one (batching without a timer). One reader task
applies replies. If the link drops, every pending future fails with ConnectionLostError at
once; ``reconnect()`` opens a new link to the same node, whose objects are still there.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

from ..client.io_thread import IOThread, in_io_thread, wait
from ..client.worker import Worker, as_federation
from ..exceptions import (
    AuthenticationError,
    ConnectionLostError,
    FedwsConnectionError,
    FedwsTimeoutError,
    WrongThreadError,
)
from ..protocol.messages import Kind
from .frames import fragments, receive
from .server import NODE_ID_HEADER

if TYPE_CHECKING:
    from ..hook import TorchHook

__all__ = ["WebsocketClientWorker", "connect", "connect_async"]

# How long commands nobody waits on may wait for company before their frame leaves.
_BATCH_WINDOW_S = 0.001


class WebsocketClientWorker(Worker):
    """A worker node reached over ``ws://`` or ``wss://``.

    Args:
        hook: the federation's TorchHook (None: the latest one).
        host, port: where the node listens (or give ``url``).
        id: the node's id; checked against what the node says it is.
        token: the node's shared token (``--token``/``FEDWS_TOKEN`` on the node).
        timeout: default seconds a blocking call waits (``get(timeout=...)`` overrides).
        connect_timeout: seconds to wait for the connection.
        ssl: an ``ssl.SSLContext`` for ``wss://`` (e.g. trusting a self-signed cert).
        max_frame_mb: largest reply accepted.
        connect: False to build the handle without connecting (``connect_async`` does so).

    Example:
        >>> alice = sy.WebsocketClientWorker(hook, host="127.0.0.1", port=8777, id="alice")
        >>> x = torch.ones(3).send(alice)
    """

    address: str  # the ws:// or wss:// URL, always set by __init__

    def __init__(
        self,
        hook: TorchHook | None = None,
        host: str = "127.0.0.1",
        port: int = 8777,
        id: str | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        secure: bool = False,
        timeout: float | None = 60.0,
        connect_timeout: float = 10.0,
        ssl: ssl_module.SSLContext | None = None,
        max_frame_mb: float = 1024.0,
        ping_interval: float | None = 10.0,
        connect: bool = True,
    ) -> None:
        if url is None:
            url = f"{'wss' if secure or ssl else 'ws'}://{host}:{port}"
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a WebSocket URL: {url!r} (expected ws://host:port)")
        self._expected_id = id
        super().__init__(None, id or url, timeout=timeout)
        self.federation = as_federation(hook)
        self.address = url
        self.token = token
        self.connect_timeout = connect_timeout
        self._ssl = ssl
        self._max_size = int(max_frame_mb * 2**20)
        self._ping_interval = ping_interval
        self._io = IOThread.get()
        self._ws: ClientConnection | None = None
        self._wake = asyncio.Event()
        self._wake_pending = False
        self._urgent_pending = False
        self._batch_timer: asyncio.TimerHandle | None = None
        self._flush_waiters: list[Future[None]] = []
        self._flush_lock = threading.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self._closing = False
        if connect:
            self._io.run(self._connect(), None, f"connect to {url}")

    # -- connection ----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._closing

    async def _connect(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        tls: dict[str, Any] = {"ssl": self._ssl} if self._ssl is not None else {}  # wss:// defaults to system CAs
        try:
            ws = await asyncio.wait_for(
                ws_connect(
                    self.address,
                    additional_headers=headers,
                    compression=None,
                    max_size=self._max_size,
                    **tls,
                    ping_interval=self._ping_interval,
                    ping_timeout=self._ping_interval,
                    open_timeout=None,
                    max_queue=64,
                    write_limit=2**20,
                ),
                self.connect_timeout,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 401:
                raise AuthenticationError(
                    f"node at {self.address} refused the connection: invalid or missing token"
                ) from None
            raise FedwsConnectionError(f"node at {self.address} answered HTTP {status}") from exc
        except TimeoutError:
            raise FedwsConnectionError(
                f"could not connect to {self.address} within {self.connect_timeout} s"
            ) from None
        except InvalidURI as exc:
            raise ValueError(f"not a WebSocket URL: {self.address!r}") from exc
        except OSError as exc:
            raise FedwsConnectionError(
                f"could not connect to {self.address}: {exc.strerror or exc}"
            ) from exc
        node_id = ws.response.headers.get(NODE_ID_HEADER) if ws.response else None
        if node_id is None:
            await ws.close()
            raise FedwsConnectionError(f"{self.address} is not a fedws node")
        if self._expected_id is not None and node_id != self._expected_id:
            await ws.close()
            raise FedwsConnectionError(
                f"the node at {self.address} is {node_id!r}, not {self._expected_id!r}"
            )
        if self.id != node_id:
            self.id = node_id
            self.session.worker_id = node_id
        self._ws = ws
        self._closing = False
        self._wake = asyncio.Event()
        if self.federation is not None:
            self.federation.register(self)
        self._tasks = [
            asyncio.create_task(self._writer(ws)),
            asyncio.create_task(self._reader(ws)),
        ]

    async def _writer(self, ws: ClientConnection) -> None:
        wake = self._wake
        while True:
            await wake.wait()
            wake.clear()
            self._wake_pending = self._urgent_pending = False
            if self._batch_timer is not None:
                self._batch_timer.cancel()
                self._batch_timer = None
            with self._flush_lock:
                waiters, self._flush_waiters = self._flush_waiters, []
            try:
                while (frame := self.session.take_frame()) is not None:
                    await ws.send(fragments(frame))
            except ConnectionClosed:
                for w in waiters:
                    if not w.done():
                        w.set_result(None)  # the reader reports the loss to futures
                return
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def _reader(self, ws: ClientConnection) -> None:
        reason = "closed"
        try:
            while True:
                message = await receive(ws)
                if isinstance(message, str):
                    continue
                self.session.receive(message, self.pointer_factory)
        except ConnectionClosed:
            pass
        except Exception as exc:  # a reply we cannot read: the link is unusable
            reason = f"unreadable reply: {exc}"
        finally:
            code = getattr(ws, "close_code", None)
            if code is not None:
                why = getattr(ws, "close_reason", "")
                reason = f"code {code}" + (f": {why}" if why else "")
            if self._ws is ws:
                self._ws = None
            if not self._closing:
                self.session.fail_all(
                    ConnectionLostError(f"connection to worker {self.id!r} at {self.address} lost ({reason})")
                )
            for w in self._flush_waiters:
                if not w.done():
                    w.set_result(None)
            for t in self._tasks:
                if t is not asyncio.current_task():
                    t.cancel()

    def reconnect(self) -> WebsocketClientWorker:
        """Open a new link to the same node; its stored objects are reachable again."""
        self.close()
        self.session.reset()
        self._io.run(self._connect(), None, f"reconnect to {self.address}")
        return self

    async def reconnect_async(self) -> WebsocketClientWorker:
        await self.aclose()
        self.session.reset()
        await asyncio.wrap_future(self._io.submit(self._connect()))
        return self

    async def _close(self) -> None:
        self._closing = True
        ws = self._ws
        if ws is not None:
            await ws.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._ws = None
        self.session.fail_all(ConnectionLostError(f"connection to worker {self.id!r} was closed"))

    def close(self) -> None:
        """Close the connection. Objects on the node stay there."""
        if self._ws is None and not self._tasks:
            return
        if in_io_thread():
            self._io.loop.create_task(self._close())
            return
        self._io.run(self._close(), 10.0, "close")

    async def aclose(self) -> None:
        if self._ws is None and not self._tasks:
            return
        await asyncio.wrap_future(self._io.submit(self._close()))

    def __enter__(self) -> WebsocketClientWorker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> WebsocketClientWorker:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # -- moving frames -------------------------------------------------------------------

    def _kick(self, borrowed: bool = False, *, urgent: bool = True) -> None:
        if self._ws is None and not self._closing:
            return  # nothing to write to; submit already raised if the link was lost
        waiter: Future[None] | None = None
        if borrowed:
            waiter = Future()
            with self._flush_lock:
                self._flush_waiters.append(waiter)
        if urgent:
            if not self._urgent_pending:
                self._urgent_pending = self._wake_pending = True
                self._io.loop.call_soon_threadsafe(self._wake.set)
        elif not self._wake_pending:
            # Nobody waits on these yet: let the writer collect a batch for a moment. Waking
            # it at once would hand it the GIL (the wake is a syscall) and send frames of a
            # few commands each; an urgent request wakes it at once anyway.
            self._wake_pending = True
            self._io.loop.call_soon_threadsafe(self._arm_batch_timer)
        if waiter is not None:
            if in_io_thread():
                raise WrongThreadError("sending a large tensor from the IO thread would deadlock")
            try:
                wait(waiter, self.timeout, f"writing a frame to {self.id!r}")
            except FedwsTimeoutError:
                raise

    def _arm_batch_timer(self) -> None:
        if self._batch_timer is None and not self._wake.is_set():
            self._batch_timer = self._io.loop.call_later(_BATCH_WINDOW_S, self._wake.set)

    def _kick_soon(self) -> None:
        if self._ws is not None and not self._wake_pending:
            self._wake_pending = True
            try:
                self._io.loop.call_soon_threadsafe(self._arm_batch_timer)
            except RuntimeError:  # loop closed at interpreter exit
                pass

    # -- node-to-node --------------------------------------------------------------------

    def add_worker(self, worker: Worker) -> WebsocketClientWorker:
        """Tell this node where node ``worker`` is; it connects there itself."""
        if worker.address is None:
            raise ValueError(f"worker {worker.id!r} has no network address to give a node")
        self.peers[worker.id] = worker
        self.submit(Kind.ADD_PEER, worker.id, worker.address)
        self.ping()  # surface a failure to connect now, not at the first move
        return self

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<WebsocketClientWorker id:{self.id} {self.address} {state}>"


def connect(url: str, token: str | None = None, *, hook: TorchHook | None = None, **kwargs: Any) -> WebsocketClientWorker:
    """Connect to a node (blocking) and return its handle. Usable as a context manager.

    Example:
        >>> with sy.connect("ws://127.0.0.1:8777") as alice:
        ...     print(torch.ones(2).send(alice).get())
    """
    return WebsocketClientWorker(_federation_of(hook), url=url, token=token, **kwargs)


async def connect_async(
    url: str, token: str | None = None, *, hook: TorchHook | None = None, **kwargs: Any
) -> WebsocketClientWorker:
    """``await sy.connect_async(url)``: connect without blocking the caller's loop."""
    worker = WebsocketClientWorker(_federation_of(hook), url=url, token=token, connect=False, **kwargs)
    await asyncio.wrap_future(worker._io.submit(worker._connect()))
    return worker


def _federation_of(hook: Any) -> Any:
    if hook is not None:
        return hook
    from ..hook import default_federation  # connecting is enough to start

    return default_federation()
