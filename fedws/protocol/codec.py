"""The msgpack codec: values to bytes and back, with tensors as raw buffers.

A *blob* is one encoded value::

    u32 env_len | u32 pad | u64 buf_len | env (msgpack) | pad zeros | tensor buffers

The msgpack envelope holds everything except tensor bytes; a tensor is an ext value whose
small header (dtype, shape, requires_grad, offset, nbytes, grad) points into the raw region.
The padding puts the raw region, and each tensor in it, on a 64-byte boundary of the blob.
Encoding hands the tensor's memory to the transport as a memoryview (no copy). Decoding a
blob held in writable memory (the transports assemble frames into a bytearray) gives large
tensors as views of that memory, aligned for their dtype: no copy on receipt either; small
tensors, read-only input and misaligned data are copied once. A *frame* is a sequence of
blobs.

Nothing decoded is ever executed: refs, pointers and constants decode to inert data
classes, and the only names resolved are dtypes and a fixed set of torch constants.

Every byte is hostile, so decoding is bounded before it recurses or allocates:

- ext values nest at most :data:`MAX_EXT_DEPTH` levels. Each level is one more
  ``msgpack.unpackb`` call whose C context (~40 KiB) lives on the C stack, so an unbounded
  nesting overflowed it (a 955-byte frame nesting 200 levels killed the node). Plain arrays
  and maps inside one level are bounded by msgpack itself (``StackError`` at 1024 levels,
  kept on the heap).
- nested ext payloads are copied once per level; their total is capped at
  :data:`EXT_COPY_FACTOR` times the envelope (plus 64 KiB), so nesting cannot amplify memory.
- every container length msgpack reads is capped by the bytes it was read from, so a tiny
  blob cannot declare a 2**32-element array and have it preallocated.
- a tensor header is checked (dtype, shape, ndim, sizes, byte count, bounds) before any
  tensor is built, and a tensor is only ever built from bytes the blob really carries.
- a frame holds at most :data:`MAX_BLOBS` blobs, and every blob length is checked against
  the real buffer before it is sliced.

Whatever goes wrong, :func:`decode` and :func:`iter_blobs` raise :class:`DecodeError`
and nothing else.
"""

from __future__ import annotations

import ctypes
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from ..exceptions import DecodeError, EncodeError

__all__ = [
    "ObjRef",
    "PointerRef",
    "encode",
    "encode_bytes",
    "encode_plain",
    "decode",
    "iter_blobs",
    "DTYPES",
    "DTYPE_NAMES",
    "DECODABLE_DTYPES",
    "MAX_EXT_DEPTH",
    "MAX_BLOBS",
    "MAX_NDIM",
    "EXT_COPY_FACTOR",
]

_HEAD = struct.Struct("<IIQ")
_REF = struct.Struct("<q")
_ALIGN = 64
# Tensors at least this large are decoded as views of the received buffer (no copy).
VIEW_MIN_BYTES = 1 << 16
_ZEROS = bytes(_ALIGN)
HEAD_SIZE = _HEAD.size

# Nesting of ext values (tuples, tensor headers, slices, sets, pointers) in one blob. Real
# values nest a few levels; each level costs ~40 KiB of C stack (msgpack's unpack context),
# so 32 levels stay under 1.5 MiB, well inside the smallest thread stacks we run on (2 MiB).
MAX_EXT_DEPTH = 32
# Bytes of nested ext payloads one blob may re-read, as a multiple of its envelope (+64 KiB).
EXT_COPY_FACTOR = 8
# Blobs in one frame. A blob costs ~20 bytes on the wire but a decode and possibly an error
# entry in the reply; 100k is far above what batching produces (a few thousand commands).
MAX_BLOBS = 100_000
# Dimensions of a tensor (torch's own limit for most kernels is 64 as well).
MAX_NDIM = 64
_MAX_NUMEL = (1 << 63) - 1

EXT_TENSOR = 1
EXT_TUPLE = 2
EXT_REF = 3
EXT_POINTER = 4
EXT_DTYPE = 5
EXT_SLICE = 6
EXT_ELLIPSIS = 7
EXT_COMPLEX = 8
EXT_DEVICE = 9
EXT_CONST = 10
EXT_SET = 11

# Every dtype torch has, by its public name ("float32", "bfloat16", "bool", ...).
DTYPES: dict[str, torch.dtype] = {}
for _name in dir(torch):
    _val = getattr(torch, _name, None)
    if isinstance(_val, torch.dtype):
        DTYPES.setdefault(str(_val).removeprefix("torch."), _val)
DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}
# Dtypes a peer may name. Quantized dtypes are not among them: a tensor of one has no
# quantizer unless torch built it as quantized, and kernels that expect one assert or crash
# (``ones(2).view(torch.quint8)`` then ``q_scale``); no fedws op needs them.
_QUANTIZED = {"qint8", "quint8", "qint32", "quint4x2", "quint2x4"}
DECODABLE_DTYPES: dict[str, torch.dtype] = {n: d for n, d in DTYPES.items() if n not in _QUANTIZED}

# Non-tensor torch constants that appear as op arguments.
_CONSTS: dict[str, Any] = {
    name: getattr(torch, name)
    for name in (
        "preserve_format",
        "contiguous_format",
        "channels_last",
        "channels_last_3d",
        "strided",  # the only layout a peer may name: no sparse tensor is ever built
    )
    if hasattr(torch, name)
}
_CONST_NAMES = {id(v): k for k, v in _CONSTS.items()}


@dataclass(frozen=True, slots=True)
class ObjRef:
    """'The object you store under ``id``' — how commands name their arguments."""

    id: int


@dataclass(slots=True)
class PointerRef:
    """A pointer travelling as a value (a pointer chain, or a pointer handed back by get)."""

    location: str
    address: str | None
    id_at_location: int
    id: int
    shape: tuple[int, ...] | None
    dtype: str
    requires_grad: bool


class _Packers(threading.local):
    """Reusable msgpack Packers of this thread, one per nesting level.

    ``msgpack.packb`` builds a Packer per call, a good part of a small command's cost; and
    ``default`` packs tuples and tensor headers while the outer pack is running, so each
    level needs its own Packer.
    """

    def __init__(self) -> None:
        self.levels: list[msgpack.Packer] = []
        self.depth = 0
        self.encoder: _Encoder | None = None


_packers = _Packers()


def _default(obj: Any) -> Any:
    encoder = _packers.encoder
    assert encoder is not None
    return encoder.default(obj)


class _Encoder:
    __slots__ = ("buffers", "offset")

    def __init__(self) -> None:
        self.buffers: list[bytes | memoryview] = []
        self.offset = 0

    def pack(self, obj: Any) -> bytes:
        state = _packers
        depth = state.depth
        if depth == len(state.levels):
            state.levels.append(
                msgpack.Packer(default=_default, strict_types=True, use_bin_type=True, autoreset=True)
            )
        packer = state.levels[depth]
        state.depth = depth + 1
        try:
            return packer.pack(obj)  # type: ignore[no-any-return]
        except BaseException:
            packer.reset()
            raise
        finally:
            state.depth = depth

    def default(self, obj: Any) -> Any:
        to_wire = getattr(type(obj), "__fedws_encode__", None)
        if to_wire is not None:  # pointers (and other fedws values) describe themselves
            obj = to_wire(obj)
        if isinstance(obj, torch.Tensor):
            return msgpack.ExtType(EXT_TENSOR, self.pack(self.tensor_header(obj)))
        if isinstance(obj, tuple):  # includes torch.Size and named tuples
            return msgpack.ExtType(EXT_TUPLE, self.pack(list(obj)))
        if type(obj) is ObjRef:  # the commonest ext: 8 raw bytes, no nested msgpack
            return msgpack.ExtType(EXT_REF, _REF.pack(obj.id))
        if isinstance(obj, PointerRef):
            return msgpack.ExtType(
                EXT_POINTER,
                self.pack(
                    [
                        obj.location,
                        obj.address,
                        obj.id_at_location,
                        obj.id,
                        None if obj.shape is None else list(obj.shape),
                        obj.dtype,
                        obj.requires_grad,
                    ]
                ),
            )
        if isinstance(obj, torch.dtype):
            return msgpack.ExtType(EXT_DTYPE, DTYPE_NAMES[obj].encode())
        if isinstance(obj, slice):
            return msgpack.ExtType(EXT_SLICE, self.pack([obj.start, obj.stop, obj.step]))
        if obj is Ellipsis:
            return msgpack.ExtType(EXT_ELLIPSIS, b"")
        if isinstance(obj, complex):
            return msgpack.ExtType(EXT_COMPLEX, struct.pack("<dd", obj.real, obj.imag))
        if isinstance(obj, torch.device):
            return msgpack.ExtType(EXT_DEVICE, str(obj).encode())
        if isinstance(obj, (set, frozenset)):
            return msgpack.ExtType(EXT_SET, self.pack(sorted(obj, key=repr)))
        if isinstance(obj, bool):  # numpy/other bool-likes are not exact bools
            return bool(obj)
        if isinstance(obj, int):  # IntEnum, numpy ints via __index__
            return int(obj)
        if isinstance(obj, float):
            return float(obj)
        if isinstance(obj, str):
            return str(obj)
        if isinstance(obj, list):
            return list(obj)
        if isinstance(obj, dict):
            return dict(obj)
        const = _CONST_NAMES.get(id(obj))
        if const is not None:
            return msgpack.ExtType(EXT_CONST, const.encode())
        raise EncodeError(f"cannot send a value of type {type(obj).__qualname__}: {obj!r:.80}")

    def tensor_header(self, t: torch.Tensor) -> list[Any]:
        if t.layout != torch.strided or t.is_quantized:
            raise EncodeError(f"cannot send a {t.layout} tensor; only dense tensors travel")
        if t.device.type == "meta":
            raise EncodeError("cannot send a meta tensor: it has no data")
        grad = t.grad if (t.is_leaf and t.requires_grad) else None
        data = t.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        data = data.resolve_conj().resolve_neg().contiguous()
        nbytes = data.numel() * data.element_size()
        gap = (-self.offset) % _ALIGN
        if gap and nbytes:
            self.buffers.append(memoryview(_ZEROS[:gap]))
            self.offset += gap
        offset = self.offset
        if nbytes:
            if nbytes < VIEW_MIN_BYTES:
                # Small: one C call copies the bytes (a snapshot, and far cheaper than numpy).
                self.buffers.append(ctypes.string_at(data.data_ptr(), nbytes))
            else:
                raw = data.reshape(-1).view(torch.uint8).numpy()  # numpy only to borrow the buffer
                # ndarray exports the buffer protocol; numpy's stubs do not declare it a Buffer
                self.buffers.append(memoryview(raw).cast("B"))  # type: ignore[arg-type]
            self.offset += nbytes
        return [
            DTYPE_NAMES[data.dtype],
            list(data.shape),
            bool(t.requires_grad),
            offset,
            nbytes,
            grad,
        ]


def encode(obj: Any) -> list[bytes | memoryview]:
    """Encode ``obj`` as the chunks of one blob; tensor bytes are borrowed, not copied."""
    enc = _Encoder()
    outer, _packers.encoder = _packers.encoder, enc
    try:
        env = enc.pack(obj)
    except EncodeError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot encode value: {exc}") from exc
    finally:
        _packers.encoder = outer
    if not enc.buffers:
        return [_HEAD.pack(len(env), 0, 0), env]
    pad = (-(HEAD_SIZE + len(env))) % _ALIGN
    return [_HEAD.pack(len(env), pad, enc.offset), env, _ZEROS[:pad], *enc.buffers]


def encode_bytes(obj: Any) -> bytes:
    """Encode ``obj`` as one ``bytes`` blob (copies tensor data: a snapshot)."""
    blob = encode_plain(obj)
    return blob if blob is not None else b"".join(encode(obj))


class _NotPlain(Exception):
    """``encode_plain`` met a value it leaves to :func:`encode` (a tensor, a tuple, ...)."""


_new_tuple = tuple.__new__
_ExtType = msgpack.ExtType


def _plain_default(obj: Any) -> Any:
    if type(obj) is ObjRef:  # ExtType's own __new__ is Python: build the named tuple directly
        return _new_tuple(_ExtType, (EXT_REF, _REF.pack(obj.id)))
    raise _NotPlain  # a fresh one: a kept traceback would hold ``obj`` alive


class _PlainPacker(threading.local):
    def __init__(self) -> None:
        self.packer = msgpack.Packer(default=_plain_default, strict_types=True, use_bin_type=True, autoreset=True)
        self.busy = False


_plain = _PlainPacker()


def encode_plain(obj: Any) -> bytes | None:
    """``obj`` as one blob in one msgpack call, or None if it holds more than plain values.

    Plain: what msgpack packs natively, plus ObjRefs — a command on pointers. The bytes are
    those :func:`encode` gives (same Packer options, same ext for an ObjRef); anything else
    (a tensor, a tuple, a dtype, ...) returns None, and the caller takes the general path.
    This is the per-op path of the coordinator: no encoder object, no per-value dispatch.
    """
    state = _plain
    if state.busy:  # re-entered on this thread (a __del__ during a pack): take the general path
        return None
    state.busy = True
    packer = state.packer
    try:
        env = packer.pack(obj)
    except _NotPlain:
        packer.reset()
        return None
    except (TypeError, ValueError, OverflowError) as exc:
        packer.reset()
        raise EncodeError(f"cannot encode value: {exc}") from exc
    finally:
        state.busy = False
    return _HEAD.pack(len(env), 0, 0) + env  # type: ignore[no-any-return]


def iter_blobs(frame: bytes | bytearray | memoryview) -> Iterator[memoryview]:
    """Split a frame into its blobs; raise DecodeError on a truncated or corrupt frame."""
    try:
        mv = memoryview(frame).cast("B")
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"frame is not a byte buffer: {exc}") from exc
    pos, end = 0, len(mv)
    if end == 0:
        raise DecodeError("empty frame")
    count = 0
    while pos < end:
        if count >= MAX_BLOBS:
            raise DecodeError(f"frame holds more than {MAX_BLOBS} blobs")
        if end - pos < HEAD_SIZE:
            raise DecodeError(f"truncated blob header at byte {pos}")
        env_len, pad, buf_len = _HEAD.unpack_from(mv, pos)
        if pad >= _ALIGN:
            raise DecodeError(f"blob at byte {pos} has padding {pad} (at most {_ALIGN - 1})")
        size = HEAD_SIZE + env_len + pad + buf_len  # Python ints: no overflow
        if size > end - pos:
            raise DecodeError(
                f"blob at byte {pos} claims {size} bytes but only {end - pos} remain"
            )
        yield mv[pos : pos + size]
        pos += size
        count += 1


def peek_kinds(frame: bytes | bytearray | memoryview) -> list[int] | None:
    """The request kinds of a frame, read from each blob's first bytes without decoding.

    None when a blob does not start the usual way (then decode it to find out).
    """
    kinds = []
    mv = memoryview(frame).cast("B")
    try:
        for blob in iter_blobs(mv):
            head = blob[HEAD_SIZE]
            kind = blob[HEAD_SIZE + 1]
            if not (0x90 <= head <= 0x9F and kind < 0x80):  # fixarray, then a positive fixint
                return None
            kinds.append(kind)
    except (DecodeError, IndexError):
        return None
    return kinds


PointerFactory = Callable[[PointerRef], Any]


def decode(blob: bytes | bytearray | memoryview, pointer_factory: PointerFactory | None = None) -> Any:
    """Decode one blob. ``pointer_factory`` turns PointerRefs into live pointers.

    Raises:
        DecodeError: the bytes are not a valid blob (whatever is wrong with them: bad
            lengths, garbage msgpack, too deep, a lying tensor header); nothing was
            partially applied.
    """
    try:
        mv = memoryview(blob).cast("B")
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"blob is not a byte buffer: {exc}") from exc
    if len(mv) < HEAD_SIZE:
        raise DecodeError("blob shorter than its header")
    env_len, pad, buf_len = _HEAD.unpack_from(mv, 0)
    if pad >= _ALIGN:
        raise DecodeError(f"blob padding {pad} is not below {_ALIGN}")
    base = HEAD_SIZE + env_len + pad
    if base + buf_len != len(mv):
        raise DecodeError(f"blob length {len(mv)} does not match its header ({base + buf_len})")
    env_end = HEAD_SIZE + env_len
    # Nested ext levels: a counter, not a wrapper per value (this is the hot path).
    depth = 0
    copy_budget = EXT_COPY_FACTOR * env_len + (1 << 16)

    def ext_hook(code: int, data: bytes) -> Any:
        if code == EXT_REF:  # the commonest ext first
            if len(data) != 8:
                raise DecodeError("object ref must be 8 bytes")
            return ObjRef(_REF.unpack(data)[0])
        if code == EXT_TENSOR:
            return _tensor(unpack(data), mv, base, buf_len)
        if code == EXT_TUPLE:
            return tuple(unpack(data))
        if code == EXT_POINTER:
            return _pointer(unpack(data), pointer_factory)
        if code == EXT_DTYPE:
            name = data.decode()
            if name not in DECODABLE_DTYPES:
                raise DecodeError(f"unknown dtype {name!r:.80}")
            return DECODABLE_DTYPES[name]
        if code == EXT_SLICE:
            return slice(*unpack(data))
        if code == EXT_ELLIPSIS:
            return Ellipsis
        if code == EXT_COMPLEX:
            if len(data) != 16:
                raise DecodeError("a complex must be 16 bytes")
            return complex(*struct.unpack("<dd", data))
        if code == EXT_DEVICE:
            return torch.device(data.decode())
        if code == EXT_CONST:
            name = data.decode()
            if name not in _CONSTS:
                raise DecodeError(f"unknown constant {name!r:.80}")
            return _CONSTS[name]
        if code == EXT_SET:
            return set(unpack(data))
        raise DecodeError(f"unknown ext type {code}")

    def unpack(data: bytes | memoryview) -> Any:
        nonlocal depth, copy_budget
        if depth:  # a nested ext payload: a fresh C context on the stack, and a copy
            if depth > MAX_EXT_DEPTH:
                raise DecodeError(f"value nests deeper than {MAX_EXT_DEPTH} ext levels")
            copy_budget -= len(data)
            if copy_budget < 0:
                raise DecodeError("nested values re-read too many bytes")
        depth += 1
        # unpackb caps every length it reads (str, bin, array, map, ext) by ``len(data)``,
        # so a container header cannot make it preallocate more than the bytes could fill;
        # passing the same limits explicitly costs ~10% of a small command's decode, and
        # tests/protocol/test_decode_limits.py fails if a msgpack release drops the default.
        value = msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
        depth -= 1
        return value

    try:
        return unpack(mv[HEAD_SIZE:env_end])
    except DecodeError:
        raise
    except Exception as exc:  # msgpack and torch raise several unrelated types on garbage
        raise DecodeError(f"malformed message: {type(exc).__name__}: {str(exc)[:200]}") from exc
    finally:
        # ext_hook and unpack refer to each other (and to the frame): a reference cycle that
        # kept every decoded frame alive until the next gc run (48 MiB frames held 1 GB).
        ext_hook = unpack = None  # type: ignore[assignment]


def _pointer(fields: Any, pointer_factory: PointerFactory | None) -> Any:
    try:
        loc, addr, id_at, pid, shape, dtype, rg = fields
    except (TypeError, ValueError) as exc:
        raise DecodeError("a pointer must carry 7 fields") from exc
    if not (
        type(loc) is str
        and (addr is None or type(addr) is str)
        and type(id_at) is int
        and type(pid) is int
        and type(dtype) is str
        and type(rg) is bool
    ):
        raise DecodeError("bad pointer fields")
    if dtype not in DECODABLE_DTYPES:
        raise DecodeError(f"unknown dtype {dtype!r:.80}")
    if shape is not None:
        shape = tuple(_check_shape(shape))
    ref = PointerRef(loc, addr, id_at, pid, shape, dtype, rg)
    return pointer_factory(ref) if pointer_factory is not None else ref


def _check_shape(shape: Any) -> list[int]:
    """``shape`` as a list of sizes, or DecodeError: ints >= 0, ndim <= 64, no overflow."""
    if type(shape) is not list:
        raise DecodeError("a shape must be an array")
    if len(shape) > MAX_NDIM:
        raise DecodeError(f"a shape has more than {MAX_NDIM} dimensions")
    span = 1  # product of the nonzero sizes: what torch's strides must hold
    for s in shape:
        if type(s) is not int or s < 0:
            raise DecodeError(f"bad size in tensor shape: {s!r:.40}")
        if s:
            span *= s
            if span > _MAX_NUMEL:
                raise DecodeError("tensor shape overflows 64 bits")
    return shape


def _tensor(header: Any, mv: memoryview, base: int, buf_len: int) -> torch.Tensor:
    # Everything is checked before anything is allocated; only bytes the blob carries are
    # ever turned into a tensor (the header's numbers alone never size an allocation).
    try:
        dtype_name, shape, requires_grad, offset, nbytes, grad = header
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"bad tensor header {header!r:.120}") from exc
    dtype = DECODABLE_DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        raise DecodeError(f"unknown dtype in tensor header: {dtype_name!r:.80}")
    shape = _check_shape(shape)
    if type(offset) is not int or type(nbytes) is not int or type(requires_grad) is not bool:
        raise DecodeError(f"bad tensor header {header!r:.120}")
    numel = 1
    for s in shape:
        numel *= s
    itemsize = dtype.itemsize
    if numel * itemsize != nbytes:
        raise DecodeError(
            f"tensor header says {dtype_name}{shape} ({numel * itemsize} bytes) but carries {nbytes}"
        )
    if offset < 0 or nbytes < 0 or offset + nbytes > buf_len:
        raise DecodeError("tensor bytes lie outside the blob")
    if grad is not None and not isinstance(grad, torch.Tensor):
        raise DecodeError("tensor grad must be a tensor")
    t: torch.Tensor | None  # None only until one of the branches below builds it
    if nbytes == 0:
        t = torch.empty(shape, dtype=dtype)  # no elements: nothing is allocated
    else:
        start = base + offset
        raw = mv[start : start + nbytes]
        if len(raw) != nbytes:  # cannot happen after the checks above; never trust it
            raise DecodeError("tensor bytes lie outside the blob")
        t = None
        if nbytes >= VIEW_MIN_BYTES and not mv.readonly:
            view = torch.frombuffer(raw, dtype=torch.uint8)  # shares the frame's memory
            if view.data_ptr() % itemsize == 0:
                t = view.view(dtype).reshape(shape)
        if t is None:  # one copy, into memory torch owns and may write
            try:
                t = torch.frombuffer(bytearray(raw), dtype=dtype)
            except (TypeError, RuntimeError, ValueError):  # dtypes frombuffer does not take
                t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype)
            if len(shape) != 1:
                t = t.reshape(shape)
    if requires_grad:
        if not (t.is_floating_point() or t.is_complex()):
            raise DecodeError(f"a {dtype_name} tensor cannot require grad")
        t.requires_grad_(True)
        if grad is not None:
            if grad.shape != t.shape or grad.dtype != t.dtype:
                raise DecodeError("tensor grad does not match its tensor")
            t.grad = grad
    return t
