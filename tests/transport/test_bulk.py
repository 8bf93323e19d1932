"""The bulk path: large tensors move without copies that are not needed, into frame buffers
that are reused only when nothing refers to them any more, and arrive bit for bit.

No test here times anything: each checks a property that would break if a copy crept back
in or a buffer were reused too early (memory addresses, reference counts, contents).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import platform
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import torch

import fedws as sy
from fedws.protocol import codec
from fedws.transport import memory
from fedws.transport.frames import FRAGMENT, fragments, receive
from fedws.transport.memory import MAPPED_MIN_BYTES, MessagePool, frame_buffer, tune_malloc


def _address(buf: Any) -> int:
    """Start address of a writable buffer."""
    return ctypes.addressof(ctypes.c_char.from_buffer(memoryview(buf).cast("B")))


def _inside(ptr: int, buf: Any) -> bool:
    start = _address(buf)
    return start <= ptr < start + memoryview(buf).nbytes


class _FakeSocket:
    """What :func:`receive` needs of a websockets connection: ``recv_streaming``."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts

    async def recv_streaming(self) -> AsyncIterator[bytes]:
        for p in self.parts:
            yield p


def _receive(parts: list[bytes]) -> Any:
    return asyncio.run(receive(_FakeSocket(parts)))


# -- memory ----------------------------------------------------------------------------------


def test_tune_malloc_is_idempotent_and_applies_on_glibc() -> None:
    first = tune_malloc()
    assert tune_malloc() is first
    user_tuned = any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    opted_out = os.environ.get("FEDWS_MALLOC_TUNING", "1") == "0"
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc" and not (user_tuned or opted_out):
        assert first is True


@pytest.fixture
def own_pool(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], MessagePool]:
    """frame_buffer drawing from a pool of the test's own (the process's may be capped)."""

    def make(budget: int) -> MessagePool:
        pool = MessagePool(budget)
        monkeypatch.setattr(memory, "message_pool", pool)
        return pool

    return make


def test_a_frame_buffer_is_reused_only_once_nothing_views_it(own_pool: Callable[[int], MessagePool]) -> None:
    pool = own_pool(64 << 20)
    a = frame_buffer(5 << 20)
    a[:4] = b"AAAA"
    held = torch.frombuffer(a[1 << 20 : 2 << 20], dtype=torch.uint8)  # a decoded tensor's view
    a_addr = _address(a)
    del a
    b = frame_buffer(5 << 20)
    assert _address(b) != a_addr  # the tensor still views the first buffer: never handed out
    del b
    c = frame_buffer(5 << 20)
    assert _address(c) != a_addr  # still held, and b's buffer is the idle one
    del c
    del held
    addresses = {_address(frame_buffer(5 << 20)) for _ in range(3)}  # each freed at once
    assert a_addr in addresses
    assert pool.pooled_bytes <= 64 << 20


def test_frame_buffers_have_exact_sizes_and_the_pool_its_budget(own_pool: Callable[[int], MessagePool]) -> None:
    pool = own_pool(8 << 20)
    first = frame_buffer(6 << 20)
    assert len(first) == 6 << 20
    over = frame_buffer(6 << 20)  # first is in use: this one is not kept
    assert len(over) == 6 << 20 and pool.pooled_bytes <= 8 << 20
    del first, over
    assert len(frame_buffer((7 << 20) + 3)) == (7 << 20) + 3
    assert pool.pooled_bytes <= 8 << 20
    own_pool(64 << 20)
    x = frame_buffer(5 << 20)
    del x
    y = frame_buffer(3 << 20)  # a smaller frame never pins a larger mapping (the memory budget
    assert len(y) == 3 << 20 and memoryview(y).nbytes == 3 << 20  # counts frame bytes)
    none = own_pool(0)
    frame_buffer(5 << 20)
    assert none.pooled_bytes == 0


def test_small_frames_are_bytearrays_large_ones_writable_views() -> None:
    small = frame_buffer(1000)
    assert isinstance(small, bytearray) and len(small) == 1000
    large = frame_buffer(MAPPED_MIN_BYTES + 5)
    assert isinstance(large, memoryview) and not large.readonly and len(large) == MAPPED_MIN_BYTES + 5


# -- send: fragments borrow the tensor's memory ----------------------------------------------


def test_fragments_of_a_large_tensor_are_views_of_its_storage() -> None:
    t = torch.randn(3 * FRAGMENT // 4 + 123)  # 3+ fragments of tensor bytes
    out = fragments(codec.encode([1, 2, t]))
    assert isinstance(out, list) and len(out) >= 3
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    views = [f for f in out if isinstance(f, memoryview) and start <= _address(f) < end]
    assert sum(v.nbytes for v in views) == t.numel() * t.element_size()  # every tensor byte borrowed
    assert all(len(v) <= FRAGMENT for v in out)


def test_non_contiguous_tensor_is_sent_as_its_values() -> None:
    t = torch.randn(1024, 600).t()  # transposed: not contiguous
    frame = _receive([bytes(b) for b in _as_parts(codec.encode(t))])
    back = codec.decode(frame)
    assert torch.equal(back, t) and back.is_contiguous()


def _as_parts(chunks: list[bytes | memoryview]) -> list[bytes]:
    out = fragments(chunks)
    return [out] if isinstance(out, bytes) else [bytes(p) for p in out]


# -- receive: one copy into a buffer of its own, tensors are views of it ---------------------


@pytest.mark.parametrize("nbytes", [100_000, MAPPED_MIN_BYTES + 4096])
def test_received_large_tensor_is_a_view_of_the_assembled_frame(nbytes: int) -> None:
    t = torch.randn(nbytes // 4)
    frame = _receive(_as_parts(codec.encode(t)))
    assert not memoryview(frame).readonly
    out = codec.decode(frame)
    assert torch.equal(out, t)
    assert _inside(out.data_ptr(), frame)  # shares the frame's memory: decode copied nothing


def test_a_reused_frame_buffer_never_shows_an_earlier_frame() -> None:
    n = MAPPED_MIN_BYTES + 4096
    a = torch.full((n // 4,), 1.0)
    b = torch.full((n // 4,), 2.0)
    got_a = codec.decode(_receive(_as_parts(codec.encode(a))))
    got_b = codec.decode(_receive(_as_parts(codec.encode(b))))  # a still alive: another buffer
    assert torch.equal(got_a, a) and torch.equal(got_b, b)
    del got_a
    got_c = codec.decode(_receive(_as_parts(codec.encode(a * 3))))  # may reuse a's buffer
    assert torch.equal(got_b, b) and torch.equal(got_c, a * 3)


def test_zero_size_and_every_dtype_survive_the_bulk_path() -> None:
    values = [torch.empty(0), torch.empty(0, 5, dtype=torch.int64)]
    for name in sorted(codec.DECODABLE_DTYPES):
        dtype = codec.DECODABLE_DTYPES[name]
        if name.startswith(("q", "quint")):
            continue
        itemsize = dtype.itemsize
        raw = torch.randint(0, 256, (MAPPED_MIN_BYTES // 8 // itemsize * itemsize,), dtype=torch.uint8)
        values.append(raw.view(dtype))
    back = codec.decode(_receive(_as_parts(codec.encode(values))))
    assert len(back) == len(values)
    for x, y in zip(values, back, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert bytes(x.reshape(-1).view(torch.uint8).numpy()) == bytes(y.reshape(-1).view(torch.uint8).numpy())


def test_byte_order_is_little_endian_on_the_wire() -> None:
    t = torch.tensor([1], dtype=torch.int32).expand(1 << 16).contiguous()  # >= VIEW_MIN_BYTES
    blob = codec.encode_bytes(t)
    assert blob.endswith(b"\x01\x00\x00\x00")  # the wire is little-endian


# -- through a node, on every transport ------------------------------------------------------


def test_large_tensors_round_trip_through_a_worker(make_worker: Callable[..., sy.Worker]) -> None:
    bob = make_worker("bob")
    a = torch.randn(MAPPED_MIN_BYTES // 4 + 17)
    b = torch.arange(MAPPED_MIN_BYTES // 8 + 5, dtype=torch.float64)
    c = torch.randn(1100, 1000).t()  # non-contiguous, > MAPPED_MIN_BYTES
    pa, pb, pc = a.send(bob), b.send(bob), c.send(bob)  # all held on the node at once
    assert torch.equal(pb.get(), b)
    pd = (a * 2).send(bob)  # may land in b's freed buffer; a's and c's are still held
    assert torch.equal(pa.get(), a)
    assert torch.equal(pc.get(), c)
    assert torch.equal(pd.get(), a * 2)


def test_sent_tensor_may_change_after_send_returns(make_worker: Callable[..., sy.Worker]) -> None:
    bob = make_worker("bob")
    t = torch.zeros(MAPPED_MIN_BYTES // 4 + 1)
    ptr = t.send(bob)
    t.fill_(7.0)  # send returned: the frame was written (or copied), the node has zeros
    assert ptr.get().abs().sum().item() == 0.0


def test_module_state_to_three_workers_and_back(make_worker: Callable[..., sy.Worker]) -> None:
    workers = [make_worker(n) for n in ("alice", "bob", "carol")]
    model = torch.nn.Linear(1200, 1000)  # 4.8 MB of weights
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    copies = []
    for w in workers:
        m = torch.nn.Linear(1200, 1000)
        m.load_state_dict(expected)
        copies.append(m.send(w))
    for m in copies:
        m.get()
        for k, v in m.state_dict().items():
            assert torch.equal(v, expected[k])

