"""Tensors larger than one frame move in chunks and are stored only once whole.

Real node processes: one with a 1 MiB frame limit and a 64 MiB memory budget (private, the
default policy), where the coordinator learns the limit in the handshake and streams on its
own; and the shared open-policy pool node for a transfer dropped midway. Chunk headers are
hostile input: the in-process node checks each refusal leaves no stream open.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import fedws as sy
from fedws.client.stream import store_chunked
from fedws.launch import NodeProcess, start_node
from fedws.protocol.ids import new_id
from fedws.protocol.messages import Kind
from tests.conftest import NodePool, stored_count

BUDGET_MB = 64


@pytest.fixture(scope="module")
def small_node() -> Iterator[NodeProcess]:
    node = start_node(
        id="tiny-frames", port=0,
        extra_args=["--max-frame-mb", "1", "--max-memory-mb", str(BUDGET_MB), "--threads", "1"],
    )
    try:
        yield node
    finally:
        node.stop()


def _connect(url: str) -> sy.WebsocketClientWorker:
    return sy.connect(url, hook=sy.TorchHook(torch, federation=sy.Federation()), timeout=30.0)


def test_a_tensor_over_the_nodes_frame_limit_streams_and_arrives_bit_for_bit(small_node: NodeProcess) -> None:
    w = _connect(small_node.url)
    try:
        assert w.link.stream_above == 1 << 19  # half the node's 1 MiB, learnt in the handshake
        for t in (torch.randn(1 << 20), torch.randn(3, 700, 300).to(torch.bfloat16), torch.arange(300_001)):
            ptr = t.send(w)
            assert ptr.shape == t.shape
            back = ptr.get()
            assert back.dtype == t.dtype and torch.equal(back, t)
        grad = torch.randn(200_000, requires_grad=True).send(w)
        assert grad.requires_grad
        assert stored_count(w) == 1
    finally:
        w.close()


def test_a_stream_over_the_memory_budget_is_refused_before_allocating(small_node: NodeProcess) -> None:
    w = _connect(small_node.url)
    try:
        before = stored_count(w)
        big = torch.zeros((BUDGET_MB + 8) << 20, dtype=torch.uint8)
        ptr = big.send(w)
        with pytest.raises(sy.MemoryBudgetError, match="fedws.stream.begin"):
            ptr.get()
        del ptr  # the node kept only the failure (for later uses of the id), dropped with the pointer
        assert stored_count(w) == before
        small = torch.randn(300_000)  # the node serves the next stream
        assert torch.equal(small.send(w).get(), small)
    finally:
        w.close()


def test_another_session_cannot_write_into_or_commit_a_stream(small_node: NodeProcess) -> None:
    owner, attacker = _connect(small_node.url), _connect(small_node.url)
    try:
        t = torch.randn(1 << 18)
        flat = t.view(torch.uint8)
        sid = new_id()
        owner.submit(Kind.CMD, "fedws.stream.begin", [sid, "float32", [1 << 18]], {}, [])
        owner.submit(Kind.CMD, "fedws.stream.put", [sid, 0, flat[: 1 << 19]], {}, [])
        attacker.submit(Kind.CMD, "fedws.stream.put", [sid, 1 << 19, torch.zeros(1 << 19, dtype=torch.uint8)], {}, [])
        mine = new_id()  # commit the owner's stream into an id of its own
        attacker.submit(Kind.CMD, "fedws.stream.commit", [sid], {}, [mine])
        with pytest.raises(sy.RemoteError, match="no stream"):
            attacker.request(Kind.GET, mine, False)
        owner.submit(Kind.CMD, "fedws.stream.put", [sid, 1 << 19, flat[1 << 19 :]], {}, [])
        owner.submit(Kind.CMD, "fedws.stream.commit", [sid], {}, [sid])
        assert torch.equal(owner.request(Kind.GET, sid, False), t)
    finally:
        owner.close()
        attacker.close()


def test_a_transfer_dropped_midway_stores_nothing_and_the_node_serves_on(node_pool: NodePool) -> None:
    url = node_pool.url("streamer")
    w = _connect(url)
    w.clear_objects_remote()
    before = stored_count(w)
    t = torch.randn(1 << 20)
    flat = t.view(torch.uint8)
    sid = new_id()
    w.submit(Kind.CMD, "fedws.stream.begin", [sid, "float32", [1 << 20]], {}, [])
    w.submit(Kind.CMD, "fedws.stream.put", [sid, 0, flat[: 1 << 20]], {}, [])
    w.ping()
    w.close()  # the connection drops with 3 of 4 MiB missing
    w2 = _connect(url)
    try:
        assert stored_count(w2) == before
        with pytest.raises(sy.ObjectNotFoundError):
            w2.request(Kind.GET, sid, False)
        oid = new_id()
        store_chunked(w2, t, obj_id=oid, chunk_bytes=1 << 20)
        assert torch.equal(w2.request(Kind.GET, oid, False), t)
        assert stored_count(w2) == before + 1  # only the whole tensor
    finally:
        w2.close()


def _bad(w: Any, *commands: tuple[str, list[Any]]) -> None:
    for op, args in commands:
        w.submit(Kind.CMD, op, args, {}, [])


@pytest.mark.parametrize(
    "case",
    [
        "out of order", "past the end", "not uint8", "2-D chunk", "empty chunk", "offset not int",
        "unknown dtype", "negative size", "quantized dtype", "begun twice",
    ],
)
def test_hostile_chunk_headers_drop_the_stream_and_store_nothing(hook: sy.TorchHook, case: str) -> None:
    w = sy.VirtualWorker(hook, id=f"streams-{case.replace(' ', '-')}")
    node = w.node
    sid = new_id()
    ok = ("fedws.stream.begin", [sid, "float32", [1000]])
    u8 = torch.zeros(1000, dtype=torch.uint8)
    cases: dict[str, list[tuple[str, list[Any]]]] = {
        "out of order": [ok, ("fedws.stream.put", [sid, 8, u8])],
        "past the end": [ok, ("fedws.stream.put", [sid, 0, torch.zeros(4001, dtype=torch.uint8)])],
        "not uint8": [ok, ("fedws.stream.put", [sid, 0, torch.zeros(1000)])],
        "2-D chunk": [ok, ("fedws.stream.put", [sid, 0, u8.view(10, 100)])],
        "empty chunk": [ok, ("fedws.stream.put", [sid, 0, u8[:0]])],
        "offset not int": [ok, ("fedws.stream.put", [sid, 0.0, u8])],
        "unknown dtype": [("fedws.stream.begin", [sid, "float99", [10]])],
        "negative size": [("fedws.stream.begin", [sid, "float32", [10, -1]])],
        "quantized dtype": [("fedws.stream.begin", [sid, "qint8", [10]])],
        "begun twice": [ok, ok],
    }
    _bad(w, *cases[case])
    w.submit(Kind.CMD, "fedws.stream.commit", [sid], {}, [sid])
    with pytest.raises(sy.FedwsError):
        w.request(Kind.GET, sid, False)
    assert node.streams.open_count() == 0 and node.streams.pending_bytes == 0
    assert not any(isinstance(v, torch.Tensor) for v in node.store.objects.values())  # only the failure


def test_streams_left_open_are_freed_with_their_session(hook: sy.TorchHook) -> None:
    w = sy.VirtualWorker(hook, id="streams-session")
    node = w.node
    for _ in range(2):
        w.submit(Kind.CMD, "fedws.stream.begin", [new_id(), "float32", [1 << 16]], {}, [])
    w.ping()
    assert node.streams.open_count() == 2 and node.streams.pending_bytes == 2 << 18
    caller = next(iter(k[0] for k in node.streams._open))
    assert node.streams.drop_caller(caller) == 2
    assert node.streams.pending_bytes == 0
    for _ in range(5):  # at most MAX_OPEN per caller
        w.submit(Kind.CMD, "fedws.stream.begin", [new_id(), "float32", [1]], {}, [])
    w.ping()
    assert node.streams.open_count() == 4
