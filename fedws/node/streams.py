"""Tensors larger than one frame: received in chunks, stored only once whole.

A coordinator streams a tensor as three kinds of named node commands, all ordinary
commands (so they queue, batch and fail like any other):

- ``fedws.stream.begin(stream_id, dtype, shape)``: the node checks the tensor's size
  against its memory budget (bytes held + bytes of streams still open) *before* it
  allocates the destination, then allocates it once (``torch.empty``).
- ``fedws.stream.put(stream_id, offset, chunk)``: ``chunk`` is a 1-D uint8 tensor (decoded
  as a view of the frame it came in); its bytes are copied straight into the destination.
  Chunks must arrive in order and within the declared size.
- ``fedws.stream.commit(stream_id)``: the whole tensor, stored under the command's result
  id. Until then nothing is in the store.

Chunk headers are hostile input: every field is type-checked, offsets must be the next
expected byte, a chunk must end within the declared size, a dtype must be one the codec
decodes, and a caller holds at most :data:`MAX_OPEN` streams. A chunk that fails any
check drops the whole stream (its memory is freed and ``commit`` fails), so a transfer
that fails midway -- bad chunk, budget exceeded, connection dropped (the runtime calls
:meth:`Streams.drop_caller`) -- leaves nothing half-stored; ``commit`` then fails with the reason.

The other direction, a tensor larger than one frame leaving the node, is a *read stream*:

- ``fedws.stream.open_read(stream_id, obj_id, remove, release)``: runs the node's own GET
  handler on ``obj_id`` -- the same owner check, the same private-data release rules
  (refused, or a differentially private copy charged once), the same audit record and the
  same delete-after-get -- and keeps the value it would have replied with. Returns
  ``[dtype, shape, requires_grad]``. Permission is decided here, once, for the whole
  tensor: a range cannot be asked of anything that was not released.
- ``fedws.stream.read(stream_id, offset, length)``: a copy of bytes ``offset ..
  offset+length`` of the released value (the coordinator stores it under a result id and
  GETs it: ordinary commands, pipelined). Bounded: at most :data:`MAX_READ` bytes, within
  the tensor.
- ``fedws.stream.close(stream_id)``: forget it (also on disconnect, with the session).

Back-pressure is the transport's: the coordinator waits for each chunk's frame to be
written, and a node stops reading a connection when it has a bounded number of frames
in hand, so at most a few chunks are in memory on either side besides the destination.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..exceptions import DecodeError, LimitExceededError
from ..protocol.codec import DECODABLE_DTYPES, DTYPE_NAMES, MAX_NDIM

__all__ = ["Streams", "MAX_OPEN", "MAX_READ", "stream_ops"]

MAX_OPEN = 4
"""Streams (either direction) one caller may have open at once."""
MAX_READ = 16 << 20
"""Largest range one ``fedws.stream.read`` returns."""
_MAX_FAILED = 256


@dataclass(slots=True)
class _Open:
    dest: torch.Tensor
    flat: torch.Tensor  # the destination's bytes, 1-D uint8
    received: int


@dataclass(slots=True)
class _Read:
    flat: torch.Tensor  # the released value's bytes, 1-D uint8


class Streams:
    """The streams open on one node, per caller (``None`` for an in-process coordinator)."""

    def __init__(self, node: Any) -> None:  # a fedws.node.Node (not imported: no cycle)
        self.node = node
        self._open: dict[tuple[Any, int], _Open] = {}
        # Why a stream failed, for its commit to say (bounded: oldest forgotten first).
        self._failed: dict[tuple[Any, Any], BaseException] = {}
        self._reads: dict[tuple[Any, int], _Read] = {}
        self._lock = threading.Lock()

    @property
    def pending_bytes(self) -> int:
        """Bytes allocated for streams not committed yet (counted against the budget)."""
        with self._lock:
            return sum(s.flat.numel() for s in self._open.values())

    def open_count(self) -> int:
        with self._lock:
            return len(self._open) + len(self._reads)

    def _count(self, caller: Any) -> int:
        return sum(1 for c, _ in self._open if c is caller) + sum(1 for c, _ in self._reads if c is caller)

    def _caller(self) -> Any:
        return getattr(self.node._frame, "caller", None)

    def begin(self, stream_id: Any, dtype: Any, shape: Any) -> None:
        try:
            self._begin(stream_id, dtype, shape)
        except BaseException as exc:
            self._fail((self._caller(), stream_id), exc)
            raise

    def _begin(self, stream_id: Any, dtype: Any, shape: Any) -> None:
        if type(stream_id) is not int:
            raise DecodeError("fedws.stream.begin takes (stream id, dtype name, shape)")
        if type(dtype) is not str or dtype not in DECODABLE_DTYPES:
            raise DecodeError(f"fedws.stream.begin: unknown dtype {dtype!r:.40}")
        if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
            raise DecodeError("fedws.stream.begin: a shape is a list of at most 64 sizes")
        numel = 1
        for s in shape:
            if type(s) is not int or s < 0:
                raise DecodeError(f"fedws.stream.begin: bad size {s!r:.40}")
            numel *= s
        tdtype = DECODABLE_DTYPES[dtype]
        nbytes = numel * tdtype.itemsize
        caller = self._caller()
        key = (caller, stream_id)
        node = self.node
        with self._lock:
            if key in self._open:
                self._open.pop(key)
                raise DecodeError(f"stream {stream_id} was already open on worker {node.id!r}; dropped")
            if self._count(caller) >= MAX_OPEN:
                raise LimitExceededError(f"more than {MAX_OPEN} streams open on worker {node.id!r}", worker=node.id)
            held = node.store.nbytes + sum(s.flat.numel() for s in self._open.values())
            # Before anything is allocated (raises MemoryBudgetError).
            node.budget.check(nbytes, held, "fedws.stream.begin", op="fedws.stream.begin")
            if node.store.max_bytes is not None and nbytes > node.store.max_bytes:
                raise LimitExceededError(f"a {nbytes}-byte tensor exceeds the store cap of worker {node.id!r}", worker=node.id)
            dest = torch.empty([int(s) for s in shape], dtype=tdtype)
            flat = dest.reshape(-1).view(torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
            self._open[key] = _Open(dest, flat, 0)

    def put(self, stream_id: Any, offset: Any, chunk: Any) -> None:
        key = (self._caller(), stream_id)
        with self._lock:
            s = self._open.get(key)
        if s is None:
            raise DecodeError(f"no stream {stream_id!r:.40} open on worker {self.node.id!r}")
        try:
            if type(offset) is not int or offset != s.received:
                raise DecodeError(f"chunk at byte {offset!r:.40}, expected byte {s.received} (out of order)")
            if not isinstance(chunk, torch.Tensor) or chunk.dtype != torch.uint8 or chunk.dim() != 1:
                raise DecodeError("a chunk is a 1-D uint8 tensor")
            n = chunk.numel()
            total = s.flat.numel()
            if n == 0 or offset + n > total:
                raise DecodeError(f"chunk of {n} bytes at byte {offset} does not fit a {total}-byte tensor")
            s.flat[offset : offset + n].copy_(chunk)  # the one copy: frame -> destination
            s.received = offset + n
        except BaseException as exc:
            self._drop(key)
            self._fail(key, exc)
            raise

    def commit(self, stream_id: Any, requires_grad: Any = False) -> torch.Tensor:
        key = (self._caller(), stream_id)
        s = self._drop(key)
        with self._lock:
            failed = self._failed.pop(key, None)
        if failed is not None:
            raise failed
        if s is None:
            raise DecodeError(f"no stream {stream_id!r:.40} open on worker {self.node.id!r} (failed or never begun)")
        if s.received != s.flat.numel():
            raise DecodeError(f"stream {stream_id} ended at byte {s.received} of {s.flat.numel()}: nothing stored")
        if requires_grad is True and (s.dest.is_floating_point() or s.dest.is_complex()):
            s.dest.requires_grad_(True)
        return s.dest

    def abort(self, stream_id: Any) -> None:
        key = (self._caller(), stream_id)
        self._drop(key)
        with self._lock:
            self._failed.pop(key, None)

    def open_read(self, stream_id: Any, obj_id: Any, remove: Any = True, release: Any = None) -> list[Any]:
        """Release ``obj_id`` to the caller exactly as a GET would, to be read by ranges."""
        if type(stream_id) is not int:
            raise DecodeError("fedws.stream.open_read takes (stream id, object id, remove, release)")
        caller = self._caller()
        key = (caller, stream_id)
        node = self.node
        with self._lock:  # cheap refusals first: nothing is released for a stream never opened
            if key in self._reads or key in self._open:
                raise DecodeError(f"stream {stream_id} is already open on worker {node.id!r}")
            if self._count(caller) >= MAX_OPEN:
                raise LimitExceededError(f"more than {MAX_OPEN} streams open on worker {node.id!r}", worker=node.id)
        # The node's own GET handler: owner, private flags, DP release, audit, delete-after-get.
        value = node.release_for_stream(obj_id, remove, release)
        if not isinstance(value, torch.Tensor) or value.dtype not in DTYPE_NAMES or value.is_quantized:
            raise DecodeError(f"object {obj_id} on worker {node.id!r} is not a plain tensor: get() it instead")
        data = value.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        data = data.resolve_conj().resolve_neg().contiguous()
        flat = data.reshape(-1).view(torch.uint8) if data.numel() else torch.empty(0, dtype=torch.uint8)
        with self._lock:
            if self._count(caller) >= MAX_OPEN:
                raise LimitExceededError(f"more than {MAX_OPEN} streams open on worker {node.id!r}", worker=node.id)
            self._reads[key] = _Read(flat)
        return [DTYPE_NAMES[data.dtype], list(data.shape), bool(value.requires_grad)]

    def read(self, stream_id: Any, offset: Any, length: Any) -> torch.Tensor:
        """Bytes ``offset .. offset+length`` of a read stream (a view: no copy)."""
        with self._lock:
            r = self._reads.get((self._caller(), stream_id))
        if r is None:
            raise DecodeError(f"no read stream {stream_id!r:.40} open on worker {self.node.id!r}")
        if type(offset) is not int or type(length) is not int:
            raise DecodeError("fedws.stream.read takes (stream id, offset, length)")
        total = r.flat.numel()
        if not 0 < length <= MAX_READ or offset < 0 or offset + length > total:
            raise DecodeError(f"range {offset}+{length} is not within the {total}-byte tensor (at most {MAX_READ} a read)")
        # A copy: a view stored under the caller's id would let it write into the object
        # it was read from (which may be another session's shared object).
        return r.flat[offset : offset + length].clone()

    def close(self, stream_id: Any) -> None:
        with self._lock:
            self._reads.pop((self._caller(), stream_id), None)

    def _fail(self, key: tuple[Any, Any], exc: BaseException) -> None:
        with self._lock:
            if len(self._failed) >= _MAX_FAILED:
                self._failed.pop(next(iter(self._failed)))
            self._failed[key] = exc

    def _drop(self, key: tuple[Any, Any]) -> _Open | None:
        with self._lock:
            return self._open.pop(key, None)

    def drop_caller(self, caller: Any) -> int:
        """Free every stream ``caller`` left open (its connection ended); returns how many."""
        with self._lock:
            keys = [k for k in self._open if k[0] is caller]
            for k in keys:
                del self._open[k]
            reads = [k for k in self._reads if k[0] is caller]
            for k in reads:
                del self._reads[k]
            for k in [k for k in self._failed if k[0] is caller]:
                del self._failed[k]
        return len(keys) + len(reads)


def stream_ops(node: Any) -> tuple[Streams, dict[str, Callable[..., Any]]]:
    """The node's :class:`Streams` and its named commands."""
    streams = Streams(node)
    return streams, {
        "fedws.stream.begin": streams.begin,
        "fedws.stream.put": streams.put,
        "fedws.stream.commit": streams.commit,
        "fedws.stream.abort": streams.abort,
        "fedws.stream.open_read": streams.open_read,
        "fedws.stream.read": streams.read,
        "fedws.stream.close": streams.close,
    }
