"""The torch calls on pointers that are not plain remote commands.

Most torch calls on a pointer become a command (:func:`~.commands.remote_call`). This
module is the table of the exceptions, looked up first by :func:`torch_function`:

- metadata (shape, dtype, ``requires_grad``, ...) is answered from the local meta shell,
  after asking the node for the shape if it was unknown; so are the ``torch.*`` functions
  that only read metadata (``torch.is_complex(param)`` in every optimizer's step);
- ``ptr.to(device)`` ignores the ``meta`` device: it is where shells live, not a place;
- ``.grad`` reads and writes, ``.data =``, ``requires_grad =`` and ``backward()`` become
  the commands the node has for them;
- ``iter(ptr)`` unbinds remotely;
- calls that need the value itself (``bool``, ``item``, ``tolist``, ...) raise a
  PointerError naming ``get()``.

Importing this module installs :data:`LOCAL` and :func:`~.commands.remote_call` as what
PointerTensor does with a torch call (:func:`~.tensor.install_torch_function`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._C import DisableTorchFunctionSubclass

from ..exceptions import PointerError
from ..protocol.messages import Kind
from .commands import remote_call, scan_args, send_command
from .meta import TensorSpec
from .tensor import PointerTensor, install_torch_function, learn_shape

__all__ = ["Handler", "LOCAL", "torch_function"]

Handler = Callable[[Callable[..., Any], Sequence[Any], dict[str, Any]], Any]


def torch_function(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """What a torch call on a pointer does: a special case from :data:`LOCAL`, or a command.

    ``PointerTensor.__torch_function__`` inlines this lookup; this is the same, callable.
    """
    local = LOCAL.get(func)
    if local is not None:
        return local(func, args, kwargs)
    return remote_call(func, args, kwargs)


def _local(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    ptr = args[0]
    if isinstance(ptr, PointerTensor) and ptr.signature is None and func in _SHAPE_QUERIES:
        learn_shape(ptr)
    with DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def _none(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    return None


def _grad_get(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    sig = args[0].signature
    if not (sig and sig.requires_grad):
        return None
    return remote_call(func, args, kwargs, name="Tensor.grad", spec=TensorSpec(sig.shape, sig.dtype))


def _setter(op: str) -> Handler:
    def set_remote(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        _, wire_args, _ = scan_args(args[:2], {})
        send_command(args[0], op, wire_args, {})
        return None

    return set_remote


def _requires_grad_set(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    return remote_call(torch.Tensor.requires_grad_, (args[0], bool(args[1])), {})


def _backward(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    given = {k: v for k, v in kwargs.items() if v is not None and v is not False}
    _, wire_args, wire_kwargs = scan_args(args, given)
    ptr = args[0]
    ptr.seq, _ = ptr.location.submit(Kind.CMD, "Tensor.backward", wire_args, wire_kwargs, [])
    return None


def _iter(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    return iter(remote_call(torch.Tensor.unbind, (args[0], 0), {}))


def _is_shell_device(x: Any) -> bool:
    if isinstance(x, torch.device):
        return x.type == "meta"
    return isinstance(x, str) and x.partition(":")[0] == "meta"


def _to(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``ptr.to(other.device)``: the meta device is where pointer shells live, not a place.

    torch code moves tensors to a neighbour's device (``clip_grad_norm_`` stacks norms
    ``.to(first_device)``); for a pointer that device is the shell's ``meta``, which on the
    node would drop the data. A meta device argument is ignored; nothing left: no change.
    """
    rest = [a for a in args[1:] if not _is_shell_device(a)]
    kw = {k: v for k, v in kwargs.items() if not (k == "device" and _is_shell_device(v))}
    if len(rest) == len(args) - 1 and len(kw) == len(kwargs):
        return remote_call(func, args, kwargs)
    if not rest and not kw:
        return args[0]
    return remote_call(func, (args[0], *rest), kw)


def _data_dependent(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    name = getattr(func, "__name__", str(func))
    raise PointerError(
        f"{name} needs the value of {args[0]!r}, which lives on worker "
        f"{args[0].location.id!r}; call .get() first"
    )


_T: Any = torch.Tensor  # Any: the stubs type properties as values, not descriptors
_SHAPE_QUERIES = {
    _T.shape.__get__, _T.size, _T.dim, _T.ndim.__get__, _T.numel, _T.nelement,
    _T.__len__, _T.ndimension, _T.stride, torch.numel,
}
_METADATA = (
    "dtype", "requires_grad", "is_leaf", "device", "layout", "is_sparse", "is_quantized",
    "is_cuda", "is_cpu", "is_meta", "retains_grad", "output_nr", "_version", "is_mkldnn",
    "is_nested", "itemsize", "nbytes", "names",
)
_DATA_DEPENDENT = (
    _T.__bool__, _T.item, _T.tolist, _T.numpy, _T.__int__, _T.__float__, _T.__index__,
    _T.__complex__, _T.__array__, _T.__contains__, _T.__reversed__,
)

LOCAL: dict[Any, Handler] = {}
"""Torch callables (functions, methods, property getters/setters) handled here, not sent as-is."""

# torch.* functions that read only metadata (optimizers ask torch.is_complex(param)): answered
# from the shell like their Tensor-method twins, never sent as commands that return pointers.
_METADATA_FUNCTIONS = tuple(
    getattr(torch, n)
    for n in (
        "is_complex", "is_floating_point", "is_conj", "is_neg", "is_signed", "is_inference", "numel",
        "is_same_size", "result_type", "can_cast",
    )
    if hasattr(torch, n)
)

for _f in (
    *_SHAPE_QUERIES,
    *_METADATA_FUNCTIONS,
    _T.is_conj,
    _T.is_neg,
    *(getattr(_T, n).__get__ for n in _METADATA if hasattr(_T, n)), _T.element_size, _T.is_floating_point,
    _T.is_complex, _T.is_signed, _T.__hash__, _T.is_contiguous, _T._is_view, _T.get_device, _T.is_inference,
    _T.dim_order,
):
    LOCAL[_f] = _local
LOCAL[_T.grad_fn.__get__] = _none
LOCAL[_T.grad.__get__] = _grad_get
LOCAL[_T.grad.__set__] = _setter("fedws.set_grad")
LOCAL[_T.data.__set__] = _setter("fedws.set_data")
LOCAL[_T.requires_grad.__set__] = _requires_grad_set
LOCAL[_T.backward] = _backward
LOCAL[_T.__iter__] = _iter
for _f in (*_DATA_DEPENDENT, torch.is_nonzero):
    LOCAL[_f] = _data_dependent
LOCAL[_T.to] = _to

install_torch_function(LOCAL, remote_call)
