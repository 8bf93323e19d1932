"""The op table, walked with memory safety in mind.

No op may build or take apart a sparse tensor (kernels trust its indices: the base commit
let ``sparse_coo_tensor`` + ``add_`` write into another coordinator's tensor), return the
bytes of a quantized/packed structure (``fbgemm_pack_quantized_matrix`` leaked process
memory with addresses), or hand out uninitialized memory. Ops that index stay because torch
checks their indices: each is proved here with an out-of-range index.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch

from fedws.exceptions import DecodeError
from fedws.node import Node
from fedws.protocol.codec import DECODABLE_DTYPES, EXT_CONST, EXT_DTYPE, ObjRef, decode, encode_bytes
from fedws.protocol.messages import Kind
from fedws.protocol.ops import OPS, resolve

SPARSE = re.compile(r"sparse|spmm|smm|coalesce|^(indices|values)(_copy)?$|crow_|ccol_|col_indices|row_indices|"
                    r"to_dense|to_padded|nested")
QUANTIZED = re.compile(r"quantiz|_quant|^q_|dequant|int_repr|fbgemm|packed|_pack_|mkldnn|nnpack|cudnn|miopen|"
                       r"xnnpack|vulkan")
UNINITIALIZED = re.compile(r"empty|^new$|resize|set_$|storage|data_ptr|from_file|from_buffer|frombuffer|pin_memory|"
                           r"^map_?$|map2_|apply_")
# indexing ops whose kernels check indices against the tensor (proved below)
ALLOWED_INDEX_WORDS = {"tril_indices", "triu_indices"}


def _attr(name: str) -> str:
    return name.rpartition(".")[2]


def test_no_sparse_op_is_in_the_table() -> None:
    found = [n for n in OPS if SPARSE.search(_attr(n)) and _attr(n) not in ALLOWED_INDEX_WORDS]
    assert found == []


def test_no_quantized_packed_or_backend_op_is_in_the_table() -> None:
    found = [n for n in OPS if QUANTIZED.search(_attr(n))]
    assert found == []
    assert "torch.quantile" in OPS and "torch.nanquantile" in OPS  # math, not quantization


def test_no_op_hands_out_uninitialized_or_raw_memory() -> None:
    found = [n for n in OPS if UNINITIALIZED.search(_attr(n))]
    assert found == [], found


@pytest.mark.filterwarnings("ignore")
def test_every_op_in_the_table_on_dense_inputs_never_yields_sparse() -> None:
    """Walk the table: call every op on a small dense tensor (where that works) and check no
    result is sparse, quantized or mkldnn. Nothing in the table creates a sparse layout."""
    x = torch.arange(1.0, 7.0).reshape(2, 3)
    bad = []
    for name, fn in sorted(OPS.items()):
        if name.startswith("Tensor.__") or _attr(name).endswith("_"):
            continue  # operators and in-place ops are covered by their out-of-place twins
        for args in ((x,), (x, x)):
            try:
                out = fn(*args)
            except Exception:
                continue
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for o in outs:
                if isinstance(o, torch.Tensor) and (o.layout != torch.strided or o.is_quantized or o.is_mkldnn):
                    bad.append(name)
    assert bad == []


def test_a_peer_cannot_name_a_sparse_layout_or_a_quantized_dtype() -> None:
    import msgpack

    for code, name in ((EXT_CONST, b"sparse_coo"), (EXT_CONST, b"sparse_csr"), (EXT_DTYPE, b"qint8"),
                       (EXT_DTYPE, b"quint8"), (EXT_DTYPE, b"qint32"), (EXT_DTYPE, b"quint4x2")):
        env = msgpack.packb(msgpack.ExtType(code, name))
        with pytest.raises(DecodeError):
            decode(len(env).to_bytes(4, "little") + bytes(12) + env)
    assert not any(n.startswith(("q", "quint")) for n in DECODABLE_DTYPES)
    assert decode(encode_bytes(torch.strided)) is torch.strided


def _reply(node: Node, *requests: list) -> list:
    return decode(b"".join(node.handle(b"".join(encode_bytes(r) for r in requests))))


@pytest.mark.parametrize(
    "op",
    ["torch.sparse_coo_tensor", "torch.sparse_csr_tensor", "torch.sparse_compressed_tensor",
     "Tensor.to_sparse", "Tensor.to_sparse_csr", "Tensor.indices", "Tensor.values", "Tensor.coalesce",
     "torch.smm", "torch.hspmm", "torch.sspaddmm", "Tensor.sparse_mask", "torch.fbgemm_pack_quantized_matrix",
     "torch.fbgemm_pack_gemm_matrix_fp16", "torch.quantize_per_tensor", "torch.dequantize", "Tensor.int_repr",
     "Tensor.q_scale", "Tensor.to_mkldnn", "torch.mkldnn_convolution", "Tensor.new_empty", "Tensor.new",
     "Tensor.set_", "Tensor.untyped_storage", "torch.from_file", "Tensor.map_", "Tensor.pin_memory",
     "torch.empty_strided", "Tensor.resize_"],
)
def test_node_refuses_memory_unsafe_ops(op: str) -> None:
    node = Node("bob")
    _reply(node, [int(Kind.STORE), 1, 10, torch.ones(2, 2), [], None])
    _, _, errors = _reply(node, [int(Kind.CMD), 5, op, [ObjRef(10)], {}, [20]])
    assert errors and errors[0][1]["code"] == "OpNotAllowedError", errors


def test_sparse_out_of_range_write_is_refused_in_a_child() -> None:
    """Base commit: sparse_coo_tensor(index 255) + add_(dense, sparse) wrote past the dense
    tensor (into another coordinator's tensor); a larger index segfaulted. Run it in a child."""
    code = textwrap.dedent(
        """
        import torch
        from fedws.node import Node
        from fedws.protocol.codec import ObjRef, decode, encode_bytes
        from fedws.protocol.messages import Kind
        node = Node("bob")
        def run(*reqs):
            return decode(b"".join(node.handle(b"".join(encode_bytes(r) for r in reqs))))
        run([2, 1, 10, torch.zeros(4), [], None], [2, 2, 11, torch.zeros(1000), [], None])
        _, _, errors = run(
            [1, 3, "torch.sparse_coo_tensor", [torch.tensor([[1 << 40]]), torch.ones(1), [4]], {}, [12]],
            [1, 4, "Tensor.add_", [ObjRef(10), ObjRef(12)], {}, [13]],
            [1, 5, "torch.zeros", [2], {"layout": torch.strided}, [14]],
        )
        assert [e[0] for e in errors] == [3, 4], errors
        assert errors[0][1]["code"] == "OpNotAllowedError"
        assert node.store.get(11).sum().item() == 0
        print("alive")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])


def test_packed_matrix_cannot_leak_process_memory() -> None:
    node = Node("bob")
    _reply(node, [int(Kind.STORE), 1, 10, torch.ones(4, 4), [], None])
    _, values, errors = _reply(
        node,
        [int(Kind.CMD), 2, "torch.fbgemm_pack_quantized_matrix", [ObjRef(10)], {}, [11]],
        [int(Kind.GET), 3, 11, False],
    )
    assert values == [] and [e[0] for e in errors] == [2, 3]
    assert errors[0][1]["code"] == "OpNotAllowedError"


# -- ops that index: torch checks them (memory-safe), so they stay allowed --------------------------

x = torch.arange(4.0)


@pytest.mark.parametrize(
    "name, args, kwargs",
    [
        ("torch.as_strided", [x, (4,), (100,)], {}),  # stride past the storage
        ("torch.as_strided", [x, (2,), (1,), 3], {}),  # offset past the storage
        ("torch.as_strided", [x, (4,), (-1,), 3], {}),  # negative stride
        ("Tensor.as_strided_", [x.clone(), (4,), (100,)], {}),
        ("torch.as_strided_scatter", [x, torch.ones(4), (4,), (100,)], {}),
        ("torch.as_strided_copy", [x, (4,), (100,)], {}),
        ("Tensor.index_put_", [x.clone(), (torch.tensor([100]),), torch.tensor(1.0)], {}),
        ("Tensor.index_put_", [x.clone(), (torch.tensor([100]),), torch.tensor(1.0)], {"accumulate": True}),
        ("Tensor.put_", [x.clone(), torch.tensor([100]), torch.tensor(1.0)], {}),
        ("torch.take", [x, torch.tensor([100])], {}),
        ("torch.gather", [x, 0, torch.tensor([100])], {}),
        ("Tensor.scatter_", [x.clone(), 0, torch.tensor([100]), 1.0], {}),
        ("Tensor.index_add_", [x.clone(), 0, torch.tensor([100]), torch.ones(1)], {}),
        ("Tensor.index_copy_", [x.clone(), 0, torch.tensor([100]), torch.ones(1)], {}),
        ("Tensor.index_fill_", [x.clone(), 0, torch.tensor([100]), 1.0], {}),
        ("torch.index_select", [x, 0, torch.tensor([-100])], {}),
        ("torch.nn.functional.embedding", [torch.tensor([100]), torch.ones(3, 2)], {}),
        ("torch.nn.functional.embedding_bag", [torch.tensor([1]), torch.ones(3, 2), torch.tensor([0, 50])], {}),
        ("torch.lu_unpack", [torch.eye(3), torch.tensor([100, -5, 2**30], dtype=torch.int32)], {}),
        ("torch.nn.functional.max_unpool1d", [torch.ones(1, 1, 2), torch.tensor([[[100, 2**40]]]), 2], {}),
        ("torch.searchsorted", [x, x], {"sorter": torch.tensor([100, 0, 1, 2])}),
        ("torch.bincount", [torch.tensor([-1])], {}),
        ("Tensor.masked_scatter_", [x.clone(), torch.ones(4, dtype=torch.bool), torch.ones(1)], {}),
        ("torch.nn.functional.nll_loss", [torch.randn(2, 3), torch.tensor([100, 1])], {}),
        ("torch.take_along_dim", [x, torch.tensor([100])], {}),
    ],
)
def test_indexing_ops_check_their_indices(name: str, args: list, kwargs: dict) -> None:
    fn = resolve(name)
    assert fn is not None, f"{name} should be allowed (torch checks it)"
    with pytest.raises((RuntimeError, IndexError, ValueError)):
        fn(*args, **kwargs)


def test_as_strided_reaches_only_its_own_storage() -> None:
    base = torch.arange(8.0)
    view = base[:2]
    wide = torch.as_strided(view, (8,), (1,))  # within the storage of its base: allowed by torch
    assert wide.tolist() == base.tolist()
    with pytest.raises(RuntimeError):
        torch.as_strided(view, (9,), (1,))  # one element past the storage


def test_unsafe_split_and_chunk_are_plain_views() -> None:
    parts = resolve("torch.unsafe_split")(torch.arange(4.0), 2)  # type: ignore[misc]
    assert [p.tolist() for p in parts] == [[0.0, 1.0], [2.0, 3.0]]
    assert resolve("torch.unsafe_chunk") is not None
