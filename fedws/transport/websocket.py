"""The WebSocket link: frames to a node in another process, over ``ws://`` or ``wss://``.

Requests are queued by the endpoint (the session) in the caller's thread; one writer task
on the IO loop drains the queue into frames, so every command issued while the previous
frame was being written goes out together in the next one. Commands nobody waits on yet
wait up to a millisecond for company. One reader task hands replies to the endpoint. If
the link drops, the endpoint is told at once (every pending future fails with
ConnectionLostError); :meth:`WebsocketLink.connect` opens a new link to the same node,
whose objects are still there.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
import threading
from concurrent.futures import Future
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidMessage,
    InvalidStatus,
    InvalidURI,
)

from ..exceptions import (
    AuthenticationError,
    ConnectionLostError,
    FedwsConnectionError,
    WrongThreadError,
)
from .compress import deflate, inflate, is_compressed, wanted
from .frames import receive, stream_sizes
from .handshake import (
    CHALLENGE_HEADER,
    COMPRESS_HEADER,
    MAX_FRAME_HEADER,
    NODE_ID_HEADER,
    PEER_HEADER,
    PROOF_HEADER,
    auth_headers,
    new_challenge,
    new_session_key,
    proof_matches,
)
from .io_thread import IOThread, in_io_thread, wait
from .link import Endpoint
from .sending import send_message

__all__ = ["WebsocketLink", "check_websocket_url", "BATCH_WINDOW_S"]

BATCH_WINDOW_S = 0.001
"""How long commands nobody waits on may wait for company before their frame leaves."""


def check_websocket_url(url: str) -> str:
    """``url`` if it is a ``ws://`` or ``wss://`` URL with a host.

    Raises:
        ValueError: anything else.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a WebSocket URL: {url!r} (expected ws://host:port)")
    return url


class WebsocketLink:
    """A link to a node over a WebSocket, driven by the process's IO thread.

    Args:
        endpoint: the session side (takes frames, receives replies, hears of loss).
        url: the node's ``ws://`` or ``wss://`` URL.
        name: what error messages call the node until it names itself.
        expected_id: refuse a node that says it is someone else (None: accept any).
        token: bearer token presented in the handshake.
        connect_timeout: seconds to wait for the connection.
        ssl: an ``ssl.SSLContext`` for ``wss://``.
        max_frame_mb: largest reply accepted.
        ping_interval: keepalive pings (None: none).
        peer_name: for a node-to-node link, the id of the node opening it.
        peer_secret: with ``peer_name`` and ``expected_id``: the secret the node must prove
            it shares (refused otherwise; see :func:`~fedws.transport.handshake.peer_proof`).
        compress: offer zstd compression of large frames (None: ``FEDWS_COMPRESS=zstd``);
            used only if the node agrees (see :mod:`fedws.transport.compress`).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        url: str,
        *,
        name: str | None = None,
        expected_id: str | None = None,
        token: str | None = None,
        connect_timeout: float = 10.0,
        ssl: ssl_module.SSLContext | None = None,
        max_frame_mb: float = 1024.0,
        ping_interval: float | None = 10.0,
        peer_name: str | None = None,
        peer_secret: bytes | None = None,
        compress: bool | None = None,
    ) -> None:
        if peer_secret is not None and (peer_name is None or expected_id is None):
            raise ValueError("a peer secret needs peer_name and expected_id")
        self.endpoint = endpoint
        self._address = check_websocket_url(url)
        self.name = name or expected_id or url
        self.expected_id = expected_id
        self.node_id: str | None = None
        self.token = token
        self.session_key = new_session_key()  # the node keeps our objects under it across reconnects
        self.connect_timeout = connect_timeout
        self._ssl = ssl
        self._max_size = int(max_frame_mb * 2**20)
        self.stream_above, self.chunk_bytes = stream_sizes(self._max_size, None)
        self._offer_zstd = wanted() if compress is None else compress
        self.compressed = False
        """Whether frames of this link are compressed (both sides agreed in the handshake)."""
        self._ping_interval = ping_interval
        self._peer_name = peer_name
        self._peer_secret = peer_secret
        self.io = IOThread.get()
        self._ws: ClientConnection | None = None
        self._wake = asyncio.Event()
        self._wake_pending = False
        self._urgent_pending = False
        self._batch_timer: asyncio.TimerHandle | None = None
        self._flush_waiters: list[Future[None]] = []
        self._flush_lock = threading.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self._closing = False

    @property
    def address(self) -> str:
        return self._address

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._closing

    # -- connecting ----------------------------------------------------------------------

    async def connect(self) -> str:
        """Open the connection (on the IO loop); returns the id the node gave itself.

        Raises:
            AuthenticationError: the node refused the token.
            FedwsConnectionError: nothing answered, not a fedws node, the wrong node, TLS
                or handshake failure.
        """
        tls: dict[str, Any] = {"ssl": self._ssl} if self._ssl is not None else {}  # wss:// defaults to system CAs
        headers = auth_headers(self.token, self.session_key) or {}
        challenge = None
        if self._offer_zstd:
            headers[COMPRESS_HEADER] = "zstd"
        if self._peer_name is not None:
            headers[PEER_HEADER] = self._peer_name
            if self._peer_secret is not None:
                challenge = headers[CHALLENGE_HEADER] = new_challenge()
        try:
            ws = await asyncio.wait_for(
                ws_connect(
                    self._address,
                    additional_headers=headers or None,
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
                    f"node at {self._address} refused the connection: invalid or missing token"
                ) from None
            if status == 429:
                retry = exc.response.headers.get("Retry-After", "?")
                raise AuthenticationError(
                    f"node at {self._address} refuses this address for {retry} s: too many wrong tokens"
                ) from None
            if status in (400, 404):  # a node host: no such node path (the reason is in the body)
                why = bytes(exc.response.body or b"")[:200].decode("utf-8", "replace").strip()
                raise FedwsConnectionError(
                    f"{self._address} refused the connection: {''.join(c for c in why if c.isprintable())}"
                ) from None
            raise FedwsConnectionError(f"node at {self._address} answered HTTP {status}") from exc
        except TimeoutError:
            raise FedwsConnectionError(
                f"could not connect to {self._address} within {self.connect_timeout} s"
            ) from None
        except InvalidURI as exc:
            raise ValueError(f"not a WebSocket URL: {self._address!r}") from exc
        except (InvalidMessage, InvalidHandshake, ConnectionClosed) as exc:
            raise FedwsConnectionError(
                f"could not connect to {self._address}: the WebSocket handshake failed ({exc})"
            ) from exc
        except OSError as exc:
            raise FedwsConnectionError(
                f"could not connect to {self._address}: {exc.strerror or exc}"
            ) from exc
        node_id = ws.response.headers.get(NODE_ID_HEADER) if ws.response else None
        if node_id is None:
            await ws.close()
            raise FedwsConnectionError(f"{self._address} is not a fedws node")
        if self.expected_id is not None and node_id != self.expected_id:
            await ws.close()
            raise FedwsConnectionError(
                f"the node at {self._address} is {node_id!r}, not {self.expected_id!r}"
            )
        if challenge is not None:
            assert self._peer_secret is not None and self._peer_name is not None
            proof = ws.response.headers.get(PROOF_HEADER) if ws.response else None
            if not proof_matches(proof, self._peer_secret, node_id, self._peer_name, challenge):
                await ws.close()
                raise FedwsConnectionError(
                    f"the node at {self._address} could not prove it is {node_id!r} (no or wrong peer proof)"
                )
        self.stream_above, self.chunk_bytes = stream_sizes(
            self._max_size, ws.response.headers.get(MAX_FRAME_HEADER) if ws.response else None
        )
        self.compressed = self._offer_zstd and ws.response is not None and (
            ws.response.headers.get(COMPRESS_HEADER) == "zstd"
        )
        self.node_id = self.name = node_id
        self._ws = ws
        self._closing = False
        self._wake = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._writer(ws)),
            asyncio.create_task(self._reader(ws)),
        ]
        return node_id

    # -- the two tasks -------------------------------------------------------------------

    async def _writer(self, ws: ClientConnection) -> None:
        wake = self._wake
        endpoint = self.endpoint
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
                while (frame := endpoint.take_frame()) is not None:
                    await send_message(ws, deflate(frame) if self.compressed else frame)
            except ConnectionClosed:
                _release(waiters)  # the reader reports the loss to futures
                return
            _release(waiters)

    async def _reader(self, ws: ClientConnection) -> None:
        reason = "closed"
        try:
            while True:
                message = await receive(ws)
                if isinstance(message, str):
                    continue
                if self.compressed and is_compressed(message):
                    message = inflate(message, self._max_size)  # bounded before it allocates
                self.endpoint.receive(message)
                message = b""  # not held while waiting: the buffer may go back to the frame pool
        except ConnectionClosed:
            pass
        except Exception as exc:  # the endpoint could not take a reply at all: the link is unusable
            reason = f"unreadable reply: {exc}"
        finally:
            code = getattr(ws, "close_code", None)
            if code is not None:
                why = getattr(ws, "close_reason", "")
                reason = f"code {code}" + (f": {why}" if why else "")
            if self._ws is ws:
                self._ws = None
            if not self._closing:
                self.endpoint.link_lost(
                    ConnectionLostError(f"connection to worker {self.name!r} at {self._address} lost ({reason})")
                )
            _release(self._flush_waiters)
            for t in self._tasks:
                if t is not asyncio.current_task():
                    t.cancel()

    # -- closing -------------------------------------------------------------------------

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
        self.endpoint.link_lost(ConnectionLostError(f"connection to worker {self.name!r} was closed"))

    @property
    def open(self) -> bool:
        """Whether there is a connection or tasks to close."""
        return self._ws is not None or bool(self._tasks)

    def close(self) -> None:
        """Close the connection (blocks unless called on the IO thread)."""
        if not self.open:
            return
        if in_io_thread():
            self.io.loop.create_task(self._close())
            return
        self.io.run(self._close(), 10.0, "close")

    async def aclose(self) -> None:
        if not self.open:
            return
        await asyncio.wrap_future(self.io.submit(self._close()))

    # -- moving frames -------------------------------------------------------------------

    def flush(self, *, urgent: bool = True) -> None:
        if self._ws is None and not self._closing:
            return  # nothing to write to; the endpoint refuses new requests once lost
        if urgent:
            if not self._urgent_pending:
                self._urgent_pending = self._wake_pending = True
                self.io.loop.call_soon_threadsafe(self._wake.set)
        elif not self._wake_pending:
            # Nobody waits on these yet: let the writer collect a batch for a moment. Waking
            # it at once would hand it the GIL (the wake is a syscall) and send frames of a
            # few commands each; an urgent request wakes it at once anyway.
            self._wake_pending = True
            self.io.loop.call_soon_threadsafe(self._arm_batch_timer)

    def flush_soon(self) -> None:
        if self._ws is not None and not self._wake_pending:
            self._wake_pending = True
            try:
                self.io.loop.call_soon_threadsafe(self._arm_batch_timer)
            except RuntimeError:  # loop closed at interpreter exit
                pass

    def flush_and_wait(self, timeout: float | None) -> None:
        if self._ws is None and not self._closing:
            return
        waiter: Future[None] = Future()
        with self._flush_lock:
            self._flush_waiters.append(waiter)
        self.flush()
        if in_io_thread():
            raise WrongThreadError("sending a large tensor from the IO thread would deadlock")
        wait(waiter, timeout, f"writing a frame to {self.name!r}")

    def _arm_batch_timer(self) -> None:
        if self._batch_timer is None and not self._wake.is_set():
            self._batch_timer = self.io.loop.call_later(BATCH_WINDOW_S, self._wake.set)

    def __repr__(self) -> str:
        return f"<WebsocketLink {self._address} {'connected' if self.connected else 'disconnected'}>"


def _release(waiters: list[Future[None]]) -> None:
    for w in waiters:
        if not w.done():
            w.set_result(None)
