"""The decoder bounds nesting and sizes before it recurses or allocates.

Every byte from the wire is hostile: each test hands the decoder (or a node) a blob that
lies in one way, and checks it gets a DecodeError (or an error reply) and nothing worse.
Attacks that crashed the process on the base commit run in a child process, so a
regression fails the test instead of killing the test run.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap

import msgpack
import pytest
import torch

from fedws.exceptions import DecodeError
from fedws.node import Node
from fedws.protocol import codec
from fedws.protocol.codec import (
    EXT_POINTER,
    EXT_SET,
    EXT_SLICE,
    EXT_TENSOR,
    EXT_TUPLE,
    MAX_BLOBS,
    MAX_EXT_DEPTH,
    MAX_NDIM,
    decode,
    encode_bytes,
    iter_blobs,
)
from fedws.protocol.messages import FRAME_ERROR_SEQ, Kind

HEAD = struct.Struct("<IIQ")


def blob(env: bytes, raw: bytes = b"", pad: int | None = None) -> bytes:
    """A blob around a hand-made envelope (and raw region)."""
    if pad is None:
        pad = (-(HEAD.size + len(env))) % 64 if raw else 0
    return HEAD.pack(len(env), pad, len(raw)) + env + bytes(pad) + raw


def nested_tuples(depth: int, leaf: bytes = b"\x01") -> bytes:
    """An envelope holding a value ``depth`` ext tuples deep: ((((1,),),),)."""
    inner = leaf
    for _ in range(depth):
        inner = msgpack.packb(msgpack.ExtType(EXT_TUPLE, b"\x91" + inner))
    return inner


def reply_of(node: Node, frame: bytes) -> list:
    return decode(b"".join(node.handle(frame)))


# -- nesting ---------------------------------------------------------------------------------


def test_ext_nesting_up_to_the_limit_decodes() -> None:
    value = decode(blob(nested_tuples(MAX_EXT_DEPTH)))
    for _ in range(MAX_EXT_DEPTH):
        assert type(value) is tuple and len(value) == 1
        value = value[0]
    assert value == 1


def test_ext_nesting_past_the_limit_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="nests deeper"):
        decode(blob(nested_tuples(MAX_EXT_DEPTH + 1)))


def test_deep_ext_nesting_does_not_crash_a_node() -> None:
    """Base commit: a ~1 KB frame nesting 200 ext levels overflowed the C stack (SIGSEGV)."""
    code = textwrap.dedent(
        """
        import msgpack, struct
        from fedws.node import Node
        from fedws.protocol import codec
        inner = msgpack.packb(1)
        for _ in range(200):
            inner = msgpack.packb(msgpack.ExtType(codec.EXT_TUPLE, b"\\x91" + inner))
        env = msgpack.packb([1, 5, "torch.add", [], {}, [1]])[:-1] + inner  # hostile last field
        frame = struct.pack("<IIQ", len(env), 0, 0) + env
        frame2 = struct.pack("<IIQ", len(inner), 0, 0) + inner
        for f in (frame, frame2):
            reply = codec.decode(b"".join(Node("bob").handle(f)))
            assert reply[2], reply
        print("alive")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "alive" in out.stdout


@pytest.mark.parametrize("ext", [EXT_TUPLE, EXT_SET, EXT_SLICE, EXT_TENSOR, EXT_POINTER])
def test_every_nesting_ext_counts_towards_the_depth(ext: int) -> None:
    inner = msgpack.packb(1)
    for _ in range(MAX_EXT_DEPTH + 5):
        inner = msgpack.packb(msgpack.ExtType(ext, b"\x91" + inner))
    with pytest.raises(DecodeError):
        decode(blob(inner))


def test_plain_array_nesting_is_bounded_by_msgpack() -> None:
    env = b"\x91" * 5000 + b"\x01"
    with pytest.raises(DecodeError):
        decode(blob(env))


def test_nested_payload_copies_are_bounded() -> None:
    # 31 levels each re-reading a 60 KB payload would copy ~1.9 MB for a 60 KB envelope
    leaf = msgpack.packb(b"x" * 60_000)
    with pytest.raises(DecodeError, match="re-read"):
        decode(blob(nested_tuples(MAX_EXT_DEPTH, leaf)))
    # a few levels, as real values have, are fine
    assert decode(blob(nested_tuples(3, leaf))) == (((b"x" * 60_000,),),)


# -- sizes declared by msgpack headers --------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        b"\xdd\xff\xff\xff\xff",  # array32 of 4 Gi elements, in 5 bytes
        b"\xdf\xff\xff\xff\xff",  # map32
        b"\xdb\xff\xff\xff\xff",  # str32
        b"\xc6\xff\xff\xff\xff",  # bin32
        b"\xc9\xff\xff\xff\xff\x02",  # ext32
        b"\x91\xdd\x7f\xff\xff\xff",  # nested
    ],
)
def test_tiny_blob_cannot_declare_a_huge_container(env: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(blob(env))


def test_huge_container_inside_a_nested_ext_is_refused() -> None:
    env = msgpack.packb(msgpack.ExtType(EXT_TUPLE, b"\xdd\x7f\xff\xff\xff"))
    with pytest.raises(DecodeError):
        decode(blob(env))


# -- blob and frame headers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:-1],  # truncated
        lambda b: b + b"\x00",  # trailing byte
        lambda b: HEAD.pack(2**32 - 1, 0, 0) + b[16:],  # env_len lies
        lambda b: HEAD.pack(*HEAD.unpack_from(b)[:2], 2**64 - 1) + b[16:],  # buf_len lies
        lambda b: HEAD.pack(HEAD.unpack_from(b)[0], 2**32 - 1, 0) + b[16:],  # pad lies
        lambda b: b[:10],  # shorter than the header
        lambda b: b"",
    ],
)
def test_blob_length_fields_are_checked(mutate) -> None:
    good = encode_bytes([1, 2, torch.arange(4.0)])
    with pytest.raises(DecodeError):
        decode(mutate(good))


def test_padding_of_64_or_more_is_refused() -> None:
    env = msgpack.packb(1)
    with pytest.raises(DecodeError, match="padding"):
        decode(HEAD.pack(len(env), 64, 0) + env + bytes(64))
    with pytest.raises(DecodeError, match="padding"):
        list(iter_blobs(HEAD.pack(len(env), 64, 0) + env + bytes(64)))


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x00" * 15,
        HEAD.pack(100, 0, 0) + b"\x01",
        HEAD.pack(1, 0, 2**63) + b"\x01",
        HEAD.pack(2**32 - 1, 63, 2**64 - 1),
    ],
)
def test_frame_headers_are_checked_against_the_buffer(frame: bytes) -> None:
    with pytest.raises(DecodeError):
        list(iter_blobs(frame))


def test_frame_of_too_many_tiny_blobs_is_refused_before_any_runs() -> None:
    tiny = encode_bytes([int(Kind.PING), 1])
    assert len(list(iter_blobs(tiny * 1000))) == 1000
    with pytest.raises(DecodeError, match="more than"):
        list(iter_blobs(tiny * (MAX_BLOBS + 1)))
    node = Node("bob")
    watermark, values, errors = reply_of(node, tiny * (MAX_BLOBS + 1))
    assert watermark == 0 and values == []
    assert [e[0] for e in errors] == [FRAME_ERROR_SEQ]


def test_non_buffer_input_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode(memoryview(b"x" * 32).cast("B", (4, 8)))  # cast of a 2-d view fails


# -- tensor headers ---------------------------------------------------------------------------


def tensor_blob(header: list, raw: bytes = b"") -> bytes:
    env = msgpack.packb(msgpack.ExtType(EXT_TENSOR, msgpack.packb(header)))
    return blob(env, raw)


def test_a_hand_made_tensor_decodes() -> None:
    t = decode(tensor_blob(["float32", [2], False, 0, 8, None], struct.pack("<ff", 1, 2)))
    assert t.tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    "header",
    [
        ["nope", [2], False, 0, 8, None],  # unknown dtype
        [["float32"], [2], False, 0, 8, None],  # unhashable dtype
        ["float32", 2, False, 0, 8, None],  # shape not a list
        ["float32", [-2], False, 0, 8, None],  # negative size
        ["float32", ["2"], False, 0, 8, None],  # size not an int
        ["float32", [2.0], False, 0, 8, None],
        ["float32", [True, 2], False, 0, 8, None],
        ["float32", [1] * (MAX_NDIM + 1), False, 0, 4, None],  # too many dims
        ["float32", [0, 2**62, 2**62], False, 0, 0, None],  # strides overflow
        ["float32", [2**40, 2**40], False, 0, 8, None],  # numel*itemsize != nbytes
        ["float32", [2**31], False, 0, 2**33, None],  # bytes beyond the blob
        ["float32", [2], False, 8, 8, None],  # offset past the end
        ["float32", [2], False, -8, 8, None],  # negative offset
        ["float32", [2], False, "0", 8, None],  # offset not an int
        ["float32", [2], "yes", 0, 8, None],  # requires_grad not a bool
        ["int64", [1], True, 0, 8, None],  # ints cannot require grad
        ["float32", [2], True, 0, 8, "grad"],  # grad not a tensor
        ["float32", [2], False, 0, 8],  # 5 fields
        "float32",
        None,
    ],
)
def test_lying_tensor_headers_are_refused(header) -> None:
    with pytest.raises(DecodeError):
        decode(tensor_blob(header, struct.pack("<ff", 1, 2)))


def test_empty_tensor_with_huge_dims_allocates_nothing() -> None:
    t = decode(tensor_blob(["float32", [0, 2**40], False, 0, 0, None]))
    assert t.shape == (0, 2**40) and t.numel() == 0


def test_grad_of_another_shape_or_dtype_is_refused() -> None:
    grad = torch.ones(3, dtype=torch.float64)
    x = torch.ones(3, requires_grad=True)
    x.grad = torch.ones(3)
    good = encode_bytes(x)
    assert decode(good).grad.tolist() == [1.0, 1.0, 1.0]
    x.grad = None
    bad = codec._Encoder()  # build a header by hand with a mismatched grad
    header = bad.tensor_header(torch.ones(3))
    header[2], header[5] = True, grad
    outer, codec._packers.encoder = codec._packers.encoder, bad
    try:
        env = bad.pack(msgpack.ExtType(EXT_TENSOR, bad.pack(header)))
    finally:
        codec._packers.encoder = outer
    raw = b"".join(bytes(b) for b in bad.buffers)
    with pytest.raises(DecodeError, match="grad"):
        decode(blob(env, raw))


# -- pointers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        ["bob", None, 1, 2, [2], "float32"],  # 6 fields
        [["bob"], None, 1, 2, [2], "float32", False],
        ["bob", 3, 1, 2, [2], "float32", False],
        ["bob", None, "1", 2, [2], "float32", False],
        ["bob", None, 1, 2, [-1], "float32", False],
        ["bob", None, 1, 2, [2], "nope", False],
        ["bob", None, 1, 2, [2], "float32", 1],
    ],
)
def test_pointer_fields_are_checked(fields) -> None:
    env = msgpack.packb(msgpack.ExtType(EXT_POINTER, msgpack.packb(fields)))
    with pytest.raises(DecodeError):
        decode(blob(env))


# -- through a node ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        blob(nested_tuples(MAX_EXT_DEPTH + 1)),
        blob(b"\xdd\xff\xff\xff\xff"),
        tensor_blob(["float32", [2**31], False, 0, 2**33, None]),
        HEAD.pack(1, 0, 2**63) + b"\x01",
    ],
)
def test_node_answers_a_hostile_frame_with_an_error_reply(frame: bytes) -> None:
    node = Node("bob")
    watermark, values, errors = reply_of(node, frame)
    assert watermark == 0 and values == []
    [(seq, err, ids)] = errors
    assert seq == FRAME_ERROR_SEQ and err["code"] == "DecodeError" and ids == []
    # and it keeps working
    node.handle(encode_bytes([int(Kind.STORE), 1, 10, torch.ones(2), [], None]))
    assert node.store.get(10).tolist() == [1.0, 1.0]
