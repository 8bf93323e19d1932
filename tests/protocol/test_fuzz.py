"""Fuzzing the decoder and ``Node.handle`` (bounded for CI; ``make fuzz`` is the long run).

About 20,000 frames per run: raw bytes, mutated valid frames (bit flips, truncations, length
fields that lie, declared-huge containers, deep nestings) and structured requests (a valid
envelope with random kinds, fields, op names and ext values). The properties:

- ``codec.iter_blobs`` / ``codec.decode`` raise only ``DecodeError``;
- ``Node.handle`` never raises and always returns a reply that decodes as
  ``[watermark, values, errors]``;
- no frame takes longer than ``HANG_S`` (a hang).

A crash (segfault) would kill this process; ``bench/fuzz.py`` runs the same generators in
child processes and counts deaths instead.
"""

from __future__ import annotations

import logging
import struct
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedws.exceptions import DecodeError
from fedws.node import Node
from fedws.protocol import codec
from fedws.protocol.codec import ObjRef
from fedws.protocol.messages import Kind
from fedws.protocol.ops import OPS

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import fuzz as long_fuzz  # noqa: E402  (bench/fuzz.py: the generator of the long run)

HANG_S = 2.0


def budget(n: int) -> settings:
    """``n`` examples, no per-example deadline (hangs are timed by ``check_node``), no database."""
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None)


HEAD = struct.Struct("<IIQ")
FRAMES = {"count": 0}


@pytest.fixture(autouse=True)
def _quiet_node_log():
    logging.disable(logging.CRITICAL)  # every rejected frame is logged
    yield
    logging.disable(logging.NOTSET)


def check_decode(frame: bytes) -> None:
    """Only DecodeError may come out of the decoder."""
    FRAMES["count"] += 1
    try:
        for blob in codec.iter_blobs(frame):
            try:
                codec.decode(blob)
            except DecodeError:
                pass
    except DecodeError:
        pass


def check_node(node: Node, frame: bytes) -> list[Any]:
    """Node.handle never raises, answers in time, and its reply decodes."""
    start = time.perf_counter()
    reply = codec.decode(b"".join(bytes(c) for c in node.handle(frame)))
    assert time.perf_counter() - start < HANG_S, f"hang on {frame[:200]!r}"
    assert isinstance(reply, list) and len(reply) == 3
    watermark, values, errors = reply
    assert isinstance(watermark, int) and isinstance(values, list) and isinstance(errors, list)
    for err in errors:
        assert "traceback" not in err[1]
    return reply


def fresh_node() -> Node:
    node = Node("fuzz")
    for i, t in enumerate((torch.ones(3), torch.arange(6.0).reshape(2, 3), torch.zeros(4, dtype=torch.int64))):
        node.handle(codec.encode_bytes([int(Kind.STORE), i + 1, 10 + i, t, [], None]))
    return node


VALID = [
    codec.encode_bytes(v)
    for v in (
        [int(Kind.CMD), 1, "torch.add", [ObjRef(10), ObjRef(10)], {}, [20]],
        [int(Kind.CMD), 2, "Tensor.__getitem__", [ObjRef(11), (slice(0, 1), Ellipsis)], {}, [21]],
        [int(Kind.STORE), 3, 30, torch.arange(20.0, requires_grad=True), ["a"], "d"],
        [int(Kind.STORE), 4, 31, {"x": (1, 2.5, {3}), "y": [torch.float16, complex(1, 2)]}, [], None],
        [int(Kind.GET), 5, 10, False],
        [int(Kind.PING), 6],
        [int(Kind.INFO), 7, "list"],
    )
]


# -- raw and mutated bytes --------------------------------------------------------------------------


@budget(4000)
@given(st.binary(max_size=256))
def test_decode_raw_bytes_raises_only_decode_error(data: bytes) -> None:
    check_decode(data)
    check_decode(HEAD.pack(len(data), 0, 0) + data)  # a well-formed header around garbage


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    b = bytearray(b"".join(draw(st.lists(st.sampled_from(VALID), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(1, 4))):
        m = draw(st.integers(0, 5))
        if m == 0 and b:
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif m == 1 and b:
            b[draw(st.integers(0, len(b) - 1))] = draw(st.sampled_from([0xC1, 0xDD, 0xDF, 0xC9, 0xD4, 0xFF, 0, 0x91]))
        elif m == 2:
            del b[draw(st.integers(0, len(b))) :]
        elif m == 3 and len(b) >= 16:
            off, fmt = draw(st.sampled_from([(0, "<I"), (4, "<I"), (8, "<Q")]))
            limit = 2**32 - 1 if fmt == "<I" else 2**64 - 1
            struct.pack_into(fmt, b, off, draw(st.one_of(st.integers(0, 128), st.just(limit), st.integers(0, limit))))
        elif m == 4:
            b += draw(st.binary(min_size=1, max_size=16))
        elif m == 5 and len(b) > 16:
            i = draw(st.integers(16, len(b)))
            b[i:i] = draw(st.sampled_from([b"\xdd\x7f\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xf0\x01"]))
    return bytes(b)


NODE = {"node": None}


def shared_node() -> Node:
    if NODE["node"] is None or FRAMES["count"] % 500 == 0:
        NODE["node"] = fresh_node()
    node = NODE["node"]
    assert node is not None
    return node


@budget(1500)
@given(mutated(), st.lists(st.integers(0, 2**16), min_size=4, max_size=4))
def test_mutated_frames(frame: bytes, cuts: list[int]) -> None:
    node = shared_node()
    check_decode(frame)
    check_node(node, frame)
    for cut in cuts:  # and four truncations of it
        check_decode(frame[: cut % (len(frame) + 1)])
        check_node(node, frame[: cut % (len(frame) + 1)] or b"\x00")


@budget(300)
@given(
    st.integers(1, 300),
    st.lists(st.sampled_from([codec.EXT_TUPLE, codec.EXT_SET, codec.EXT_TENSOR, codec.EXT_SLICE, codec.EXT_POINTER,
                              -1]), min_size=1, max_size=4),
)
def test_deep_nesting(depth: int, exts: list[int]) -> None:
    inner = msgpack.packb(1)
    for i in range(depth):
        ext = exts[i % len(exts)]
        inner = b"\x91" + inner if ext < 0 else msgpack.packb(msgpack.ExtType(ext, b"\x91" + inner))
    frame = HEAD.pack(len(inner), 0, 0) + inner
    check_decode(frame)
    check_node(shared_node(), frame)


# -- structured requests ---------------------------------------------------------------------------

small_ints = st.integers(-8, 16)
leaves = st.one_of(
    small_ints,
    st.floats(-10, 10),
    st.sampled_from([float("nan"), float("inf"), -0.0]),
    st.sampled_from(["sum", "mean", "", "x", "fro", "ij,jk->ik", "constant"]),
    st.none(),
    st.booleans(),
    st.sampled_from([ObjRef(10), ObjRef(11), ObjRef(12), ObjRef(2**40)]),
    st.sampled_from([torch.float32, torch.int64, torch.bool, torch.float16, torch.strided]),
    st.just(Ellipsis),
    st.builds(slice, st.integers(-3, 3), st.one_of(st.none(), st.integers(-3, 5))),
    st.builds(lambda n, k: torch.arange(float(n)).reshape(-1)[: k], st.integers(0, 6), st.integers(0, 6)),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from(["dim", "keepdim", "alpha", "p", "dtype", "x"]), inner, max_size=2),
    ),
    max_leaves=6,
)
op_names = st.one_of(st.sampled_from(sorted(OPS)), st.sampled_from(["torch.save", "", "Tensor.set_", "fedws.nope"]),
                     values)


@st.composite
def requests(draw: st.DrawFn) -> list[Any]:
    kind = draw(st.one_of(st.sampled_from([int(k) for k in Kind]), st.integers(-2, 300), values))
    seq = draw(st.one_of(st.integers(1, 2**40), values))
    if type(kind) is int and kind == Kind.CMD:
        fields = [draw(op_names), draw(st.lists(values, max_size=3)), draw(st.one_of(st.just({}), values)),
                  draw(st.lists(st.integers(20, 40), max_size=2))]
    else:
        fields = draw(st.lists(values, max_size=4))
    return [kind, seq, *fields]


@budget(1500)
@given(st.lists(requests(), min_size=1, max_size=3))
def test_structured_requests(reqs: list[list[Any]]) -> None:
    try:
        frame = b"".join(codec.encode_bytes(r) for r in reqs)
    except Exception:  # noqa: BLE001 - a generated value that cannot travel
        return
    check_decode(frame)
    check_node(shared_node(), frame)


@budget(60)
@given(st.integers(0, 2**32))
def test_frames_of_the_long_fuzzer(seed: int) -> None:
    """The generator of ``make fuzz`` (bench/fuzz.py), 60 frames per seed."""
    import random

    gen = long_fuzz._gen(random.Random(seed))
    node = fresh_node()
    for _ in range(60):
        try:
            frame = gen()
        except Exception:  # noqa: BLE001 - a generated value that cannot travel
            continue
        check_decode(frame)
        check_node(node, frame)


def test_zz_frame_count() -> None:
    """Runs last in this module: the suite above went through about 20,000 frames."""
    print(f"fuzzed {FRAMES['count']} frames")
    if FRAMES["count"] < 15_000:
        pytest.skip(f"only {FRAMES['count']} frames (run the whole module to fuzz)")
    assert FRAMES["count"] >= 15_000
