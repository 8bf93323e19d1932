"""Node-to-node links between dial-out nodes, carried through the coordinator.

A node that dials out cannot be reached at an address, so when node A must reach node B
(``move``, ``remote_get``, ``remote_send``, pointer chains) A's peer link to B runs over A's
own dial-out connection; the coordinator forwards it onto B's dial-out connection. On
those connections a relay message is told apart from a fedws frame by :data:`MAGIC` (its
second word, ``0xfffffffe``, is a padding no codec blob has)::

    MAGIC (8) | op (u8: OPEN, DATA, CLOSE) | channel (u32, big endian) | body

Nodes number the channels they open with odd ids, the coordinator numbers the ones it opens
to the target with even ids. The coordinator reads only those 13 bytes and the target id
of an OPEN: a DATA body goes on as opaque bytes, never decoded (:class:`RelayRouter`).

Trust model (who proves what to whom):

- A lists B under ``[[peers]]`` with the token B issued to A (``token``/``token_file``),
  and B lists A under ``[[peers]]`` (a relayed caller that B does not list is refused).
  B keeps, as always, only the sha256 digest of that token (``[[tokens]]``).
- The key of the relayed handshake is ``K = sha256(token)``: A holds the token, B its
  digest. A sends its id and a challenge; B answers with a challenge; A proves
  ``HMAC(K, caller|A|B|cA|cB)``; B finds the principal whose digest matches (checking every
  digest in constant time) and answers ``HMAC(K, node|B|A|cA|cB)`` — plus the usual
  :func:`~fedws.transport.handshake.peer_proof` if a peer ``secret`` is configured for the
  link, which A then requires exactly as on a direct link. The token itself never crosses
  the relay. B runs A's frames as that principal, under B's own policy.
- Every frame after the handshake carries ``HMAC(k, direction | sequence | frame)`` with
  ``k = HMAC(K, key|A|B|cA|cB)``: the coordinator cannot inject, alter, replay, reorder or
  drop-and-continue frames on a channel without the channel closing.
- So the coordinator cannot act as A towards B (nor as B towards A) unless it holds the A-B
  token or its digest. The digest is a key here: B's config (which holds it) is as secret
  as the token for relayed links. The digest of the token the node dials its coordinator
  with is never accepted on a relayed channel (that principal is the coordinator's own).
- There is no encryption: the coordinator sees every relayed byte (tensors included) and
  may drop a channel at will. Relay only what the coordinator may read.

Bounds: :data:`MAX_CHANNELS` open channels per node (either end, on the node and on the
coordinator), :data:`CHANNEL_FRAMES` frames queued per channel on the receiving node, every
message within the WebSocket frame limit of each hop, handshake messages within
:data:`HANDSHAKE_BYTES` and :data:`HANDSHAKE_TIMEOUT_S`. Back-pressure is the sockets': the
coordinator awaits the target's socket before it reads more from the source (a slow target
slows the source's whole dial-out connection; after :data:`FORWARD_TIMEOUT_S` the channel
is closed instead).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import struct
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Future
from typing import Any

from websockets.exceptions import ConnectionClosed

from ..exceptions import (
    AuthenticationError,
    ConnectionLostError,
    FedwsConnectionError,
    FedwsError,
    WrongThreadError,
)
from .frames import fragments, stream_sizes
from .handshake import new_challenge, new_session_key, peer_proof, proof_matches, session_key
from .link import Endpoint, FrameHandler

__all__ = [
    "MAGIC", "OPEN", "DATA", "CLOSE", "MAX_CHANNELS", "CHANNEL_FRAMES", "HANDSHAKE_BYTES",
    "is_relay", "pack", "unpack", "RelayRouter", "RelayMux", "RelayLink", "RelayTap", "ChannelClosed",
]

log = logging.getLogger("fedws.relay")

MAGIC = b"FWR1\xfe\xff\xff\xff"
OPEN, DATA, CLOSE = 1, 2, 3
_HEAD = struct.Struct(">BI")
HEAD_BYTES = len(MAGIC) + _HEAD.size
MAX_CHANNELS = 16
"""Open relay channels per node, counting both ends."""
CHANNEL_FRAMES = 16
"""Frames queued per channel on the node that receives them (then the socket waits)."""
HANDSHAKE_BYTES = 4096
HANDSHAKE_TIMEOUT_S = 10.0
FORWARD_TIMEOUT_S = 30.0
MAX_ID_BYTES = 128
MAX_REASON_BYTES = 300
_TAG = 32


def is_relay(message: bytes | bytearray | memoryview) -> bool:
    """Whether a message on a dial-out connection is a relay message (not a fedws frame)."""
    return len(message) >= HEAD_BYTES and bytes(message[: len(MAGIC)]) == MAGIC


def head(op: int, channel: int) -> bytes:
    return MAGIC + _HEAD.pack(op, channel)


def pack(op: int, channel: int, body: bytes = b"") -> bytes:
    return head(op, channel) + body


def unpack(message: bytes | bytearray | memoryview) -> tuple[int, int, memoryview]:
    op, channel = _HEAD.unpack_from(message, len(MAGIC))
    return op, channel, memoryview(message)[HEAD_BYTES:]


def _text(body: memoryview | bytes, limit: int) -> str:
    return bytes(body[:limit]).decode("utf-8", "replace")


class ChannelClosed(Exception):
    """The other end (or the coordinator) closed a relay channel; ``str()`` says why."""


# -- the coordinator: forward opaque bytes between two nodes' connections ----------------

SendTo = Callable[[str, Any], Awaitable[bool]]
"""``(node id, message or fragments) -> whether the node was connected and it was sent``."""


class RelayRouter:
    """Forwards relay channels between dial-out nodes (on the coordinator's IO loop).

    Args:
        send_to: writes a message on a node's connection (False: not connected).
        max_channels: open channels per node, counting both ends.
    """

    def __init__(self, send_to: SendTo, *, max_channels: int = MAX_CHANNELS) -> None:
        self.send_to = send_to
        self.max_channels = max_channels
        self._routes: dict[tuple[str, int], tuple[str, int]] = {}
        self._open: dict[str, int] = {}
        self._next: dict[str, int] = {}
        self.forwarded_bytes = 0

    def channels(self, node_id: str) -> int:
        return self._open.get(node_id, 0)

    async def handle(self, node_id: str, message: bytes | bytearray | memoryview) -> None:
        """One relay message from ``node_id``'s connection."""
        op, channel, body = unpack(message)
        if op == OPEN:
            await self._open_channel(node_id, channel, _text(body, MAX_ID_BYTES))
        elif op == DATA:
            route = self._routes.get((node_id, channel))
            if route is None:
                return  # closed meanwhile: the CLOSE is on its way
            self.forwarded_bytes += len(body)
            data = fragments([head(DATA, route[1]), body]) if len(body) > 1 << 16 else pack(DATA, route[1], bytes(body))
            try:
                sent = await asyncio.wait_for(self.send_to(route[0], data), FORWARD_TIMEOUT_S)
            except TimeoutError:
                sent = False
            if not sent:
                await self._close(node_id, channel, f"relay: node {route[0]!r} did not take the data", both=True)
        elif op == CLOSE:
            await self._close(node_id, channel, _text(body, MAX_REASON_BYTES), both=False)

    async def _open_channel(self, source: str, channel: int, target: str) -> None:
        async def refuse(reason: str) -> None:
            await self.send_to(source, pack(CLOSE, channel, reason.encode()))

        if channel % 2 == 0 or (source, channel) in self._routes:
            await refuse("relay: a node opens channels with new odd ids")
            return
        if target == source:
            await refuse("relay: a node does not relay to itself")
            return
        for node in (source, target):
            if self.channels(node) >= self.max_channels:
                await refuse(f"relay: node {node!r} has {self.max_channels} relay channels open (the limit)")
                return
        theirs = self._next.get(target, 0) + 2
        self._next[target] = theirs
        self._routes[(source, channel)] = (target, theirs)
        self._routes[(target, theirs)] = (source, channel)
        for node in (source, target):
            self._open[node] = self._open.get(node, 0) + 1
        if not await self.send_to(target, pack(OPEN, theirs, source.encode())):
            self._drop(source, channel)
            await refuse(f"relay: node {target!r} is not connected to this coordinator")

    def _drop(self, node_id: str, channel: int) -> tuple[str, int] | None:
        route = self._routes.pop((node_id, channel), None)
        if route is None:
            return None
        self._routes.pop(route, None)
        for node in (node_id, route[0]):
            self._open[node] = self._open.get(node, 1) - 1
        return route

    async def _close(self, node_id: str, channel: int, reason: str, *, both: bool) -> None:
        route = self._drop(node_id, channel)
        if route is not None:
            await self.send_to(route[0], pack(CLOSE, route[1], reason.encode()[:MAX_REASON_BYTES]))
        if both:
            await self.send_to(node_id, pack(CLOSE, channel, reason.encode()[:MAX_REASON_BYTES]))

    async def node_gone(self, node_id: str) -> None:
        """``node_id``'s connection ended: its channels close, the other ends hear why."""
        for (node, channel) in [k for k in self._routes if k[0] == node_id]:
            await self._close(node, channel, f"relay: node {node_id!r} disconnected from the coordinator", both=False)


# -- the nodes: channels over the dial-out connection -----------------------------------


def _mac_key(key: bytes, caller: str, node: str, c_a: str, c_b: str) -> bytes:
    return hmac.new(key, f"fedws-relay-key|{caller}|{node}|{c_a}|{c_b}".encode(), hashlib.sha256).digest()


def _proof(key: bytes, role: str, caller: str, node: str, c_a: str, c_b: str) -> str:
    message = f"fedws-relay-{role}|{caller}|{node}|{c_a}|{c_b}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class Channel:
    """One relay channel as seen by a node: a queue of bodies in, messages out."""

    def __init__(self, mux: RelayMux, channel: int, peer: str) -> None:
        self.mux, self.id, self.peer = mux, channel, peer
        self.inbox: asyncio.Queue[bytes | memoryview | None] = asyncio.Queue(CHANNEL_FRAMES)
        self.reason: str | None = None
        self._key: bytes | None = None
        self._out = self._in = 0
        self._out_dir = self._in_dir = b""

    def secure(self, key: bytes, outbound: bool) -> None:
        """From now on every frame is authenticated with ``key`` (direction + sequence)."""
        self._key = key
        self._out_dir, self._in_dir = (b"a", b"b") if outbound else (b"b", b"a")

    def _tag(self, direction: bytes, seq: int, chunks: Iterable[bytes | bytearray | memoryview]) -> bytes:
        assert self._key is not None
        mac = hmac.new(self._key, direction + seq.to_bytes(8, "big"), hashlib.sha256)
        for c in chunks:
            mac.update(c)
        return mac.digest()

    async def send(self, chunks: list[bytes | memoryview]) -> None:
        if self.reason is not None:
            raise ChannelClosed(self.reason)
        if self._key is not None:
            self._out += 1
            chunks = [self._tag(self._out_dir, self._out, chunks), *chunks]
        await self.mux.send(fragments([head(DATA, self.id), *chunks]))

    async def send_json(self, value: dict[str, Any]) -> None:
        await self.send([json.dumps(value).encode()])

    async def recv(self, timeout: float | None = None) -> bytes | memoryview:
        """The next body (checked and stripped of its tag once the channel is secured)."""
        body = await asyncio.wait_for(self.inbox.get(), timeout)
        if body is None:
            self.inbox.put_nowait(None)  # every later recv sees the end too
            raise ChannelClosed(self.reason or "closed")
        if self._key is None:
            return body
        self._in += 1
        tag, frame = body[:_TAG], memoryview(body)[_TAG:]
        if not hmac.compare_digest(tag, self._tag(self._in_dir, self._in, [frame])):
            await self.close("relay: a frame failed its authentication tag (altered, replayed or out of order)")
            raise ChannelClosed(self.reason or "")
        return bytes(frame) if len(frame) < 1 << 16 else frame

    async def recv_json(self) -> dict[str, Any]:
        body = await self.recv(HANDSHAKE_TIMEOUT_S)
        if len(body) > HANDSHAKE_BYTES or not isinstance(body, bytes):
            raise ChannelClosed("relay: handshake message too large")
        try:
            value = json.loads(body)
        except ValueError:
            raise ChannelClosed("relay: unreadable handshake message") from None
        if not isinstance(value, dict):
            raise ChannelClosed("relay: unreadable handshake message")
        return value

    def closed(self, reason: str) -> None:
        """The other end closed (or the connection dropped): wake every reader."""
        if self.reason is None:
            self.reason = reason
            while True:
                try:
                    self.inbox.put_nowait(None)
                    return
                except asyncio.QueueFull:
                    self.inbox.get_nowait()  # drop unread frames: nothing will read them

    async def close(self, reason: str) -> None:
        if self.reason is None:
            self.closed(reason)
            self.mux.forget(self.id)
            try:
                await self.mux.send(pack(CLOSE, self.id, reason.encode()[:MAX_REASON_BYTES]))
            except (ChannelClosed, ConnectionClosed):
                pass


OpenSession = Callable[[str, str, str | None], tuple[FrameHandler, FrameHandler | None]]
ServeFrames = Callable[[Any, FrameHandler, FrameHandler | None, Any, str], Awaitable[None]]


class RelayMux:
    """A node's relay channels over its dial-out connection (lives on the node's loop).

    Args:
        node_id: this node's id.
        open_session, close_session: as for a direct connection (the node's sessions).
        listed_secret: peer id -> the link's secret (None: none); raises
            :class:`PermissionError` for a peer the operator did not list.
        digests: ``(principal, sha256 of a token)`` this node accepts from relayed peers.
        answer_inline: which small frames may be answered on the loop.
    """

    def __init__(
        self,
        node_id: str,
        *,
        open_session: OpenSession,
        close_session: Callable[[str, str], None] | None,
        listed_secret: Callable[[str], bytes | None],
        digests: list[tuple[str, bytes]],
        answer_inline: Callable[[bytes | bytearray], bool] | None = None,
        max_channels: int = MAX_CHANNELS,
    ) -> None:
        self.node_id = node_id
        self.open_session, self.close_session = open_session, close_session
        self.listed_secret = listed_secret
        self.digests = digests
        self.answer_inline = answer_inline
        self.max_channels = max_channels
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ws: Any = None
        self._channels: dict[int, Channel] = {}
        self._next = -1
        self._tasks: set[asyncio.Task[None]] = set()
        self._serve_frames: ServeFrames | None = None

    # -- the dial-out connection --------------------------------------------------------

    def attach(self, ws: Any, serve_frames: ServeFrames) -> None:
        """Channels run over ``ws`` from now on; ``serve_frames`` answers a called channel's
        frames as the connection's own are answered (:func:`fedws.transport.serving.serve_frames`)."""
        self.loop = asyncio.get_running_loop()
        self._ws = ws
        self._serve_frames = serve_frames

    def detach(self) -> None:
        self._ws = None
        for chan in list(self._channels.values()):
            chan.closed("relay: this node's connection to its coordinator dropped")
        self._channels.clear()

    async def send(self, data: Any) -> None:
        ws = self._ws
        if ws is None:
            raise ChannelClosed("relay: this node is not connected to its coordinator")
        await ws.send(data)

    def forget(self, channel: int) -> None:
        self._channels.pop(channel, None)

    async def receive(self, message: bytes | bytearray | memoryview) -> None:
        """One relay message from the coordinator."""
        op, channel, body = unpack(message)
        chan = self._channels.get(channel)
        if op == DATA and chan is not None:
            await chan.inbox.put(bytes(body) if len(body) < 1 << 16 else body)  # waits: back-pressure
        elif op == CLOSE and chan is not None:
            self.forget(channel)
            chan.closed(_text(body, MAX_REASON_BYTES))
        elif op == OPEN and channel % 2 == 0 and chan is None:
            if len(self._channels) >= self.max_channels:
                await self.send(pack(CLOSE, channel, f"relay: node {self.node_id!r} has too many channels open".encode()))
                return
            chan = self._channels[channel] = Channel(self, channel, _text(body, MAX_ID_BYTES))
            task = asyncio.create_task(self._serve(chan))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- the calling side (A) -----------------------------------------------------------

    async def open(self, to: str) -> Channel:
        if self._ws is None:
            raise FedwsConnectionError("relay: this node is not connected to its coordinator")
        if len(self._channels) >= self.max_channels:
            raise FedwsConnectionError(f"relay: node {self.node_id!r} has {self.max_channels} relay channels open")
        self._next += 2
        chan = self._channels[self._next] = Channel(self, self._next, to)
        await self.send(pack(OPEN, chan.id, to.encode()))
        return chan

    # -- the called side (B) ------------------------------------------------------------

    async def _serve(self, chan: Channel) -> None:
        opened: tuple[str, str] | None = None
        try:
            opened = await self._accept(chan)
            if opened is None:
                return
            handle, inline = self.open_session(opened[0], opened[1], f"relay:{chan.peer}")
            assert self._serve_frames is not None
            await self._serve_frames(_ChannelSocket(chan), handle, inline, self.answer_inline, f"{self.node_id}-relay")
        except ChannelClosed:
            pass
        finally:
            await chan.close("relay: channel closed by the node")
            if opened is not None and self.close_session is not None:
                try:
                    self.close_session(*opened)
                except Exception:  # never let bookkeeping break the relay
                    log.exception("node %s: close_session failed", self.node_id)

    async def _accept(self, chan: Channel) -> tuple[str, str] | None:
        """The called side of the handshake: (principal, session), or None (refused, said why)."""
        hello = await chan.recv_json()
        peer, c_a, session = hello.get("from"), hello.get("challenge"), session_key(hello.get("session"))
        if not isinstance(peer, str) or not isinstance(c_a, str) or session is None or len(c_a) > 128 or len(peer) > MAX_ID_BYTES:
            await chan.close("relay: malformed hello")
            return None
        try:
            secret = self.listed_secret(peer)
        except PermissionError:
            log.warning("node %s: refused a relayed link from unlisted peer %r", self.node_id, peer[:40])
            await chan.close(f"relay: refused: node {self.node_id!r} does not list {peer!r} under [[peers]]")
            return None
        c_b = new_challenge()
        await chan.send_json({"challenge": c_b})
        proof = (await chan.recv_json()).get("proof")
        found: tuple[str, bytes] | None = None
        for principal, digest in self.digests:  # every digest, whatever matched: no timing tell
            ok = hmac.compare_digest(str(proof).encode(), _proof(digest, "caller", peer, self.node_id, c_a, c_b).encode())
            if ok and found is None:
                found = (principal, digest)
        if found is None:
            log.warning("node %s: relayed peer %r could not prove a token this node issued", self.node_id, peer[:40])
            await chan.close(f"relay: refused: {peer!r} could not prove a token node {self.node_id!r} issued")
            return None
        principal, digest = found
        answer = {"proof": _proof(digest, "node", peer, self.node_id, c_a, c_b)}
        if secret is not None:
            answer["peer_proof"] = peer_proof(secret, self.node_id, peer, c_a)
        await chan.send_json(answer)
        chan.secure(_mac_key(digest, peer, self.node_id, c_a, c_b), outbound=False)
        log.info("node %s: relayed link from %s as %s", self.node_id, peer, principal,
                 extra={"event": "relay", "principal": principal})
        return principal, session


async def _handshake(chan: Channel, me: str, token: str, secret: bytes | None, session: str) -> None:
    """The calling side: prove the token (never sent), check the callee's proofs."""
    key = hashlib.sha256(token.encode()).digest()
    c_a = new_challenge()
    await chan.send_json({"from": me, "challenge": c_a, "session": session})
    c_b = (await chan.recv_json()).get("challenge")
    if not isinstance(c_b, str) or len(c_b) > 128:
        raise ChannelClosed("relay: malformed challenge")
    await chan.send_json({"proof": _proof(key, "caller", me, chan.peer, c_a, c_b)})
    answer = await chan.recv_json()
    if not hmac.compare_digest(str(answer.get("proof")).encode(), _proof(key, "node", me, chan.peer, c_a, c_b).encode()):
        await chan.close("relay: the callee's proof failed")
        raise AuthenticationError(f"relay: the node reached as {chan.peer!r} could not prove it holds this link's token")
    if secret is not None and not proof_matches(answer.get("peer_proof"), secret, chan.peer, me, c_a):
        await chan.close("relay: the callee's peer proof failed")
        raise AuthenticationError(f"relay: the node reached as {chan.peer!r} could not prove the peer secret")
    chan.secure(_mac_key(key, me, chan.peer, c_a, c_b), outbound=True)


class _ChannelSocket:
    """The three methods :func:`~fedws.transport.serving.serve_frames` uses, over a channel."""

    def __init__(self, chan: Channel) -> None:
        self.chan = chan

    async def recv_streaming(self) -> Any:
        try:
            yield await self.chan.recv()
        except ChannelClosed:
            raise ConnectionClosed(None, None) from None

    async def send(self, data: bytes | list[bytes | memoryview]) -> None:
        try:
            await self.chan.send([data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data))
        except ChannelClosed:
            raise ConnectionClosed(None, None) from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.chan.close(f"relay: {reason or 'closed'}")


class RelayLink:
    """A node's link to a peer through the coordinator (a :class:`~fedws.transport.link.Link`).

    Built in any thread; its work runs on the loop of the node's dial-out connection.

    Args:
        endpoint: the peer worker's session.
        mux: the node's relay channels.
        me, to: this node's id, the peer's id.
        token: the token the peer issued to this node (proved, never sent).
        secret: the link's peer secret, if the operator configured one (then required).
        max_frame_mb: the largest frame (larger tensors go in chunks).
    """

    def __init__(self, endpoint: Endpoint, mux: RelayMux, me: str, to: str, *, token: str,
                 secret: bytes | None = None, max_frame_mb: float = 1024.0) -> None:
        self.endpoint, self.mux, self.me, self.to = endpoint, mux, me, to
        self.token, self.secret = token, secret
        self.session_key = new_session_key()
        self.stream_above, self.chunk_bytes = stream_sizes(int(max_frame_mb * 2**20), None)
        self._chan: Channel | None = None
        self._lock: asyncio.Lock | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"dialout://{self.to}"

    @property
    def connected(self) -> bool:
        return self._chan is not None and self._chan.reason is None

    def _loop(self) -> asyncio.AbstractEventLoop:
        if self.mux.loop is None:
            raise FedwsConnectionError("relay: this node is not connected to its coordinator")
        return self.mux.loop

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.mux.loop
        except RuntimeError:
            return False

    def _run(self, coro: Any) -> Future[Any]:
        loop = self._loop()
        if self._on_loop():
            coro.close()
            raise WrongThreadError("a relay link cannot be waited on from its own loop")
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def connect(self, timeout: float | None) -> None:
        """Open the channel and run the handshake (blocks the calling thread).

        Raises:
            FedwsConnectionError: the coordinator could not reach the peer, or the peer refused.
            AuthenticationError: the peer could not prove it holds the link's token (or secret).
        """
        self._run(self._connect()).result(timeout)

    async def _connect(self) -> None:
        chan = await self.mux.open(self.to)
        try:
            await _handshake(chan, self.me, self.token, self.secret, self.session_key)
        except ChannelClosed as exc:
            await chan.close(str(exc))
            raise FedwsConnectionError(f"relay to node {self.to!r}: {exc}") from None
        except TimeoutError:
            await chan.close("relay: handshake timed out")
            raise FedwsConnectionError(f"relay to node {self.to!r}: no answer within {HANDSHAKE_TIMEOUT_S} s") from None
        self._chan = chan
        self._lock = asyncio.Lock()
        self._reader = asyncio.create_task(self._read(chan))

    async def _read(self, chan: Channel) -> None:
        try:
            while True:
                self.endpoint.receive(await chan.recv())
        except ChannelClosed as exc:
            self.endpoint.link_lost(ConnectionLostError(f"relayed link to worker {self.to!r} lost ({exc})"))
        except Exception as exc:
            await chan.close("relay: unreadable reply")
            self.endpoint.link_lost(ConnectionLostError(f"relayed link to worker {self.to!r}: unreadable reply: {exc}"))

    async def _drain(self) -> None:
        chan, lock = self._chan, self._lock
        if chan is None or lock is None:
            return
        async with lock:  # frames leave in the order they were taken
            while (frame := self.endpoint.take_frame()) is not None:
                try:
                    await chan.send(frame)
                except (ChannelClosed, ConnectionClosed) as exc:
                    chan.closed(f"relay: {exc}")
                    return

    def flush(self, *, urgent: bool = True) -> None:
        if self.connected:
            self._run(self._drain())

    def flush_soon(self) -> None:
        try:
            self.flush()
        except (FedwsError, RuntimeError):
            pass

    def flush_and_wait(self, timeout: float | None) -> None:
        if self.connected:
            self._run(self._drain()).result(timeout)

    async def _close(self) -> None:
        if self._chan is not None:
            await self._chan.close("relay: the caller closed the link")
        self.endpoint.link_lost(ConnectionLostError(f"relayed link to worker {self.to!r} was closed"))

    def close(self) -> None:
        if self._chan is None or self.mux.loop is None or self.mux.loop.is_closed():
            return
        if self._on_loop():
            self.mux.loop.create_task(self._close())
            return
        try:
            self._run(self._close()).result(5.0)
        except Exception:  # closing is best effort
            pass

    async def aclose(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RelayLink {self.me}->{self.to} {'connected' if self.connected else 'disconnected'}>"


class RelayTap:
    """A node's connection as the coordinator's link sees it: relay messages taken out.

    The link reads and writes through it; each relay message goes to ``on_relay`` (awaited,
    so a slow target holds up this connection's reads: back-pressure), everything else is
    the node's replies, as they came.
    """

    def __init__(self, ws: Any, on_relay: Callable[[bytes | bytearray | memoryview], Awaitable[None]]) -> None:
        self._ws = ws
        self._on_relay = on_relay

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)

    async def recv_streaming(self) -> Any:
        while True:
            stream = self._ws.recv_streaming()
            first = await anext(stream, None)
            if first is None:
                return
            if isinstance(first, str) or not is_relay(first):
                yield first  # a reply: its fragments go on as they come (no copy here)
                async for fragment in stream:
                    yield fragment
                return
            parts = [first]
            async for fragment in stream:
                parts.append(fragment)
            await self._on_relay(parts[0] if len(parts) == 1 else b"".join(parts))
