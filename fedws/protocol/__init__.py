"""The wire protocol, free of I/O: codec, messages, ids, errors and the op allowlist."""

from .codec import ObjRef, PointerRef, decode, encode, encode_bytes, iter_blobs
from .ids import new_id
from .messages import FRAME_ERROR_SEQ, Kind

__all__ = [
    "ObjRef",
    "PointerRef",
    "decode",
    "encode",
    "encode_bytes",
    "iter_blobs",
    "new_id",
    "Kind",
    "FRAME_ERROR_SEQ",
]
