"""Sending a tensor larger than one frame: in chunks, stored on the node only once whole.

:func:`store_chunked` is what :meth:`Worker.store` does for a tensor above its link's
``stream_above`` (half the smaller of the two sides' frame limits, learnt in the
handshake): ``fedws.stream.begin`` (the node checks its memory budget, then allocates the
destination once), ``fedws.stream.put`` per chunk (each a view of the tensor's memory,
written to the socket before the next is queued: back-pressure, so the sender never holds
more than one chunk beyond the tensor), and ``fedws.stream.commit`` (the tensor appears in
the store under ``obj_id``). See :mod:`fedws.node.streams` for the node's side.
"""

from __future__ import annotations

from typing import Any

import torch

from ..protocol.codec import DTYPE_NAMES
from ..protocol.messages import Kind
from ..transport.frames import CHUNK_BYTES

__all__ = ["store_chunked", "CHUNK_BYTES"]



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
