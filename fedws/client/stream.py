"""Sending a tensor larger than one frame: in chunks, stored on the node only once whole.

:func:`store_chunked` is what :meth:`Worker.store` does for a tensor above its link's
``stream_above`` (half the smaller of the two sides' frame limits, learnt in the
handshake): ``fedws.stream.begin`` (the node checks its memory budget, then allocates the
destination once), ``fedws.stream.put`` per chunk (each a view of the tensor's memory,
written to the socket before the next is queued: back-pressure, so the sender never holds
more than one chunk beyond the tensor), and ``fedws.stream.commit`` (the tensor appears in
the store under ``obj_id``). See :mod:`fedws.node.streams` for the node's side.

:func:`get_chunked` is the other direction, what ``ptr.get()`` does for a tensor above
``stream_above`` (also a node following a pointer to a peer: ``remote_get``):
``fedws.stream.open_read`` (the node applies the checks and release rules of a GET, once,
to the whole tensor), then ranges read with at most ``window`` in flight, each copied into
a tensor allocated once, then ``fedws.stream.close``. If the transfer fails midway the
partial tensor is dropped and the error says how far it got: nothing half-received is
returned.
"""

from __future__ import annotations

import math
import traceback
from collections import deque
from concurrent.futures import Future
from typing import Any

import torch

from ..exceptions import DecodeError, FedwsConnectionError, FedwsTimeoutError
from ..protocol.codec import DECODABLE_DTYPES, DTYPE_NAMES, MAX_NDIM
from ..protocol.ids import new_id
from ..protocol.messages import Kind
from ..transport.frames import CHUNK_BYTES
from ..transport.io_thread import wait

__all__ = ["store_chunked", "get_chunked", "should_stream", "CHUNK_BYTES", "WINDOW"]

WINDOW = 4
"""Ranges a chunked get keeps in flight (bounds the coordinator's memory beside the tensor)."""
_MAX_READ = 16 << 20  # fedws.node.streams.MAX_READ (the node's layer is not imported here)


def should_stream(worker: Any, shape: Any, dtype: torch.dtype) -> bool:
    """Whether a tensor of ``shape`` and ``dtype`` is too large for one frame of ``worker``'s link."""
    above = getattr(worker.link, "stream_above", None)
    if above is None or shape is None:
        return False
    return bool(math.prod(int(s) for s in shape) * dtype.itemsize > above)


def store_chunked(worker: Any, tensor: torch.Tensor, *, obj_id: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Store ``tensor`` on ``worker`` (a :class:`~fedws.client.worker.Worker`) under ``obj_id``
    in chunks; returns the commit's seq.

    If the transfer fails midway (budget, connection, a refused chunk) nothing is stored:
    using ``obj_id`` raises the reason.
    """
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.resolve_conj().resolve_neg().contiguous()
    flat = data.reshape(-1).view(torch.uint8)
    worker.submit(Kind.CMD, "fedws.stream.begin", [obj_id, DTYPE_NAMES[data.dtype], list(data.shape)], {}, [])
    n = flat.numel()
    for offset in range(0, n, chunk_bytes):
        # A view of the tensor's memory, in a frame of its own, written before the next is
        # queued (a small chunk would otherwise be copied and batched with the next ones).
        worker.submit(Kind.CMD, "fedws.stream.put", [obj_id, offset, flat[offset : offset + chunk_bytes]], {}, [])
        worker.link.flush_and_wait(worker.timeout)
    seq: int
    seq, _ = worker.submit(Kind.CMD, "fedws.stream.commit", [obj_id, bool(tensor.requires_grad)], {}, [obj_id])
    return seq


def get_chunked(
    worker: Any, obj_id: int, *, remove: bool = True, release: str | None = None,
    timeout: float | None = None, window: int = WINDOW,
) -> torch.Tensor:
    """Get ``obj_id`` from ``worker`` by ranges into one preallocated tensor.

    Raises:
        PermissionDeniedError, ObjectNotFoundError, ...: the node refused the GET itself.
        ConnectionLostError, FedwsTimeoutError: the transfer stopped midway; the partial
            tensor was dropped (the message says how many bytes had arrived).
    """
    sid, meta_id = new_id(), new_id()
    args: list[Any] = [sid, obj_id, bool(remove)] + ([release] if release is not None else [])
    worker.submit(Kind.CMD, "fedws.stream.open_read", args, {}, [meta_id])
    timeout = worker.call_timeout(timeout)
    got = total = 0
    pending: deque[tuple[int, int, Future[Any], int]] = deque()
    try:
        dest, rg = _allocate(worker.request(Kind.GET, meta_id, True, timeout=timeout), worker.id)
        flat = dest.reshape(-1).view(torch.uint8) if dest.numel() else torch.empty(0, dtype=torch.uint8)
        total = flat.numel()
        # The node may answer several ranges in one reply frame: ``window`` of them fit in
        # half of the smaller frame limit (``stream_above``).
        above = getattr(worker.link, "stream_above", None) or (4 << 20)
        step = max(1, min(getattr(worker.link, "chunk_bytes", 1 << 20), _MAX_READ, above // max(window, 1)))
        for offset in range(0, total, step):
            n = min(step, total - offset)
            rid = new_id()
            worker.submit(Kind.CMD, "fedws.stream.read", [sid, offset, n], {}, [rid])
            _, fut = worker.submit(Kind.GET, rid, True, want_value=True)
            assert fut is not None
            pending.append((offset, n, fut, rid))
            if len(pending) >= window:
                got += _take(flat, pending[0], timeout, worker.id)
                pending.popleft()
        while pending:
            got += _take(flat, pending[0], timeout, worker.id)
            pending.popleft()
    except (FedwsConnectionError, FedwsTimeoutError) as exc:
        dest = flat = None  # type: ignore[assignment]  # nothing half-received is kept
        traceback.clear_frames(exc.__traceback__)  # not even through the traceback's frames
        _close(worker, sid, meta_id, *(rid for _, _, _, rid in pending))
        raise type(exc)(
            f"get of object {obj_id} from worker {worker.id!r} stopped after {got} of {total} bytes "
            f"(nothing was kept): {exc}"
        ) from exc
    except BaseException:
        _close(worker, sid, meta_id, *(rid for _, _, _, rid in pending))
        raise
    _close(worker, sid)
    if rg and (dest.is_floating_point() or dest.is_complex()):
        dest.requires_grad_(True)
    return dest


def _allocate(meta: Any, worker_id: str) -> tuple[torch.Tensor, bool]:
    """The destination for a read stream's ``[dtype, shape, requires_grad]`` (checked first)."""
    if not isinstance(meta, list) or len(meta) != 3:
        raise DecodeError(f"worker {worker_id!r} answered fedws.stream.open_read with {meta!r:.60}")
    dtype, shape, rg = meta
    if type(dtype) is not str or dtype not in DECODABLE_DTYPES or not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise DecodeError(f"worker {worker_id!r} described a stream as {meta!r:.60}")
    if not all(type(s) is int and s >= 0 for s in shape):
        raise DecodeError(f"worker {worker_id!r} described a stream of shape {shape!r:.60}")
    return torch.empty(shape, dtype=DECODABLE_DTYPES[dtype]), rg is True


def _take(flat: torch.Tensor, item: tuple[int, int, Future[Any], int], timeout: float | None, worker_id: str) -> int:
    offset, n, fut, _ = item
    chunk = wait(fut, timeout, f"range {offset}+{n} of a chunked get from worker {worker_id!r}")
    if not isinstance(chunk, torch.Tensor) or chunk.dtype != torch.uint8 or chunk.shape != (n,):
        raise DecodeError(f"worker {worker_id!r} answered range {offset}+{n} with something else")
    # numpy's memcpy on this thread: torch's copy_ of a large uint8 range fans out to the
    # intra-op thread pool, which measured 20x slower on a loaded 2-core machine.
    flat[offset : offset + n].numpy()[:] = chunk.numpy()
    return n


def _close(worker: Any, sid: int, *failed: int) -> None:
    """Close the stream; delete the ids whose failures the node kept (a refused open, reads)."""
    try:
        worker.submit(Kind.CMD, "fedws.stream.close", [sid], {}, [])
        if failed:
            worker.submit(Kind.DELETE, list(failed))
    except Exception:  # the link is gone: the node frees the stream with the session
        pass
