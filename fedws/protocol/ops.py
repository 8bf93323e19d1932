"""The allowlist: which torch callables a command may name, and under what name.

The table is built once from torch's public functions (``torch``, ``torch.nn.functional``,
``torch.linalg``, ``torch.special``, ``torch.fft``) and ``torch.Tensor``'s methods and
properties. Both ends build it from their own torch, so an op name is just a string on the
wire and a node only ever calls what this table maps it to. Whatever reaches files,
processes, the network, storage sharing or process-wide state is left out (see ``DENIED``
and ``_denied``), and a test walks the table to prove it.

Memory safety is the other half: every op in the table must be safe on any arguments a
peer can send. Sparse layouts (kernels trust their indices), quantized and packed tensors
(opaque bytes, addresses inside), MKL-DNN/cuDNN/MIOpen internals and uninitialized memory
are out. Ops that index (``index_put_``, ``take``, ``gather``, ``as_strided`` ...) stay:
torch checks every index and stride against the storage, and tests prove it for each.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "OPS", "op_name", "resolve", "is_inplace", "FEDWS_OPS", "DENIED", "DENIED_PREFIXES", "DENIED_MODULES",
    "DENIED_WORDS", "FOREACH_PREFIX",
]

# Never allowed, whatever namespace they are found in.
DENIED: frozenset[str] = frozenset(
    {
        # files, serialization, foreign memory
        "save", "load", "from_file", "frombuffer", "from_numpy", "from_dlpack", "asarray",
        "hub", "numpy", "to_dlpack", "__reduce__", "__reduce_ex__", "__setstate__",
        "__getstate__", "__deepcopy__", "__array__", "__array_wrap__", "__dlpack__",
        "__dlpack_device__",
        # storage aliasing and raw memory
        "storage", "untyped_storage", "_typed_storage", "share_memory_", "is_shared",
        "data_ptr", "set_", "storage_offset", "pin_memory", "is_pinned", "record_stream",
        # callables as arguments (cannot travel, and would be code)
        "apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook",
        # process-wide state
        "manual_seed", "seed", "initial_seed", "compile", "vmap", "cond", "while_loop",
        "use_deterministic_algorithms", "are_deterministic_algorithms_enabled",
        "is_grad_enabled", "is_inference_mode_enabled", "no_grad", "enable_grad",
        "inference_mode", "autocast", "typename", "is_storage", "__torch_function__",
        "__torch_dispatch__", "__class__", "__init__", "__new__", "__del__",
        "__init_subclass__", "__subclasshook__", "__getattribute__", "__setattr__",
        "__delattr__", "__dir__", "__sizeof__", "__format__", "__repr__", "__str__",
        "__hash__", "__bool__", "__iter__", "__len__", "__contains__", "__reversed__",
        "__index__", "__int__", "__float__", "__complex__", "__long__", "__nonzero__",
        "tolist", "item",
        # uninitialized memory: it may hold another coordinator's data, so it never leaves
        "empty", "empty_like", "empty_strided", "empty_permuted", "new_empty",
        "new_empty_strided", "new", "resize", "resize_", "resize_as_", "sparse_resize_",
        "sparse_resize_and_clear_", "resize_as", "resize_as_sparse_",
        # addresses, classes and process state, read or written
        "const_data_ptr", "mutable_data_ptr", "as_subclass", "module_load", "storage_type",
        "reinforce", "classproperty", "prepare_multiprocessing_environment",
        "thread_safe_generator", "compiled_with_cxx11_abi", "autocast_increment_nesting",
        "autocast_decrement_nesting", "clear_autocast_cache", "is_vulkan_available",
        "boolean_dispatch", "handle_torch_function", "assert_int_or_pair",
        # sparse layouts: a sparse tensor's indices are trusted by the kernels that use it, so
        # an out-of-range index (given to a constructor, or written through the aliases
        # indices()/values() return) wrote into other tensors' memory and segfaulted the
        # node. No sparse tensor can be built or taken apart: constructors, conversions and
        # the accessors of sparse internals are denied (and the codec decodes no sparse layout).
        "indices", "values", "crow_indices", "col_indices", "ccol_indices", "row_indices",
        "indices_copy", "values_copy", "crow_indices_copy", "col_indices_copy",
        "ccol_indices_copy", "row_indices_copy", "coalesce", "is_coalesced", "sparse_dim",
        "dense_dim", "to_dense", "smm", "hsmm", "dsmm", "spmm", "hspmm", "sspaddmm",
        "sparse_mask", "to_padded_tensor",
        # quantized and packed tensors: opaque structures whose bytes are not the values
        # (get() of a packed matrix returned 104 bytes of process memory with addresses)
        "dequantize", "int_repr",
    }
)
# Never allowed when the name contains one of these (sparse, quantized, packed, backend
# internals whose tensors are opaque). "quantile" is math, so "quant" alone is not a word here.
DENIED_WORDS: tuple[str, ...] = (
    "sparse", "quantiz", "_quant", "fbgemm", "packed", "_pack_", "mkldnn", "nnpack",
    "cudnn", "miopen", "xnnpack", "vulkan", "to_padded", "nested",
)
DENIED_PREFIXES: tuple[str, ...] = (
    "_", "set_", "get_", "use_", "cuda", "mps", "xpu", "backends", "autograd",
    "distributed", "multiprocessing", "profiler", "utils", "onnx", "export", "library",
    "ops", "classes", "compiler", "package", "testing", "jit", "fx", "sym_", "is_warn",
    "lobpcg", "default_generator", "random", "overrides", "nested", "quantiz", "fork",
    "wait", "import_ir", "unify", "merge_type", "parse_", "vitals", "has_", "init_num",
    "empty_quantized", "is_autocast", "is_anomaly", "is_deterministic", "autocast",
    "q_",  # q_scale, q_zero_point, q_per_channel_*: fields of quantized tensors
)
# Callables defined in these modules are helpers of torch's machinery, not math, whatever
# name they are re-exported under.
DENIED_MODULES: tuple[str, ...] = (
    "torch._utils", "torch._jit_internal", "torch.overrides", "torch.random",
    "torch.serialization", "torch.hub", "torch.storage", "torch.multiprocessing", "torch.jit",
    "torch.cuda", "torch.distributed", "torch._dynamo", "torch.compiler", "torch.backends",
    "torch.utils", "torch.autograd", "torch.package", "torch.onnx", "torch.export",
)
# Dunder methods of Tensor that are plain math or indexing.
_DUNDERS = frozenset(
    f"__{n}__"
    for n in (
        "add radd iadd sub rsub isub mul rmul imul truediv rtruediv itruediv div rdiv idiv "
        "floordiv rfloordiv ifloordiv mod rmod imod pow rpow ipow matmul rmatmul imatmul "
        "neg pos abs invert and rand iand or ror ior xor rxor ixor lshift rlshift ilshift "
        "rshift rrshift irshift eq ne lt le gt ge getitem setitem"
    ).split()
)
_TENSOR_PROPERTIES = ("grad", "data", "T", "mT", "H", "mH", "real", "imag")

FOREACH_PREFIX = "_foreach_"
"""The one private prefix the table takes: torch's multi-tensor math (see ``_build``)."""

# fedws's own node ops; the node implements them (they are names, not torch callables).
FEDWS_OPS: frozenset[str] = frozenset(
    {"fedws.set_grad", "fedws.set_data", "fedws.remote_get"}
)


def _denied(name: str) -> bool:
    if name in DENIED:
        return True
    if name.startswith("__"):
        return name not in _DUNDERS
    return name.startswith(DENIED_PREFIXES) or any(w in name for w in DENIED_WORDS)


def _lookup(by_func: dict[Any, str], fn: Any) -> str | None:
    try:
        return by_func.get(fn)
    except TypeError:
        return None


def _build() -> tuple[dict[str, Callable[..., Any]], dict[Any, str]]:
    by_name: dict[str, Callable[..., Any]] = {}
    by_func: dict[Any, str] = {}

    def add(name: str, fn: Any) -> None:
        by_name[name] = fn
        try:
            by_func.setdefault(fn, name)
        except TypeError:  # unhashable callable: reachable by name only
            pass

    for prefix, module in (
        ("torch.nn.functional", F),
        ("torch.linalg", torch.linalg),
        ("torch.special", torch.special),
        ("torch.fft", torch.fft),
        ("torch", torch),
    ):
        # Iterate the narrower modules first so F.linear is named torch.nn.functional.linear.
        for attr in sorted(dir(module)):
            if _denied(attr):
                continue
            fn = getattr(module, attr, None)
            if fn is None or inspect.isclass(fn) or inspect.ismodule(fn):
                continue
            if not callable(fn) or not (inspect.isroutine(fn) or hasattr(fn, "__name__")):
                continue
            mod = getattr(fn, "__module__", "") or ""
            if mod and not (mod.startswith("torch") or mod == "builtins"):
                continue  # re-exported helpers from typing, math, ...
            if mod.startswith(DENIED_MODULES):
                continue
            name = f"{prefix}.{attr}"
            known = _lookup(by_func, fn)
            if known is not None:
                # Builtins that share a C function compare equal (torch.dsmm == torch.mm):
                # each name resolves, and the shortest is the one pointers send.
                by_name[name] = fn
                if attr == getattr(fn, "__name__", None) and len(attr) < len(known.rpartition(".")[2]):
                    by_func[fn] = name
                continue
            add(name, fn)

    for attr in sorted(set(dir(torch.Tensor))):
        if _denied(attr) or attr in _TENSOR_PROPERTIES:
            continue
        fn = inspect.getattr_static(torch.Tensor, attr, None)
        if fn is None or isinstance(fn, (property, type)):
            continue
        if inspect.isdatadescriptor(fn) and not callable(fn):
            continue  # shape, dtype, ...: answered locally from the pointer
        bound = getattr(torch.Tensor, attr)
        if not callable(bound):
            continue
        add(f"Tensor.{attr}", bound)

    for attr in _TENSOR_PROPERTIES:
        add(f"Tensor.{attr}", getattr(torch.Tensor, attr).__get__)

    # torch._foreach_*: what optimizers (foreach=True) and clip_grad_norm_ call on lists of
    # tensors. Each is its per-tensor op in a loop; torch checks the lists' lengths and every
    # pair's sizes, so they are as safe as the per-tensor ops (the private prefix is why the
    # loop above skips them).
    for attr in sorted(dir(torch)):
        if attr.startswith(FOREACH_PREFIX) and not _denied(attr[1:]):
            add(f"torch.{attr}", getattr(torch, attr))
    return by_name, by_func


OPS, _NAMES = _build()

_INPLACE_TORCH = frozenset(n for n in OPS if n.endswith("_") and not n.endswith("__"))


def op_name(func: Any) -> str | None:
    """The allowlist name of ``func``, or None if it is not allowed."""
    try:
        return _NAMES.get(func)
    except TypeError:
        return None


def resolve(name: str) -> Callable[..., Any] | None:
    """The callable an op name stands for, or None if the name is not in the allowlist."""
    return OPS.get(name)


def is_inplace(name: str) -> bool:
    """True for ops that modify their first argument and return it (``add_``, ``__iadd__``)."""
    if name in _INPLACE_TORCH:
        return True
    tail = name.rpartition(".")[2]
    return tail == "__setitem__" or (tail.startswith("__i") and f"__{tail[3:]}" in _DUNDERS)
