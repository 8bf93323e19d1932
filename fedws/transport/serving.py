"""One connection's frames answered in order: the loop every node connection runs.

A node that listens (:mod:`.server`), a node that dialed out (:mod:`.dialer`) and a relayed
peer channel (:mod:`.relay`) differ only in how the connection was opened; from then on
the node answers frames the same way, so they share this one loop:

- replies go out in the order the frames came in (a writer task awaits each in turn);
- a frame runs in the connection's own thread, or on a host's shared
  :class:`~.fair_pool.FairPool` (in order, taking turns with its other connections), so a
  long computation never stops pings or other connections;
- a small frame the node calls cheap, with nothing of this connection queued before it, is
  answered on the loop (saving two thread hand-offs); a run of them lets the loop go every
  :data:`INLINE_BUDGET_S`;
- at most :data:`PENDING_FRAMES` frames wait for their replies: past that the loop stops
  reading, and TCP pushes back on the sender;
- when the connection ends, frames already handed on still run to the end (their replies
  dropped), so on return nothing of the connection is running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from websockets.exceptions import ConnectionClosed

from ..exceptions import DecodeError
from .compress import deflate, inflate, is_compressed
from .fair_pool import FairPool
from .frames import receive
from .link import FrameHandler
from .sending import send_message

__all__ = ["serve_frames", "INLINE_MAX_BYTES", "INLINE_BUDGET_S", "PENDING_FRAMES"]

PENDING_FRAMES = 64
"""Per connection: frames handed on whose replies are not sent yet."""
INLINE_MAX_BYTES = 1 << 16
"""Larger frames always go to the thread (reading them is not bounded work)."""
INLINE_BUDGET_S = 0.002
"""Inline work in a row after which the loop lets other connections run."""

Frame = bytes | bytearray | memoryview


async def serve_frames(
    ws: Any,
    handle: FrameHandler,
    inline: FrameHandler | None,
    may_inline: Callable[[Frame], bool] | None,
    name: str,
    *,
    on_relay: Callable[[Frame], Awaitable[Any]] | None = None,
    is_relay: Callable[[Frame], bool] | None = None,
    pool: FairPool | None = None,
    max_inflated: int | None = None,
) -> None:
    """Answer ``ws``'s frames in order until it closes.

    Args:
        ws: the connection (``recv_streaming``, ``send``, ``close``: a websockets
            connection or a relay channel).
        handle: ``frame -> reply`` in the connection's thread (or ``pool``).
        inline: ``frame -> reply`` on the loop, for frames ``may_inline`` accepts.
        name: names the connection's thread.
        on_relay, is_relay: relay messages multiplexed on this connection go to
            ``on_relay`` (awaited: back-pressure) instead of being answered.
        pool: a host's shared compute pool instead of a thread of the connection's own.
        max_inflated: the link compresses (zstd negotiated): frames are inflated, bounded by
            this many bytes, and replies deflated. None: no compression.
    """
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(1, thread_name_prefix=f"fedws-{name}") if pool is None else None
    turn = object()  # this connection's key in the pool
    zstd = max_inflated is not None
    replies: asyncio.Queue[Any] = asyncio.Queue(PENDING_FRAMES)
    writer = asyncio.create_task(_write_replies(ws, replies, zstd))
    in_thread = 0  # frames handed to the thread and not done
    spent = 0.0  # inline work since this connection last let the loop go

    def done(_: Any) -> None:
        nonlocal in_thread
        in_thread -= 1

    try:
        while True:
            message = await receive(ws)
            if isinstance(message, str):
                await ws.close(1003, "fedws speaks binary msgpack frames")
                break
            if on_relay is not None and is_relay is not None and is_relay(message):
                await on_relay(message)
                continue
            if max_inflated is not None and is_compressed(message):
                try:  # bounded: the declared size is checked against the limit first
                    message = inflate(message, max_inflated)
                except DecodeError as exc:
                    await ws.close(1007, f"fedws: {exc}"[:120])
                    break
            if (
                inline is not None
                and may_inline is not None
                and not in_thread
                and isinstance(message, (bytes, bytearray))  # large frames are pool views
                and len(message) <= INLINE_MAX_BYTES
                and may_inline(message)
            ):
                answered = loop.create_future()
                start = time.perf_counter()
                answered.set_result(inline(message))
                spent += time.perf_counter() - start
                await replies.put(answered)
                if spent > INLINE_BUDGET_S:
                    spent = 0.0
                    await asyncio.sleep(0)
                continue
            in_thread += 1
            if pool is None:
                job = loop.run_in_executor(executor, handle, message)
            else:
                job = asyncio.wrap_future(pool.submit(turn, handle, message), loop=loop)
            job.add_done_callback(done)
            # Let go of the frame before waiting for the next one: its buffer goes back to
            # the frame pool once the objects decoded from it are gone.
            message = b""
            await replies.put(job)
    except ConnectionClosed:
        pass
    finally:
        await replies.put(None)
        await asyncio.gather(writer, return_exceptions=True)  # every frame handed on is done
        if executor is not None:
            executor.shutdown(wait=False)


async def _write_replies(ws: Any, replies: asyncio.Queue[Any], zstd: bool) -> None:
    closed = False
    while True:
        pending = await replies.get()
        if pending is None:
            return
        reply = await pending
        if closed:
            continue
        try:
            await send_message(ws, deflate(reply) if zstd else reply)
        except ConnectionClosed:
            closed = True
        pending = reply = None  # a sent reply may hold a frame buffer: let it go
