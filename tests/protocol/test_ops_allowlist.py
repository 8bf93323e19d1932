"""The op allowlist: nothing reaching files, processes, network, storage sharing, raw memory
or process-wide state is in it, and anything outside it is refused on both ends."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import fedws as sy
from fedws.node import Node
from fedws.protocol.codec import ObjRef, decode, encode_bytes
from fedws.protocol.messages import Kind
from fedws.protocol.ops import DENIED, FEDWS_OPS, OPS, is_inplace, op_name, resolve

# Every op name is "<namespace>.<attr>"; these are the namespaces the table may draw from.
NAMESPACES = ("torch.nn.functional.", "torch.linalg.", "torch.special.", "torch.fft.", "torch.", "Tensor.")

FORBIDDEN_WORDS = re.compile(
    r"(^|_)(save|load|from_file|file|hub$|hub_|seed|storage|share_memory|shared|pin_memory|"
    r"data_ptr|dlpack|numpy|pickle|__reduce|setstate|getstate|jit|script|compile|export|onnx|"
    r"thread|deterministic|grad_enabled|inference_mode|autocast|anomaly|cuda|mps|xpu|"
    r"multiprocessing|profiler|register_hook|apply_|map_|set_|empty|resize)"
)
# Names the regex catches that are math, checked by hand.
FORBIDDEN_WORDS_OK = {
    "Tensor.is_set_to",  # compares two tensors' storages: a bool, no memory
    "torch.resize_as_sparse_",
}

FORBIDDEN_MODULES = (
    "os", "sys", "subprocess", "socket", "io", "pickle", "builtins.open", "shutil", "pathlib",
    "torch.serialization", "torch.hub", "torch.jit", "torch.multiprocessing", "torch.storage",
    "torch.cuda", "torch.distributed", "torch.utils", "torch.backends", "torch._utils",
    "torch.overrides", "torch.random", "torch.autograd", "torch.compiler", "torch._dynamo",
    "torch.ops", "torch.onnx", "torch.export", "torch.package",
)


def _attr(name: str) -> str:
    return name.rpartition(".")[2]


def test_table_is_big_enough_to_be_useful() -> None:
    for name in ("torch.add", "torch.mm", "Tensor.mm", "Tensor.__add__", "Tensor.__radd__",
                 "Tensor.__iadd__", "Tensor.sum", "Tensor.backward", "torch.nn.functional.linear",
                 "torch.max", "Tensor.split", "torch.sort", "Tensor.grad", "Tensor.data",
                 "Tensor.sub_", "Tensor.__getitem__", "Tensor.__setitem__", "torch.linalg.norm"):
        assert name in OPS, name
    assert len(OPS) > 800


def test_every_name_lives_in_an_allowed_namespace() -> None:
    for name in OPS:
        assert name.startswith(NAMESPACES), name
    assert FEDWS_OPS.isdisjoint(OPS)


@pytest.mark.parametrize("name", sorted(OPS))
def test_no_op_reaches_outside_the_tensor(name: str) -> None:
    attr = _attr(name)
    assert attr not in DENIED
    assert not attr.startswith("_") or (attr.startswith("__") and attr.endswith("__")) or (
        name.startswith("torch._foreach_")
    ), name
    if name not in FORBIDDEN_WORDS_OK:
        assert not FORBIDDEN_WORDS.search(attr), f"{name} looks like it reaches outside the tensor"
    fn = OPS[name]
    module = getattr(fn, "__module__", None) or ""
    assert not module.startswith(FORBIDDEN_MODULES) or module.startswith("torch.utils._"), (name, module)
    assert not isinstance(fn, type), f"{name} is a class: constructing arbitrary classes is code"


@pytest.mark.parametrize(
    "fn",
    [
        torch.save, torch.load, torch.from_file, torch.manual_seed, torch.seed, torch.initial_seed,
        torch.set_num_threads, torch.get_num_threads, torch.set_default_dtype, torch.set_grad_enabled,
        torch.use_deterministic_algorithms, torch.set_printoptions, torch.compile, torch.frombuffer,
        torch.from_numpy, torch.empty, torch.empty_like, torch.empty_strided,
        torch.Tensor.storage, torch.Tensor.untyped_storage, torch.Tensor.share_memory_,
        torch.Tensor.data_ptr, torch.Tensor.set_, torch.Tensor.numpy, torch.Tensor.tolist,
        torch.Tensor.item, torch.Tensor.register_hook, torch.Tensor.apply_, torch.Tensor.map_,
        torch.Tensor.pin_memory, torch.Tensor.new_empty, torch.Tensor.new, torch.Tensor.resize_,
        torch.Tensor.__reduce_ex__, torch.Tensor.__setstate__, torch.Tensor.__deepcopy__,
        torch.Tensor.const_data_ptr, torch.Tensor.as_subclass,
        torch.sparse_coo_tensor, torch.sparse_csr_tensor, torch.Tensor.to_sparse, torch.Tensor.indices,
        torch.Tensor.values, torch.fbgemm_pack_quantized_matrix, torch.quantize_per_tensor,
        torch.dequantize, torch.Tensor.int_repr, torch.Tensor.q_scale, torch.Tensor.to_mkldnn,
    ],
)
def test_dangerous_callables_have_no_name(fn) -> None:
    assert op_name(fn) is None


def test_dangerous_modules_are_not_in_the_table() -> None:
    values = {id(v) for v in OPS.values()}
    for mod in (torch.hub, torch.jit, torch.serialization, torch.multiprocessing, torch.ops,
                torch.utils, torch.backends, torch.autograd):
        for attr in dir(mod):
            obj = getattr(mod, attr, None)
            if callable(obj) and not isinstance(obj, type) and obj is not torch.Tensor.backward:
                assert id(obj) not in values or op_name(obj) is None or getattr(
                    obj, "__module__", ""
                ).startswith(("torch.nn.functional", "torch._C._VariableFunctions", "torch.functional")), (
                    mod.__name__, attr)
    for name in OPS:
        assert not name.startswith(("torch.ops.", "torch.jit.", "torch.hub.", "torch.cuda.",
                                    "torch.backends.", "torch.utils.", "torch.autograd."))


def test_foreach_ops_are_the_per_tensor_math_ops() -> None:
    """torch._foreach_* are allowed (optimizers with foreach=True), and only where the op
    without the prefix would be: the private prefix lets nothing else in."""
    foreach = [n for n in OPS if n.startswith("torch._")]
    assert "torch._foreach_add_" in foreach and "torch._foreach_norm" in foreach
    for name in foreach:
        assert name.startswith("torch._foreach_"), name
        assert OPS[name] is getattr(torch, _attr(name))


def test_resolve_and_op_name_agree() -> None:
    assert resolve("torch.add") is torch.add
    assert op_name(torch.add) == "torch.add"
    # torch.mm, torch.dsmm and torch.spmm compare equal (one C function); the sparse names
    # are denied (sparse family), and pointers send the plain name
    assert op_name(torch.mm) == "torch.mm"
    assert resolve("torch.dsmm") is None and resolve("torch.spmm") is None
    assert op_name(F.linear) == "torch.nn.functional.linear"
    assert resolve("torch.save") is None
    assert resolve("os.system") is None
    assert resolve("") is None
    assert is_inplace("Tensor.add_") and is_inplace("Tensor.__iadd__")
    assert not is_inplace("Tensor.add") and not is_inplace("Tensor.__add__")


# -- refused by a node -------------------------------------------------------------------------


def _cmd(node: Node, op: str, args: list, result_ids: list[int]):
    return decode(b"".join(node.handle(encode_bytes([int(Kind.CMD), 5, op, args, {}, result_ids]))))


@pytest.mark.parametrize(
    "op",
    ["torch.save", "torch.load", "os.system", "builtins.eval", "Tensor.__reduce_ex__", "torch.empty",
     "torch.manual_seed", "Tensor.untyped_storage", "Tensor.share_memory_", "torch.ops.aten.add",
     "Tensor.set_", "torch.hub.load", "", "Tensor", "__import__", "fedws.nope", "torch.from_file",
     "torch.set_num_threads", "Tensor.numpy", "torch.jit.script"],
)
def test_node_refuses_unknown_or_denied_ops(op: str) -> None:
    node = Node("bob")
    node.handle(encode_bytes([int(Kind.STORE), 1, 10, torch.ones(2), [], None]))
    watermark, values, errors = _cmd(node, op, [ObjRef(10), "/tmp/fedws-should-not-exist"], [77])
    assert watermark == 5 and values == []
    [(seq, err, result_ids)] = errors
    assert seq == 5 and err["code"] == "OpNotAllowedError"
    assert err["worker"] == "bob" and err["op"] == op
    assert result_ids == [77]
    assert node.store.get(10).tolist() == [1.0, 1.0]
    # whatever used the refused result fails with the refusal chained
    _, _, errors = _cmd(node, "torch.add", [ObjRef(77), 1], [78])
    assert errors[0][1]["code"] == "DependencyError"
    assert "OpNotAllowedError" in errors[0][1]["message"] or "not allowed" in errors[0][1]["message"]


def test_op_name_that_is_not_a_string_is_refused() -> None:
    node = Node("bob")
    for op in (None, 3, ["torch.add"], {"torch": "add"}):
        _, _, errors = _cmd(node, op, [], [1])
        assert errors and errors[0][1]["worker"] == "bob"


def test_node_refuses_over_the_worker(make_worker) -> None:
    bob = make_worker("bob")
    x = torch.ones(3).send(bob)
    seq, _ = bob.submit(Kind.CMD, "torch.save", [ObjRef(x.id_at_location), "/tmp/x"], {}, [99])
    with pytest.raises(sy.OpNotAllowedError, match="bob") as info:
        bob.ack_future(seq).result(10)  # the worker flushes what the future waits on
    assert info.value.worker == "bob" and info.value.op == "torch.save"
    assert x.get().tolist() == [1.0, 1.0, 1.0]


# -- refused locally, before sending -------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p.untyped_storage(),
        lambda p: p.share_memory_(),
        lambda p: p.data_ptr(),
        lambda p: p.register_hook(lambda g: g),
        lambda p: p.apply_(lambda v: v),
        lambda p: p.new_empty(3),
        lambda p: p.resize_(10),
        lambda p: torch.empty_like(p),
        lambda p: p.pin_memory(),
    ],
)
def test_denied_op_on_a_pointer_raises_before_sending(make_worker, call) -> None:
    bob = make_worker("bob")
    x = torch.ones(3).send(bob)
    sent = bob.session.messages_sent
    last = bob.session._last_seq
    with pytest.raises((sy.OpNotAllowedError, sy.PointerError)):
        call(x)
    assert bob.session._last_seq == last, "nothing may be queued for a refused op"
    assert bob.session.messages_sent == sent
    assert x.get().tolist() == [1.0, 1.0, 1.0]


def test_local_refusal_is_an_op_not_allowed_error(make_worker) -> None:
    bob = make_worker("bob")
    x = torch.ones(3).send(bob)
    with pytest.raises(sy.OpNotAllowedError) as info:
        x.untyped_storage()
    assert isinstance(info.value, sy.FedwsError)
    assert "untyped_storage" in str(info.value)
