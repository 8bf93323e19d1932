"""Optional zstd compression: negotiated per link, bounded when it inflates."""

from __future__ import annotations

import pytest
import torch

import fedws as sy
from fedws.exceptions import DecodeError
from fedws.protocol import codec
from fedws.transport import compress
from tests.conftest import NodePool

zstandard = pytest.importorskip("zstandard")


def _sparse_half(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.1)).half()


def test_a_frame_that_compresses_round_trips_and_one_that_does_not_goes_as_is() -> None:
    chunks = codec.encode(_sparse_half(1 << 20))
    raw = b"".join(chunks)
    packed = compress.deflate(chunks)
    assert compress.is_compressed(packed[0]) and sum(len(p) for p in packed) < len(raw) // 2
    assert bytes(compress.inflate(b"".join(packed), len(raw))) == raw
    noise = codec.encode(torch.randn(1 << 18))
    assert compress.deflate(noise) is noise  # float32 noise does not pay
    small = codec.encode(torch.zeros(100))
    assert compress.deflate(small) is small


def test_inflating_is_bounded_zip_bomb_lies_and_garbage() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))  # 64 MiB of zeros in ~2 KiB
    with pytest.raises(DecodeError, match="over the frame limit"):
        compress.inflate(compress.MAGIC + compress._SIZE.pack(64 << 20) + bomb, 1 << 20)
    with pytest.raises(DecodeError, match="inflates to more"):  # declares 1 MiB, holds 64
        compress.inflate(compress.MAGIC + compress._SIZE.pack(1 << 20) + bomb, 1 << 30)
    short = zstandard.ZstdCompressor().compress(bytes(1000))
    with pytest.raises(DecodeError, match="inflates to 1000"):
        compress.inflate(compress.MAGIC + compress._SIZE.pack(2000) + short, 1 << 30)
    with pytest.raises(DecodeError, match="corrupt"):
        compress.inflate(compress.MAGIC + compress._SIZE.pack(2000) + b"\x00" * 64, 1 << 30)


def test_a_link_compresses_only_when_both_sides_agree(node_pool: NodePool) -> None:
    url = node_pool.url("streamer")
    hook = sy.TorchHook(torch, federation=sy.Federation())
    on = sy.WebsocketClientWorker(hook, url=url, id="streamer", timeout=30.0, compress=True)
    off = sy.WebsocketClientWorker(hook, url=url, id="streamer", timeout=30.0, compress=False)
    try:
        assert on.link.compressed and not off.link.compressed
        t = _sparse_half(1 << 20)
        for w in (on, off):
            ptr = t.send(w)
            assert torch.equal(ptr.get(), t)
    finally:
        on.close()
        off.close()


def test_a_large_frame_is_judged_on_a_64k_sample_before_all_of_it_is_compressed(monkeypatch: pytest.MonkeyPatch) -> None:
    packed: list[int] = []
    pack = compress._pack

    def counting(chunks: list[bytes | memoryview], total: int, *args: object) -> list[bytes | memoryview]:
        packed.append(total)
        return pack(chunks, total, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(compress, "_pack", counting)
    noise = codec.encode(torch.randn(1 << 20))  # 4 MiB of float32 noise: the sample says no
    assert not compress.sample_pays(noise)
    assert compress.deflate(noise) is noise and packed == []
    sparse = codec.encode(_sparse_half(1 << 20))  # the sample says yes: all of it is compressed
    assert compress.sample_pays(sparse)
    out = compress.deflate(sparse)
    assert compress.is_compressed(out[0]) and packed == [sum(len(c) for c in sparse)]
    raw = b"".join(sparse)
    assert bytes(compress.inflate(b"".join(out), len(raw))) == raw
