"""The node's memory limits without a network: output sizes from meta inference, what the
store counts, and the caps on plans, ids and listings (fedws.node.limits)."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from fedws.client.session import Session
from fedws.exceptions import DecodeError, LimitExceededError, MemoryBudgetError, StoreFullError
from fedws.node import Node
from fedws.node import limits as L
from fedws.node.interpreter import StoredPlan
from fedws.protocol import codec
from fedws.protocol.codec import ObjRef
from fedws.protocol.messages import MAX_DELETE_IDS, Cmd, Delete, Kind
from fedws.protocol.plan import MAX_REGISTERS, PlanCode

GiB = 1 << 30


def size(op: str, fn: Any, *args: Any, **kwargs: Any) -> int:
    return L.output_bytes(op, fn, list(args), kwargs)


def test_output_sizes_come_from_meta_inference_without_allocating() -> None:
    x = torch.ones(3)
    assert size("torch.arange", torch.arange, 2**31) == 2**31 * 8
    assert size("torch.ones", torch.ones, 2**32 - 1) == (2**32 - 1) * 4
    assert size("torch.zeros", torch.zeros, 10**6, 10**6, device="cpu") == 4 * 10**12
    assert size("torch.range", torch.range, 0, 2**31) > 8 * GiB  # ignores the meta device context
    huge = torch.ones(1).expand(10**6, 10**6)
    assert size("Tensor.expand", torch.Tensor.expand, x[:1], 10**6, 10**6) == 0  # a view
    assert size("Tensor.contiguous", torch.Tensor.contiguous, huge) == 4 * 10**12
    assert size("Tensor.add_", torch.Tensor.add_, x, x) == 0  # in place
    assert size("torch.add", torch.add, x, x) == 12
    assert size("torch.ones", torch.ones, 1000, out=x) == 4000 - 12  # out= grows its storage
    assert size("torch.cat", torch.cat, [x] * 1000) == 12_000
    assert size("Tensor.repeat", torch.Tensor.repeat, x, 10**5, 10**5) == 12 * 10**10


def test_value_dependent_sizes_are_bounded_from_the_values() -> None:
    t = torch.tensor([2**30])
    assert size("torch.repeat_interleave", torch.repeat_interleave, t) == 2**30 * 8
    assert size("Tensor.repeat_interleave", torch.Tensor.repeat_interleave, torch.ones(2), t) >= 2**30 * 4
    assert size("torch.bincount", torch.bincount, t) >= 2**30 * 8
    assert size("torch.nn.functional.one_hot", torch.nn.functional.one_hot, t) >= 2**30 * 8
    assert size("torch.cov", torch.cov, torch.ones(10**5, 2)) >= 10**10 * 4
    assert size("torch.arange", torch.arange, torch.tensor(2**31)) == 2**31 * 8  # a 0-d size
    # no meta kernel: bounded by the inputs (nonzero of a 2-d tensor: 16 bytes per element)
    assert size("torch.nonzero", torch.nonzero, torch.ones(10, 10)) >= 100 * 16


def test_ops_on_pointers_and_fedws_ops_cost_nothing_here() -> None:
    ptr_like = torch.empty(10**6, device="meta")
    assert size("torch.add", torch.add, ptr_like, 1) == 0
    assert size("fedws.set_data", lambda a, b: None, torch.ones(2), torch.ones(2)) == 0


def test_the_budget_refuses_before_running_and_keeps_everything() -> None:
    node = Node("n", max_memory_bytes=64 << 20)
    keep = _store(node, 1, torch.arange(10.0))
    _run(node, Cmd("torch.ones", [2**28], {}, [2]))
    with pytest.raises(MemoryBudgetError, match="memory budget"):
        _get(node, 2)
    assert torch.equal(_get(node, 1), keep)
    _run(node, Cmd("torch.ones", [2**20], {}, [3]))  # 4 MiB fits
    assert _get(node, 3).shape == (2**20,)


def test_default_budget_is_half_the_machine_or_the_store_cap() -> None:
    phys = L.physical_memory()
    assert phys is not None and L.default_budget() == phys // 2
    assert L.default_budget(1 << 20) == 1 << 20
    assert Node("n", max_store_bytes=1 << 20).budget.limit == 1 << 20


def test_a_reply_larger_than_the_budget_is_an_error_and_the_object_stays() -> None:
    node = Node("n", max_memory_bytes=64 << 20)
    _run(node, Cmd("torch.ones", [1], {}, [1]))
    _run(node, Cmd("Tensor.expand", [ObjRef(1), 10**11], {}, [2]))
    for remove in (False, True):
        with pytest.raises(MemoryBudgetError, match="to send"):
            _get(node, 2, remove)
    assert node.store.get(2).shape == (10**11,)


def test_the_store_counts_non_tensor_values_tuples_and_plans() -> None:
    node = Node("n")
    floats = [0.5 + i for i in range(1000)]
    node.store.set(1, floats)
    assert node.store.nbytes >= sys.getsizeof(floats) + 1000 * sys.getsizeof(0.5)
    before = node.store.nbytes
    node.store.set(2, torch.sort(torch.ones(1000)))  # (values, indices) under one id
    assert node.store.nbytes - before >= 1000 * (4 + 8)
    before = node.store.nbytes
    code = PlanCode("p", 0, 0, 2, 2, outputs=[0])
    node.store.set(3, StoredPlan(code, [torch.ones(1000), torch.ones(1000)]))
    assert node.store.nbytes - before >= 8000
    shared = torch.ones(1000)
    before = node.store.nbytes
    node.store.set(4, [shared, shared.view(10, 100)])  # one storage, counted once
    assert 4000 <= node.store.nbytes - before < 8000


def test_a_small_tensor_does_not_keep_its_frame_alive() -> None:
    node = Node("n")
    keep = codec.encode([int(Kind.STORE), 1, 7, torch.ones(2**14), [], None])  # 64 KiB: a view
    junk = codec.encode([int(Kind.CMD), 2, "torch.save", [torch.zeros(2**22)], {}, []])
    frame = bytearray(b"".join(bytes(c) for c in [*keep, *junk]))
    node.handle(frame)
    assert sys.getrefcount(frame) == 2  # nothing but this test holds the frame
    assert node.store.nbytes == 2**16 and torch.equal(node.store.get(7), torch.ones(2**14))
    # a tensor that is most of its frame stays a view and counts the whole frame
    big = bytearray(codec.encode_bytes([int(Kind.STORE), 3, 8, torch.ones(2**20), [], None]))
    node.handle(big)
    assert node.store.nbytes == 2**16 + len(big)


def test_a_small_tensor_in_a_list_is_copied_out_of_its_frame() -> None:
    node = Node("n")
    blob = codec.encode([int(Kind.STORE), 1, 9, [torch.ones(2**14), 1.5], [], None])
    junk = codec.encode([int(Kind.CMD), 2, "torch.save", [torch.zeros(2**22)], {}, []])
    frame = bytearray(b"".join(bytes(c) for c in [*blob, *junk]))
    node.handle(frame)
    assert sys.getrefcount(frame) == 2


def test_the_store_cap_refuses_what_it_did_not_count_before() -> None:
    node = Node("n", max_store_bytes=1 << 20)
    with pytest.raises(StoreFullError):
        node.store.set(1, [float(i) for i in range(100_000)])  # ~3 MiB of Python floats
    assert 1 not in node.store and node.store.nbytes == 0


def test_plans_with_huge_register_ops_or_state_counts_are_refused_on_arrival() -> None:
    base = {"v": 1, "name": "p", "n_args": 0, "n_inputs": 0, "n_registers": 1, "state": [], "ops": [],
            "outputs": [0], "single": True, "out_specs": []}
    PlanCode.from_wire(base)
    for bad in ({"n_registers": 10**9}, {"n_registers": MAX_REGISTERS + 1}, {"n_registers": -1},
                {"ops": [["torch.add", [], {}, [], True]] * (1 << 18 + 1)}):
        with pytest.raises(DecodeError, match="registers|too many"):
            PlanCode.from_wire({**base, **bad})


def test_result_and_delete_ids_are_capped_and_a_refused_command_leaves_no_failures() -> None:
    with pytest.raises(DecodeError, match="at most 4096"):
        Cmd.parse(["torch.ones", [1], {}, list(range(5000))])
    with pytest.raises(DecodeError, match="at most"):
        Delete.parse([list(range(MAX_DELETE_IDS + 1))])
    node = Node("n")
    node.handle(codec.encode_bytes([int(Kind.CMD), 1, "torch.ones", [1], {}, list(range(100_000))]))
    assert len(node.store) == 0


def test_clients_split_large_deletes() -> None:
    session = Session("w")
    for i in range(10_000):
        session.queue_delete(i)
    frame = session.take_frame()
    assert frame is not None
    msgs = [codec.decode(b) for b in codec.iter_blobs(b"".join(bytes(c) for c in frame))]
    assert [len(m[2]) for m in msgs] == [4096, 4096, 10_000 - 8192]


def test_listings_are_capped() -> None:
    node = Node("n")
    for i in range(L.MAX_LISTED + 1):
        node.store.set(i, i)
    for req in ([int(Kind.INFO), 1, "list"], [int(Kind.SEARCH), 2, []]):
        reply = codec.decode(b"".join(bytes(c) for c in node.handle(codec.encode_bytes(req))))
        assert reply[2][0][1]["code"] == LimitExceededError.__name__


def test_a_plan_step_that_would_not_fit_is_refused_before_it_runs() -> None:
    node = Node("n", max_memory_bytes=64 << 20)
    ops = [["torch.ones", [2**22], {}, [0], False], ["torch.ones", [2**22], {}, [1], False],
           ["torch.ones", [2**23], {}, [2], False]]  # 16 + 16 + 32 MiB > 64 MiB with the store
    plan = {"v": 1, "name": "p", "n_args": 0, "n_inputs": 0, "n_registers": 3, "state": [], "ops": ops,
            "outputs": [2], "single": True, "out_specs": []}
    _store(node, 5, torch.ones(2**20))
    _request(node, [int(Kind.STORE_PLAN), 1, 10, plan])
    _request(node, [int(Kind.RUN_PLAN), 2, 10, [], [11]])
    with pytest.raises(MemoryBudgetError, match="torch.ones"):
        _get(node, 11)


# -- helpers ----------------------------------------------------------------------------


def _request(node: Node, req: list[Any]) -> list[Any]:
    reply: list[Any] = codec.decode(b"".join(bytes(c) for c in node.handle(codec.encode_bytes(req))))
    return reply


def _run(node: Node, cmd: Cmd) -> None:
    _request(node, cmd.to_wire(1))


def _store(node: Node, obj_id: int, value: Any) -> Any:
    node.store.set(obj_id, value)
    return value


def _get(node: Node, obj_id: int, remove: bool = False) -> Any:
    from fedws.protocol.errors import error_from_wire

    _, values, errors = _request(node, [int(Kind.GET), 1, obj_id, remove])
    if errors:
        raise error_from_wire(errors[0][1])
    return values[0][1]
