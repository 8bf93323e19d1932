"""Node.handle without any transport: bytes in, reply bytes out."""

from __future__ import annotations

import torch

from fedws.node import Failure, Node
from fedws.protocol.codec import ObjRef, PointerRef, decode, encode_bytes
from fedws.protocol.messages import Kind


def req(*fields) -> bytes:
    return encode_bytes(list(fields))


def run(node: Node, *requests: bytes) -> tuple[int, list, list]:
    watermark, values, errors = decode(b"".join(node.handle(b"".join(requests))))
    return watermark, values, errors


def test_commands_run_in_order_and_are_acked_by_watermark() -> None:
    node = Node("bob")
    wm, values, errors = run(
        node,
        req(Kind.STORE, 1, 10, torch.tensor([1.0, 2.0]), ["#x"], "desc"),
        req(Kind.CMD, 2, "torch.add", [ObjRef(10), ObjRef(10)], {}, [11]),
        req(Kind.CMD, 3, "Tensor.__mul__", [ObjRef(11), 3], {}, [12]),
        req(Kind.GET, 4, 12, True),
    )
    assert wm == 4 and errors == []
    assert values[0][0] == 4 and values[0][1].tolist() == [6.0, 12.0]
    # a gotten object is removed once the reply holding it is encoded
    assert 12 not in node.store
    assert run(node, req(Kind.INFO, 5, "count"))[1] == [[5, 2]]


def test_multi_result_ops_store_each_result() -> None:
    node = Node("bob")
    wm, _, errors = run(
        node,
        req(Kind.STORE, 1, 1, torch.tensor([[1.0, 5.0], [3.0, 2.0]]), [], None),
        req(Kind.CMD, 2, "torch.max", [ObjRef(1), 0], {}, [2, 3]),
    )
    assert errors == []
    assert node.store.get(2).tolist() == [3.0, 5.0] and node.store.get(3).tolist() == [1, 0]


def test_failure_is_stored_and_dependents_fail_chained() -> None:
    node = Node("bob")
    _, _, errors = run(
        node,
        req(Kind.STORE, 1, 1, torch.ones(2, 3), [], None),
        req(Kind.CMD, 2, "Tensor.mm", [ObjRef(1), ObjRef(1)], {}, [2]),
        req(Kind.CMD, 3, "torch.add", [ObjRef(2), 1], {}, [3]),
        req(Kind.GET, 4, 3, True),
    )
    seqs = [e[0] for e in errors]
    assert seqs == [2, 3, 4]
    assert errors[0][1]["type"] == "RuntimeError" and errors[0][2] == [2]
    assert errors[1][1]["code"] == "DependencyError" and "object 2" in errors[1][1]["message"]
    assert isinstance(node.store.objects[2], Failure) and isinstance(node.store.objects[3], Failure)
    assert errors[2][1]["code"] == "DependencyError"


def test_search_info_delete_clear() -> None:
    node = Node("bob")
    run(
        node,
        req(Kind.STORE, 1, 1, torch.ones(2), ["#a", "#b"], "first"),
        req(Kind.STORE, 2, 2, torch.zeros(3, dtype=torch.int8), ["#a"], None),
    )
    _, values, _ = run(node, req(Kind.SEARCH, 3, ["#a"]), req(Kind.SEARCH, 4, ["#a", "#b"]),
                       req(Kind.INFO, 5, "meta", 2))
    assert [d[0] for d in values[0][1]] == [1, 2]
    assert values[1][1] == [[1, "Tensor", [2], "float32", False, ["#a", "#b"], "first"]]
    assert values[2][1] == [[3], "int8", False]
    run(node, req(Kind.DELETE, 6, [1, 999]))
    assert list(node.store.objects) == [2]
    run(node, req(Kind.CLEAR, 7))
    assert len(node.store) == 0 and node.store.nbytes == 0


def test_store_cap_refuses_and_keeps_what_it_had() -> None:
    node = Node("bob", max_store_bytes=64)
    _, _, errors = run(
        node,
        req(Kind.STORE, 1, 1, torch.ones(8), [], None),  # 32 bytes
        req(Kind.STORE, 2, 2, torch.ones(16), [], None),  # 64 more: over the cap
        req(Kind.CMD, 3, "torch.add", [ObjRef(2), 1], {}, [3]),
    )
    assert [e[1]["code"] for e in errors] == ["StoreFullError", "DependencyError"]
    assert node.store.get(1).tolist() == [1.0] * 8 and node.store.nbytes == 32


def test_pointer_to_unknown_peer_fails_its_own_request() -> None:
    def factory(ref: PointerRef):
        raise LookupError(f"worker 'alice' does not know worker {ref.location!r}")

    node = Node("alice", pointer_factory=factory)
    ref = PointerRef("bob", None, 5, 6, (2,), "float32", False)
    wm, values, errors = run(
        node,
        req(Kind.STORE, 1, 6, ref, [], None),
        req(Kind.CMD, 2, "fedws.remote_get", [6], {}, []),
        req(Kind.INFO, 3, "count"),
    )
    assert wm == 3
    assert errors[0][0] == 1 and "does not know" in errors[0][1]["message"]
    assert errors[1][0] == 2  # what used it fails with the cause
    assert "does not know" in errors[1][1]["message"]
    assert values == [[3, 1]]  # the failure is held where the pointer would be


def test_ping_and_unknown_info() -> None:
    node = Node("bob")
    _, values, errors = run(node, req(Kind.PING, 1), req(Kind.INFO, 2, "secrets"))
    assert values == [[1, "pong"]]
    assert errors[0][0] == 2 and errors[0][1]["worker"] == "bob"
