"""The msgpack codec: every dtype and layout round-trips bit for bit; bad bytes never crash."""

from __future__ import annotations

import math
import random

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedws
from fedws.node import Node
from fedws.protocol import codec
from fedws.protocol.codec import DTYPES, ObjRef, PointerRef, decode, encode, encode_bytes, iter_blobs
from fedws.protocol.messages import FRAME_ERROR_SEQ, Kind

# Every dtype torch can hold dense data in (quantized dtypes need a quantizer, not bytes).
DATA_DTYPES = sorted(
    (name for name, dt in DTYPES.items() if not name.startswith(("q", "quint"))),
)


def rt(obj):
    return decode(encode_bytes(obj))


def raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random *bytes* viewed as ``dtype``: NaN payloads, subnormals, every bit pattern."""
    gen = torch.Generator().manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = math.prod(shape) * itemsize
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).view(dtype).reshape(shape)


def test_dtype_table_has_the_dtypes_the_seed_and_design_name() -> None:
    for name in ("float32", "float64", "float16", "bfloat16", "bool", "int8", "uint8", "int64",
                 "complex64", "complex128", "uint16", "uint32", "uint64"):
        assert name in DTYPES
    assert any(n.startswith("float8") for n in DTYPES) == any(n.startswith("float8") for n in dir(torch))


@pytest.mark.parametrize("name", DATA_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3), (5,), (3, 4)])
def test_every_dtype_round_trips_bit_exact(name: str, shape: tuple[int, ...]) -> None:
    dtype = DTYPES[name]
    try:
        t = random_tensor(dtype, shape)
    except (RuntimeError, NotImplementedError, TypeError) as exc:  # pragma: no cover
        pytest.skip(f"torch cannot build a {name} tensor: {exc}")
    out = rt(t)
    assert out.dtype == dtype
    assert out.shape == t.shape
    assert raw_bytes(out) == raw_bytes(t)
    assert not out.requires_grad


def test_bool_and_bfloat16_values() -> None:
    b = torch.tensor([True, False, True])
    assert torch.equal(rt(b), b)
    bf = torch.tensor([1.5, -2.25, float("inf")], dtype=torch.bfloat16)
    assert torch.equal(rt(bf), bf)
    assert rt(torch.tensor(3.5)).shape == ()  # 0-d stays 0-d
    assert rt(torch.tensor(3.5)).item() == 3.5


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(12.0).reshape(3, 4).t(),
        lambda: torch.arange(24).reshape(2, 3, 4).permute(2, 0, 1),
        lambda: torch.arange(20.0)[::3],
        lambda: torch.arange(16.0).reshape(4, 4)[1:3, ::2],
        lambda: torch.arange(6.0).reshape(2, 3).expand(4, 2, 3),
        lambda: torch.tensor(5.0).expand(3, 3),
        lambda: torch.arange(8.0).as_strided((3, 2), (2, 1), 1),
        lambda: torch.tensor([1 + 2j, 3 - 4j]).conj(),
        lambda: torch.tensor([1 + 2j, 3 - 4j]).conj().imag,
        lambda: torch.tensor([[1 + 1j, 2j], [3, 4 - 1j]]).mH,
        lambda: torch.tensor([1.0, 2.0])._neg_view(),
    ],
)
def test_views_travel_as_their_values(make) -> None:
    t = make()
    out = rt(t)
    assert out.is_contiguous()
    assert out.shape == t.shape and out.dtype == t.dtype
    assert torch.equal(out, t.resolve_conj().resolve_neg())
    assert not out.is_conj()


def test_decoded_tensor_is_writable_and_owns_its_memory() -> None:
    t = torch.arange(4.0)
    blob = bytearray(encode_bytes(t))
    out = decode(blob)
    out.add_(1)  # would fail or corrupt the frame if it aliased read-only bytes
    blob[:] = b"\0" * len(blob)
    assert out.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_encode_borrows_large_tensors_and_snapshots_small_ones() -> None:
    big = torch.arange(100_000, dtype=torch.float32)
    chunks = encode(big)
    assert any(isinstance(c, memoryview) and c.nbytes == 400_000 for c in chunks)
    small = torch.arange(1000, dtype=torch.float32)
    chunks = encode(small)
    small.add_(1)  # after encoding: the encoded bytes must not change
    assert decode(b"".join(chunks)).tolist() == list(range(1000))


def test_large_tensors_decode_as_views_of_a_writable_frame() -> None:
    t = torch.arange(100_000, dtype=torch.float32)
    frame = bytearray(encode_bytes(t))
    out = decode(frame)
    assert torch.equal(out, t)
    frame[-4:] = b"\0\0\0\0"  # the tensor shares the frame's memory: no copy was made
    assert out[-1].item() == 0.0
    assert decode(bytes(frame))[-1].item() == 0.0  # read-only input is copied instead


def test_requires_grad_and_grad_round_trip() -> None:
    t = torch.tensor([1.0, 2.0], requires_grad=True)
    (t * 3).sum().backward()
    out = rt(t)
    assert out.requires_grad and out.is_leaf
    assert out.grad.tolist() == [3.0, 3.0]
    nograd = rt(torch.tensor([1.0], requires_grad=True))
    assert nograd.requires_grad and nograd.grad is None
    # a non-leaf travels as its value, requiring grad, without the graph
    y = rt(t * 2)
    assert y.requires_grad and y.is_leaf and y.grad is None


def test_values_round_trip() -> None:
    value = {
        "ints": [0, -1, 2**62, -(2**63)],
        "floats": [0.5, float("inf")],
        "tuple": (1, (2, "x")),
        "slice": slice(1, None, 2),
        "ellipsis": ...,
        "complex": 1 - 2j,
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "size": torch.Size([2, 3]),
        "const": torch.contiguous_format,
        "set": {3, 1, 2},
        "ref": ObjRef(42),
        "none": None,
        "bytes": b"\x00\xff",
    }
    out = rt(value)
    assert out["ints"] == value["ints"]
    assert out["tuple"] == (1, (2, "x")) and type(out["tuple"][1]) is tuple
    assert out["slice"] == slice(1, None, 2) and out["ellipsis"] is Ellipsis
    assert out["complex"] == 1 - 2j
    assert out["dtype"] is torch.bfloat16 and out["device"] == torch.device("cpu")
    assert tuple(out["size"]) == (2, 3)
    assert out["const"] is torch.contiguous_format
    assert out["set"] == {1, 2, 3}
    assert out["ref"] == ObjRef(42)
    assert out["bytes"] == b"\x00\xff"
    ref = PointerRef("bob", None, 1, 2, (3,), "float32", True)
    assert rt(ref) == ref


@pytest.mark.parametrize(
    "value",
    [
        torch.zeros(3).to_sparse(),
        torch.empty(2, device="meta"),
        lambda x: x,
        object(),
        type,
    ],
)
def test_values_that_cannot_travel_raise_encode_error(value) -> None:
    with pytest.raises(fedws.EncodeError):
        encode(value)
    assert issubclass(fedws.EncodeError, fedws.FedwsError)


# -- property tests ---------------------------------------------------------------------------

_HYP_DTYPES = [DTYPES[n] for n in ("float32", "float64", "float16", "bfloat16", "int8", "uint8",
                                    "int32", "int64", "bool", "complex64", "uint16", "uint64")]
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(_HYP_DTYPES), shape=shapes, seed=st.integers(0, 2**31),
       transpose=st.booleans())
def test_property_tensor_round_trip(dtype, shape, seed, transpose) -> None:
    t = random_tensor(dtype, shape, seed)
    if transpose and t.dim() >= 2:
        t = t.transpose(0, -1)
    out = rt(t)
    assert out.shape == t.shape and out.dtype == t.dtype
    assert raw_bytes(out) == raw_bytes(t)


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4)
    | st.tuples(children, children),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_like)
def test_property_plain_values_round_trip(value) -> None:
    assert rt(value) == value


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_property_random_bytes_never_crash(data: bytes) -> None:
    try:
        decode(data)
    except fedws.DecodeError:
        pass
    try:
        list(iter_blobs(data))
    except fedws.DecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_property_corrupted_blobs_raise_decode_error_or_decode(data) -> None:
    blob = bytearray(encode_bytes([int(Kind.CMD), 7, "torch.add", [ObjRef(1), torch.arange(6.0)], {}, [9]]))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    try:
        decode(bytes(blob))
    except fedws.DecodeError:
        pass


# -- malformed input ---------------------------------------------------------------------------


def test_every_truncation_is_a_decode_error() -> None:
    blob = encode_bytes([1, 2, torch.arange(5.0), {"a": (1, 2)}])
    for cut in range(len(blob)):
        with pytest.raises(fedws.DecodeError):
            decode(blob[:cut])
    with pytest.raises(fedws.DecodeError):
        decode(blob + b"\0")
    with pytest.raises(fedws.DecodeError):
        list(iter_blobs(blob + blob[:5]))
    with pytest.raises(fedws.DecodeError):
        list(iter_blobs(b""))


def _blob_with_tensor_header(header: list, payload: bytes) -> bytes:
    env = msgpack.packb(msgpack.ExtType(codec.EXT_TENSOR, msgpack.packb(header, use_bin_type=True)),
                        use_bin_type=True)
    return codec._HEAD.pack(len(env), 0, len(payload)) + env + payload


@pytest.mark.parametrize(
    "header,payload",
    [
        (["float32", [3], False, 0, 8, None], b"\0" * 8),  # 3 floats need 12 bytes
        (["float32", [3], False, 0, 12, None], b"\0" * 8),  # claims more than it carries
        (["float32", [2], False, 4, 8, None], b"\0" * 8),  # bytes lie past the end
        (["float32", [2], False, -4, 8, None], b"\0" * 8),  # negative offset
        (["float32", [-1, -2], False, 0, 8, None], b"\0" * 8),  # negative sizes
        (["float99", [2], False, 0, 8, None], b"\0" * 8),  # unknown dtype
        (["int64", [1], True, 0, 8, None], b"\0" * 8),  # integers cannot require grad
        (["float32", [2], True, 0, 8, "notatensor"], b"\0" * 8),  # bad grad
        (["float32", [2], False, 0], b"\0" * 8),  # short header
        ("garbage", b""),
        (["float32", [2**40, 2**40], False, 0, 0, None], b""),  # overflowing shape
        (["float32", ["x"], False, 0, 4, None], b"\0" * 4),
    ],
)
def test_tensor_header_that_does_not_match_its_bytes(header, payload) -> None:
    with pytest.raises(fedws.DecodeError):
        decode(_blob_with_tensor_header(header, payload))


def test_grad_of_wrong_shape_is_refused() -> None:
    t = torch.tensor([1.0, 2.0], requires_grad=True)
    t.grad = torch.ones(2)
    blob = encode_bytes(t)
    good = decode(blob)
    assert good.grad.tolist() == [1.0, 1.0]
    bad = _blob_with_tensor_header(
        ["float32", [2], True, 0, 8, msgpack.ExtType(codec.EXT_TENSOR, msgpack.packb(
            ["float32", [1], False, 0, 4, None]))],
        b"\0" * 8,
    )
    with pytest.raises(fedws.DecodeError):
        decode(bad)


@pytest.mark.parametrize(
    "ext,data",
    [
        (codec.EXT_DTYPE, b"not_a_dtype"),
        (codec.EXT_CONST, b"os.system"),
        (codec.EXT_DEVICE, b"\xff\xfe"),
        (codec.EXT_DEVICE, b"quantum:7"),
        (codec.EXT_COMPLEX, b"\0"),
        (99, b""),
        (codec.EXT_POINTER, msgpack.packb(["bob", None, 1, 2, None, "nope", False])),
        (codec.EXT_POINTER, msgpack.packb([1])),
        (codec.EXT_SLICE, msgpack.packb([1, 2, 3, 4])),
    ],
)
def test_bad_ext_values_are_decode_errors(ext: int, data: bytes) -> None:
    env = msgpack.packb(msgpack.ExtType(ext, data))
    with pytest.raises(fedws.DecodeError):
        decode(codec._HEAD.pack(len(env), 0, 0) + env)


def test_decode_never_evaluates_names() -> None:
    env = msgpack.packb(["__import__('os').system('true')", {"__reduce__": "os.system"}])
    out = decode(codec._HEAD.pack(len(env), 0, 0) + env)
    assert out == ["__import__('os').system('true')", {"__reduce__": "os.system"}]


# -- the node keeps serving ----------------------------------------------------------------------


def _reply(node: Node, frame: bytes) -> list:
    return decode(b"".join(node.handle(frame)))


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00",
        random.Random(64).randbytes(64),  # seeded: every xdist worker collects the same ids
        b"\xff" * 12,
        encode_bytes("not a request"),
        encode_bytes([]),
        encode_bytes([999, 1]),
        encode_bytes([int(Kind.CMD), "seq"]),
        encode_bytes([int(Kind.CMD), True, "torch.add", [], {}, []]),
        encode_bytes({"kind": 1}),
        encode_bytes([[1], 1]),
        encode_bytes([int(Kind.STORE), 1]),
        encode_bytes([int(Kind.CMD), 1, "torch.add", "notalist", 5, None]),
        encode_bytes([int(Kind.GET), 1, "x", True]),
        encode_bytes([int(Kind.INFO), 1, "secrets"]),
        encode_bytes([int(Kind.DELETE), 1, 5]),
        _blob_with_tensor_header(["float32", [3], False, 0, 8, None], b"\0" * 8),
    ],
)
def test_node_answers_garbage_with_an_error_and_keeps_serving(garbage: bytes) -> None:
    node = Node("bob")
    node.handle(encode_bytes([int(Kind.STORE), 1, 10, torch.tensor([1.0, 2.0]), [], None]))
    watermark, values, errors = _reply(node, garbage)
    assert values == []
    assert errors, "garbage must be answered with an error entry"
    for seq, err, _ids in errors:
        assert isinstance(seq, int)
        assert err["worker"] == "bob" and err["message"]
    # still serving, store untouched
    frame = encode_bytes([int(Kind.GET), 2, 10, False]) + encode_bytes([int(Kind.INFO), 3, "count"])
    watermark, values, errors = _reply(node, frame)
    assert errors == [] and watermark == 3
    assert values[0][1].tolist() == [1.0, 2.0] and values[1] == [3, 1]


def test_undecodable_request_does_not_stop_the_rest_of_its_frame() -> None:
    node = Node("bob")
    good = encode_bytes([int(Kind.STORE), 1, 10, torch.tensor([1.0]), [], None])
    bad = _blob_with_tensor_header(["float32", [3], False, 0, 8, None], b"\0" * 8)
    count = encode_bytes([int(Kind.INFO), 2, "count"])
    watermark, values, errors = _reply(node, good + bad + count)
    assert [e[0] for e in errors] == [FRAME_ERROR_SEQ]
    assert errors[0][1]["code"] == "DecodeError"
    assert values == [[2, 1]] and watermark == 2


def test_peek_kinds_reads_request_kinds_without_decoding() -> None:
    from fedws.protocol.messages import Kind

    frame = b"".join(
        [
            codec.encode_bytes([int(Kind.PING), 1]),
            codec.encode_bytes([int(Kind.CMD), 2, "torch.add", [codec.ObjRef(5), 1], {}, [6]]),
            codec.encode_bytes([int(Kind.STORE), 3, 7, torch.ones(100_000), [], None]),
        ]
    )
    assert codec.peek_kinds(frame) == [Kind.PING, Kind.CMD, Kind.STORE]
    assert codec.peek_kinds(b"\x00garbage") is None
    assert codec.peek_kinds(codec.encode_bytes({"not": "a request"})) is None
