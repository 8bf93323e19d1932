"""Tensors larger than one frame leaving a node: read by ranges, released once as a GET would.

The node's release rules (owner, private data, DP releases) are decided by
``fedws.stream.open_read`` for the whole tensor, with the node's own GET handler: these tests
check a range cannot be read of anything a plain get would not give, by a stranger or by the
owner. Then real node processes: a get over the frame limit, bit for bit, and one whose
connection drops midway (a clear error; nothing half-received is kept).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import fedws as sy
import fedws.client.stream as stream
from fedws.launch import NodeProcess, start_node
from fedws.node.policy import DPRule, Policy
from fedws.protocol.codec import ObjRef
from fedws.protocol.messages import Kind
from tests.node.test_policy import SECRET, X_ID, Client, private_node


def _open(c: Client, sid: int, obj_id: int, *extra: Any) -> tuple[list[Any], list[Any]]:
    return c.send(Kind.CMD, "fedws.stream.open_read", [sid, obj_id, *extra], {}, [sid + 1])


def _read(c: Client, sid: int, offset: int, n: int, rid: int) -> tuple[list[Any], list[Any]]:
    values, errors = c.send(Kind.CMD, "fedws.stream.read", [sid, offset, n], {}, [rid])
    return (values, errors) if errors else c.send(Kind.GET, rid, True)


def test_a_stranger_cannot_open_or_read_anothers_tensor_by_ranges() -> None:
    node = private_node()
    a, b = Client(node, "lab-a", "a" * 32), Client(node, "lab-b", "b" * 32)
    t = torch.arange(1000, dtype=torch.float32)
    a.store(1, t)
    _, errors = _open(b, 50, 1, False)
    assert errors and errors[0][1]["type"] == "PermissionDeniedError"
    assert b.denied(Kind.GET, 51, True)  # the meta id holds the refusal
    a.ok(Kind.CMD, "fedws.stream.open_read", [60, 1, False], {}, [61])
    assert a.ok(Kind.GET, 61, True) == ["float32", [1000], False]
    _, errors = _read(b, 60, 0, 4000, 70)  # a's stream id means nothing in b's session
    assert errors and "no read stream" in errors[0][1]["message"]
    values, errors = _read(a, 60, 4, 8, 71)
    assert not errors and torch.equal(values[0].view(torch.float32), t[1:3])
    for bad in ([60, 3996, 8], [60, -4, 4], [60, 0, 0], [60, 0.0, 4], [60, 0, (16 << 20) + 1]):
        _, errors = a.send(Kind.CMD, "fedws.stream.read", bad, {}, [72])
        assert errors and errors[0][1]["type"] == "DecodeError", bad
    a.ok(Kind.CMD, "fedws.stream.close", [60], {}, [])
    _, errors = _read(a, 60, 0, 4, 73)
    assert errors and "no read stream" in errors[0][1]["message"]
    assert node.streams.open_count() == 0


def test_private_data_is_not_readable_by_ranges_and_a_dp_release_is_charged_once() -> None:
    node = private_node()
    a = Client(node, "lab-a", "a" * 32)
    a.cmd("torch.mul", [ObjRef(X_ID), 2.0], [10])  # computed from served data: private
    for target in (10, X_ID):
        _, errors = _open(a, 100 + target, target, False)
        assert errors and errors[0][1]["type"] == "PermissionDeniedError"
        _, errors = _read(a, 100 + target, 0, 4, 200)
        assert errors and "no read stream" in errors[0][1]["message"]
    _, errors = _open(a, 300, 10, False, "dp")  # no DP rule on this node
    assert errors and errors[0][1]["type"] == "PermissionDeniedError"
    assert node.streams.open_count() == 0

    pytest.importorskip("opacus")
    dp = private_node(Policy("private", dp=DPRule(max_norm=1.0, noise_multiplier=4.0, epsilon=2.0, delta=1e-5)))
    a = Client(dp, "lab-a", "a" * 32)
    a.cmd("Tensor.sum", [ObjRef(X_ID), 0], [10])
    _, errors = _open(a, 400, 10, False)  # a plain release is refused, as for get
    assert errors and errors[0][1]["type"] == "PermissionDeniedError"
    a.ok(Kind.CMD, "fedws.stream.open_read", [500, 10, False, "dp"], {}, [501])
    assert dp.accountant is not None
    spent = dp.accountant.spent("lab-a")
    first, _ = _read(a, 500, 0, 8, 502)
    again, _ = _read(a, 500, 0, 8, 503)  # reading a range again releases nothing more
    assert torch.equal(first[0], again[0]) and dp.accountant.spent("lab-a") == spent
    assert (first[0].view(torch.float32).abs() < 100).all()  # clipped and noised, not SECRET-sized
    assert SECRET not in first[0].view(torch.float32).tolist()


@pytest.fixture(scope="module")
def small_node() -> Iterator[NodeProcess]:
    node = start_node(id="tiny-reads", port=0, extra_args=["--max-frame-mb", "1", "--threads", "1"])
    try:
        yield node
    finally:
        node.stop()


def _connect(url: str) -> sy.WebsocketClientWorker:
    return sy.connect(url, hook=sy.TorchHook(torch, federation=sy.Federation()), timeout=30.0)


def test_a_get_over_the_frame_limit_reads_ranges_and_another_session_cannot(small_node: NodeProcess) -> None:
    w, stranger = _connect(small_node.url), _connect(small_node.url)
    try:
        t = torch.randn(3 << 18)  # 3 MiB: over the 1 MiB frame limit
        ptr = t.send(w)
        w.ping()  # stored before the stranger asks
        other = torch.zeros(1).send(stranger)
        other.id_at_location = ptr.id_at_location  # a forged pointer to w's tensor
        other.signature = ptr.signature
        with pytest.raises(sy.PermissionDeniedError):
            other.get()
        other.gotten = True  # the forged pointer owns nothing
        back = ptr.get()
        assert back.dtype == t.dtype and torch.equal(back, t)
        assert stored_objects(w) == 0  # the get removed it; the stream's ids are gone too
    finally:
        w.close()
        stranger.close()


def stored_objects(w: sy.WebsocketClientWorker) -> int:
    return len(w.list_objects_remote())


def test_a_get_whose_connection_drops_midway_raises_and_keeps_nothing(
    small_node: NodeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = _connect(small_node.url)
    t = torch.randn(1 << 20)  # 4 MiB: 16 ranges of 256 KiB
    ptr = t.send(w)
    w.ping()
    partial: list[weakref.ref[torch.Tensor]] = []
    take = stream._take

    def take_then_drop(flat: torch.Tensor, *args: Any) -> int:
        partial.append(weakref.ref(flat))
        n = take(flat, *args)
        if len(partial) == 2:
            w.link.close()  # the connection is gone with 14 of 16 ranges missing
        return n

    monkeypatch.setattr(stream, "_take", take_then_drop)
    with pytest.raises(sy.FedwsConnectionError, match=r"stopped after \d+ of 4194304 bytes \(nothing was kept\)"):
        ptr.get()
    gc.collect()
    assert partial and partial[0]() is None  # the half-filled tensor is gone
    assert not ptr.gotten
    monkeypatch.undo()
    w2 = _connect(small_node.url)  # the node serves on
    try:
        assert torch.equal(torch.arange(300_000).send(w2).get(), torch.arange(300_000))
    finally:
        w2.close()
