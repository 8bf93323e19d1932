"""Optional zstd compression of large frames, negotiated per link.

Off by default: float32 weights barely compress (measured in bench/README.md), so the CPU
is spent for nothing. Where updates do compress (float16/bfloat16 deltas, sparse or
quantized updates) a coordinator opts in (``FEDWS_COMPRESS=zstd`` or
``WebsocketLink(compress=True)``); the link asks in the handshake (``X-Fedws-Compress:
zstd``) and uses it only if the node answers the same, i.e. both sides have the
``zstandard`` package (``pip install fedws[compress]``) and agree.

A compressed frame is ``MAGIC | u64 raw size | zstd data``. ``MAGIC``'s second word is a
blob padding no codec blob can have (at most 63), so a frame that is not compressed can
never be taken for one. Decompression is bounded: the declared size is checked against the
link's frame limit before anything is allocated, the output is written into a buffer of
exactly that size, and a stream that would inflate past it (a zip bomb) or stops short is
refused.
"""

from __future__ import annotations

import importlib
import os
import struct
from typing import Any

from ..exceptions import DecodeError
from .memory import frame_buffer

__all__ = ["MAGIC", "MIN_BYTES", "SAMPLE_BYTES", "available", "wanted", "deflate", "inflate", "is_compressed", "sample_pays"]

MAGIC = b"FWZ1\xff\xff\xff\xff"
_SIZE = struct.Struct("<Q")
MIN_BYTES = 64 << 10
"""Frames smaller than this are sent as they are (latency matters more there)."""
_WORTH = 0.9
"""Send the compressed form only if it is at most this fraction of the raw frame."""
SAMPLE_BYTES = 64 << 10
"""A frame of at least twice this is judged on a sample first: float32 weights barely
compress, and compressing all of a 64 MiB frame to learn that costs more than sending it."""


def _zstd() -> Any | None:
    try:
        return importlib.import_module("zstandard")
    except ImportError:
        return None


def available() -> bool:
    """Whether this process can compress (the ``zstandard`` package is installed)."""
    return _zstd() is not None


def wanted() -> bool:
    """The default of a link: ``FEDWS_COMPRESS=zstd`` opts in (when zstandard is installed)."""
    return os.environ.get("FEDWS_COMPRESS", "") == "zstd" and available()


def deflate(chunks: list[bytes | memoryview], level: int = 1) -> list[bytes | memoryview]:
    """``chunks`` of one frame, compressed if that pays; else unchanged."""
    total = sum(len(c) for c in chunks)
    if total < MIN_BYTES:
        return chunks
    zstd = _zstd()
    if zstd is None:
        return chunks
    if total >= 2 * SAMPLE_BYTES and not sample_pays(chunks, level):
        return chunks
    return _pack(chunks, total, zstd, level)


def sample_pays(chunks: list[bytes | memoryview], level: int = 1) -> bool:
    """Whether :data:`SAMPLE_BYTES` from the middle of the frame's largest chunk (a tensor's
    data, past any header) compress to at most :data:`_WORTH` of their size."""
    zstd = _zstd()
    if zstd is None:
        return False
    big = memoryview(max(chunks, key=len)).cast("B")
    start = max(0, (len(big) - SAMPLE_BYTES) // 2)
    sample = big[start : start + SAMPLE_BYTES]
    return len(zstd.ZstdCompressor(level=level).compress(sample)) <= _WORTH * len(sample)


def _pack(chunks: list[bytes | memoryview], total: int, zstd: Any, level: int) -> list[bytes | memoryview]:
    cctx = zstd.ZstdCompressor(level=level)
    co = cctx.compressobj(size=total)
    parts = [co.compress(c) for c in chunks]
    parts.append(co.flush())
    packed = sum(len(p) for p in parts)
    if packed > _WORTH * total:
        return chunks
    return [MAGIC + _SIZE.pack(total), *parts]


def is_compressed(message: Any) -> bool:
    return len(message) >= 16 and bytes(memoryview(message)[:8]) == MAGIC


def inflate(message: bytes | bytearray | memoryview, limit: int) -> bytearray | memoryview:
    """The frame inside a compressed ``message``; at most ``limit`` bytes.

    Raises:
        DecodeError: a declared size over ``limit``, data that inflates to more or fewer
            bytes than declared, or garbage; nothing larger than ``limit`` was allocated.
    """
    zstd = _zstd()
    if zstd is None:
        raise DecodeError("a compressed frame arrived but zstandard is not installed")
    mv = memoryview(message).cast("B")
    (size,) = _SIZE.unpack_from(mv, 8)
    if size > limit:
        raise DecodeError(f"a compressed frame declares {size} bytes, over the frame limit of {limit}")
    out = frame_buffer(size)
    try:
        reader = zstd.ZstdDecompressor().stream_reader(mv[16:], read_across_frames=False)
        got = 0
        view = memoryview(out)
        while got < size:
            n = reader.readinto(view[got:])
            if not n:
                break
            got += n
        extra = reader.read(1) if got == size else b""
    except zstd.ZstdError as exc:
        raise DecodeError(f"corrupt compressed frame: {exc}") from None
    if got != size or extra:
        raise DecodeError(f"a compressed frame declares {size} bytes but inflates to {'more' if extra else got}")
    return out
