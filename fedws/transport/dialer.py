"""Dial-out: a node behind a firewall opens the connection, the coordinator accepts it.

Only the direction of the TCP connection changes. Once the WebSocket is open, frames flow
exactly as for a node that listens: the coordinator sends requests, the node answers each
in order, in one handler thread per connection (:func:`serve_frames`). One
:class:`DialOut` serves one logical node, so a process hosting several nodes dials once
per node.

Trust model (who proves what to whom), reusing :mod:`fedws.transport.handshake`:

- The node and the coordinator share a token ``T`` (``--token-file``); the node reads it
  in plain text, the coordinator too (``sy.serve(token=...)``, or one token per node id).
- Node -> coordinator: the upgrade request names the node (``X-Fedws-Node``) and presents
  ``Authorization: Bearer T``. The coordinator refuses a wrong token with HTTP 401 (and,
  as a node does, blocks an address after many wrong tokens: HTTP 429).
- Coordinator -> node: the request carries a fresh challenge (``X-Fedws-Challenge``); the
  coordinator answers with :func:`~fedws.transport.handshake.peer_proof` keyed by ``T``
  over its own name, the node's id and the challenge (``X-Fedws-Proof``) — the node-to-node
  proof, run in reverse. A node that gets no valid proof closes the connection before it
  answers a single frame: whoever else sits at the address runs nothing on it.
- Once proven, the coordinator is the principal ``T`` names in the node's own credentials
  (``[[tokens]]``, or ``"default"`` for the node's ``token``), so the node's policy —
  callers, roles, private flags — applies exactly as to a coordinator that dialed in.
- The coordinator names the session (``X-Fedws-Session``) and keeps the key across the
  node's reconnects, so a node that reconnects within its session grace gets its objects
  back under the same session, as an inbound coordinator does.

As with inbound bearer tokens, ``T`` crosses the wire in the request: over ``ws://`` anyone
on the path can read it. Across machines use ``wss://`` with the coordinator's certificate
pinned (``--cafile``).

Lost connections are redialled with capped, jittered exponential backoff
(:class:`Backoff`); a refused token or a failed proof is not retried (it will not fix
itself) and ends :meth:`DialOut.run` with :class:`AuthenticationError`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl as ssl_module
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from ..exceptions import AuthenticationError, FedwsConnectionError
from .fair_pool import FairPool
from .handshake import (
    CHALLENGE_HEADER,
    NODE_ID_HEADER,
    PROOF_HEADER,
    SESSION_HEADER,
    auth_headers,
    new_challenge,
    proof_matches,
    session_key,
)
from .link import FrameHandler
from .relay import RelayMux, is_relay
from .serving import PENDING_FRAMES, serve_frames
from .websocket import check_websocket_url

__all__ = ["DialOut", "Backoff", "COORDINATOR_HEADER"]

log = logging.getLogger("fedws.dialer")

COORDINATOR_HEADER = "X-Fedws-Coordinator"
"""Response header in which a coordinator accepting dial-out nodes names itself."""


OpenSession = Callable[[str, str, str | None], tuple[FrameHandler, FrameHandler | None]]
CloseSession = Callable[[str, str], None]


class Backoff:
    """Capped exponential backoff with jitter: ``initial * 2**n``, at most ``cap`` seconds,
    each delay drawn from its upper half (so many nodes cut off at once do not redial in step).
    """

    def __init__(self, initial: float = 0.25, cap: float = 30.0) -> None:
        if not 0 < initial <= cap:
            raise ValueError("backoff needs 0 < initial <= cap")
        self.initial, self.cap = initial, cap
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * 2.0 ** min(self.attempt, 32))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class DialOut:
    """One logical node dialing one coordinator, redialling whenever the link drops.

    Args:
        node_id: the node's id (``X-Fedws-Node`` in the request).
        url: the coordinator's ``ws://`` or ``wss://`` URL.
        token: the token shared with the coordinator (presented, and the key of its proof).
        principal: what the node calls the coordinator once it proved ``token``.
        open_session, close_session: as for :class:`~fedws.transport.server.FrameServer`:
            the handlers of one connection, and its end (the node's session bookkeeping).
        answer_inline: which small frames may be answered on the loop (None: none).
        ssl: an ``ssl.SSLContext`` for ``wss://`` (e.g. the coordinator's pinned certificate).
        max_frame_mb: largest frame accepted.
        backoff: the redial schedule (default :class:`Backoff` ()).
        on_connected: ``(coordinator name, url)``, called after every accepted handshake.
        pool: the host's shared compute pool (None: a thread of this connection's own).
        gate: the host's cap on handshakes in flight (None: no cap); a host of hundreds of
            nodes dials a few at a time, so the coordinator's per-address limit on pending
            handshakes never refuses it.
    """

    def __init__(
        self,
        node_id: str,
        url: str,
        token: str,
        *,
        principal: str,
        open_session: OpenSession,
        close_session: CloseSession | None = None,
        answer_inline: Callable[[bytes | bytearray | memoryview], bool] | None = None,
        ssl: ssl_module.SSLContext | None = None,
        max_frame_mb: float = 1024.0,
        connect_timeout: float = 10.0,
        ping_interval: float | None = 10.0,
        backoff: Backoff | None = None,
        on_connected: Callable[[str, str], None] | None = None,
        relay: RelayMux | None = None,
        pool: FairPool | None = None,
        gate: asyncio.Semaphore | None = None,
    ) -> None:
        if not token:
            raise ValueError("a dial-out node needs a token shared with its coordinator")
        self.node_id = node_id
        self.url = check_websocket_url(url)
        self.token = token
        self.principal = principal
        self.open_session = open_session
        self.close_session = close_session
        self.answer_inline = answer_inline
        self._ssl = ssl
        self._max_size = int(max_frame_mb * 2**20)
        self.connect_timeout = connect_timeout
        self._ping_interval = ping_interval
        self.backoff = backoff if backoff is not None else Backoff()
        self.on_connected = on_connected
        self.relay = relay  # node-to-node links through the coordinator (None: none)
        self.pool = pool
        self.gate = gate
        self.start_delay = 0.0  # seconds before the first dial (a host spreads its nodes' dials)
        self.connections = 0  # handshakes accepted so far
        self._stopped = asyncio.Event()
        self._ws: ClientConnection | None = None

    async def connect_once(self) -> tuple[ClientConnection, str, str]:
        """Open one connection and check the coordinator's proof.

        Returns:
            the connection, the coordinator's name and the session key it chose.

        Raises:
            AuthenticationError: the coordinator refused the token, or could not prove it
                knows it.
            FedwsConnectionError: nothing answered, or not a fedws coordinator.
        """
        challenge = new_challenge()
        headers = auth_headers(self.token) or {}
        headers[NODE_ID_HEADER] = self.node_id
        headers[CHALLENGE_HEADER] = challenge
        tls: dict[str, Any] = {"ssl": self._ssl} if self._ssl is not None else {}
        try:
            ws = await asyncio.wait_for(
                ws_connect(self.url, additional_headers=headers, compression=None, max_size=self._max_size,
                           ping_interval=self._ping_interval, ping_timeout=self._ping_interval,
                           open_timeout=None, max_queue=PENDING_FRAMES, write_limit=2**20, **tls),
                self.connect_timeout,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise AuthenticationError(f"the coordinator at {self.url} refused this node's token") from None
            if status == 409:
                raise FedwsConnectionError(
                    f"the coordinator at {self.url} has a node {self.node_id!r} connected already (two hosts "
                    "with the same ids? give each its own --id-prefix)") from None
            raise FedwsConnectionError(f"the coordinator at {self.url} answered HTTP {status}") from None
        except TimeoutError:
            raise FedwsConnectionError(f"no answer from {self.url} within {self.connect_timeout} s") from None
        except (InvalidHandshake, ConnectionClosed, OSError) as exc:
            raise FedwsConnectionError(f"could not connect to {self.url}: {exc}") from None
        response_headers = ws.response.headers if ws.response is not None else None
        name = response_headers.get(COORDINATOR_HEADER) if response_headers is not None else None
        proof = response_headers.get(PROOF_HEADER) if response_headers is not None else None
        key = session_key(response_headers.get(SESSION_HEADER) if response_headers is not None else None)
        if name is None or key is None:
            await ws.close()
            raise FedwsConnectionError(f"{self.url} is not a fedws coordinator accepting nodes")
        if not proof_matches(proof, self.token.encode(), name, self.node_id, challenge):
            await ws.close(1008, "fedws: no or wrong proof of the token")
            raise AuthenticationError(
                f"the coordinator at {self.url} could not prove it knows this node's token; refusing it"
            )
        return ws, name, key

    async def run(self) -> None:
        """Dial, serve, redial with backoff until :meth:`stop`.

        Raises:
            AuthenticationError: the token was refused or the coordinator's proof failed.
        """
        if self.start_delay > 0:
            await self._sleep(self.start_delay)
        while not self._stopped.is_set():
            try:
                if self.gate is None:
                    ws, name, key = await self.connect_once()
                else:
                    async with self.gate:
                        ws, name, key = await self.connect_once()
            except AuthenticationError:
                raise
            except FedwsConnectionError as exc:
                delay = self.backoff.next_delay()
                log.info("node %s: %s; redialling in %.1f s", self.node_id, exc, delay)
                await self._sleep(delay)
                continue
            self.backoff.reset()
            self.connections += 1
            await self._serve(ws, name, key)
            if not self._stopped.is_set():
                await self._sleep(self.backoff.next_delay())

    async def _serve(self, ws: ClientConnection, name: str, key: str) -> None:
        self._ws = ws
        handle, inline = self.open_session(self.principal, key, self.url)
        log.info("node %s: dialed coordinator %s at %s", self.node_id, name, self.url,
                 extra={"event": "dial", "principal": self.principal})
        if self.on_connected is not None:
            self.on_connected(name, self.url)
        if self.relay is not None:
            self.relay.attach(ws, serve_frames)
        try:
            await serve_frames(ws, handle, inline, self.answer_inline, self.node_id, pool=self.pool,
                               on_relay=self.relay.receive if self.relay is not None else None, is_relay=is_relay)
        finally:
            self._ws = None
            if self.relay is not None:
                self.relay.detach()
            if self.close_session is not None:
                try:
                    self.close_session(self.principal, key)
                except Exception:  # never let bookkeeping stop the redialling
                    log.exception("node %s: close_session failed", self.node_id)
            log.info("node %s: connection to %s lost", self.node_id, self.url)

    async def _sleep(self, delay: float) -> None:
        try:
            await asyncio.wait_for(self._stopped.wait(), delay)
        except TimeoutError:
            pass

    async def stop(self) -> None:
        """Stop redialling and close the connection."""
        self._stopped.set()
        ws = self._ws
        if ws is not None:
            await ws.close()
