"""Pointers: what a user holds for data that lives on a worker.

A :class:`PointerTensor` is a ``torch.Tensor`` subclass with no data of its own: a
meta-device shell carrying the remote object's shape and dtype plus ``(location,
id_at_location)``. Every torch call on it becomes a command; result ids are drawn before
anything is sent, so the result pointer exists at once, and ``await ptr`` (or
``ptr.wait()``) says when the node has made it.

One job per module:

- :mod:`.tensor` — the pointer object: state, ``get``/``send``/``move``, wire encoding,
  module parameters as pointers;
- :mod:`.result` — :class:`RemoteResult`, what pointers and pointer plans share
  (``future``/``wait``/``await``);
- :mod:`.dispatch` — the torch calls answered locally or specially;
- :mod:`.commands` — building a command: arguments to refs, result ids, result pointers;
- :mod:`.meta` — result specs, meta-tensor inference and its cache;
- :mod:`.ownership` — deleting the remote object when the last owner dies;
- :mod:`.multi` — :class:`MultiPointerTensor`.
"""

from . import dispatch  # noqa: F401  (importing it installs what a torch call on a pointer does)
from .commands import remote_call, take_result_ids
from .meta import NONE, UNKNOWN, ResultSpec, SeqSpec, Signature, TensorSpec
from .multi import MultiPointerTensor
from .ownership import Ownership
from .result import RemoteResult
from .tensor import (
    PointerParameter,
    PointerTensor,
    make_pointer,
    parameter_to_pointer,
    pointer_from_description,
    pointer_to_parameter,
)

__all__ = [
    "PointerTensor",
    "PointerParameter",
    "MultiPointerTensor",
    "RemoteResult",
    "Ownership",
    "Signature",
    "ResultSpec",
    "TensorSpec",
    "SeqSpec",
    "NONE",
    "UNKNOWN",
    "make_pointer",
    "pointer_from_description",
    "parameter_to_pointer",
    "pointer_to_parameter",
    "remote_call",
    "take_result_ids",
]
