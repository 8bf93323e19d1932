"""The Link contract, run over every link: in-process, WebSocket (a real node process on
127.0.0.1) and the public mock link of ``fedws.testing`` (answered by a Node in this test).

Written against the Worker surface (submit, ack_future, request), so the mock can be
answered between sending and waiting: ordering, close, loss of the link failing every
pending call at once, reconnect reaching surviving objects, and the borrowed-buffer flush.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import fedws as sy
from fedws.client.worker import Worker
from fedws.launch import NodeProcess, start_node
from fedws.node import Node
from fedws.protocol.codec import ObjRef
from fedws.protocol.ids import new_id
from fedws.protocol.messages import Kind
from fedws.testing import MockLink

LINKS = ["inproc", "websocket", "mock"]


@dataclass
class Harness:
    """One worker on the link under test, and how to play the other side."""

    kind: str
    worker: Worker
    reconnect: Callable[[], Worker]
    pump: Callable[[], None] = lambda: None  # the mock answers only when pumped
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def result(self, fut: Any, timeout: float = 30.0) -> Any:
        self.pump()
        return fut.result(timeout)


@pytest.fixture(scope="module")
def shared_node() -> Iterator[NodeProcess]:
    n = start_node(id="contract", port=0, extra_args=["--threads", "1"])
    try:
        yield n
    finally:
        n.stop()


def _mock_harness(hook: sy.TorchHook) -> Harness:
    node = Node("mockbob")
    worker = Worker(hook, "mockbob", link=MockLink)
    answered = [0]

    def pump() -> None:
        link = worker.link
        assert isinstance(link, MockLink)
        while answered[0] < len(link.frames):
            frame = link.frames[answered[0]]
            answered[0] += 1
            link.reply_raw(b"".join(node.handle(frame)))

    def reconnect() -> Worker:
        worker.link = MockLink(worker.endpoint)
        answered[0] = 0
        worker.session.reset()
        return worker

    return Harness("mock", worker, reconnect, pump)


def _harness(kind: str, hook: sy.TorchHook, request: pytest.FixtureRequest) -> Harness:
    if kind == "inproc":
        owner = sy.VirtualWorker(sy.TorchHook(torch, federation=sy.Federation()), id="inbob")
        worker = sy.connect("inproc://inbob", hook=hook)
        h = Harness(kind, worker, lambda: sy.connect("inproc://inbob", hook=hook))
        h.cleanup.append(lambda: owner.node)  # keeps the node alive for the test
        return h
    if kind == "websocket":
        node: NodeProcess = request.getfixturevalue("shared_node")
        worker = sy.connect(node.url, hook=hook, timeout=30.0)
        worker.clear_objects_remote()

        def reconnect() -> Worker:
            assert isinstance(worker, sy.WebsocketClientWorker)
            return worker.reconnect()

        h = Harness(kind, worker, reconnect)
        h.cleanup.append(worker.close)
        return h
    return _mock_harness(hook)


@pytest.fixture(params=LINKS)
def harness(request: pytest.FixtureRequest, hook: sy.TorchHook) -> Iterator[Harness]:
    h = _harness(request.param, hook, request)
    try:
        yield h
    finally:
        for fn in h.cleanup:
            fn()


def _store(w: Worker, value: Any) -> int:
    obj_id = new_id()
    w.store(value, obj_id=obj_id)
    return obj_id


def _get(h: Harness, obj_id: int) -> Any:
    _, fut = h.worker.submit(Kind.GET, obj_id, False, want_value=True)
    return h.result(fut)


def test_commands_run_in_the_order_they_were_sent(harness: Harness) -> None:
    w = harness.worker
    cur = _store(w, torch.zeros(1))
    for i in range(200):
        nxt = new_id()
        op = "torch.add" if i % 2 else "Tensor.__mul__"
        w.submit(Kind.CMD, op, [ObjRef(cur), 1 if i % 2 else 2], {}, [nxt])
        cur = nxt
    value = _get(harness, cur)
    expected = 0.0
    for i in range(200):
        expected = expected + 1 if i % 2 else expected * 2
    assert value.item() == expected
    assert w.link.connected and w.address is not None


def test_close_fails_later_calls_with_connection_lost(harness: Harness) -> None:
    w = harness.worker
    obj = _store(w, torch.ones(2))
    assert _get(harness, obj).tolist() == [1.0, 1.0]
    w.close()
    assert not w.link.connected
    with pytest.raises(sy.ConnectionLostError):
        w.submit(Kind.PING, want_value=True)
    w.close()  # twice is fine


def test_link_loss_fails_every_pending_call_at_once(harness: Harness, hook: sy.TorchHook) -> None:
    kind = harness.kind
    node: NodeProcess | None = None
    w = harness.worker
    if kind == "websocket":  # a node of its own, killed by its PID
        node = start_node(id="doomed", port=0, extra_args=["--threads", "1"])
        w = sy.connect(node.url, hook=hook, timeout=30.0)
    try:
        x = _store(w, torch.randn(400, 400))
        seqs = []
        for _ in range(20):  # enough work to still be pending when the link goes
            seqs.append(w.submit(Kind.CMD, "Tensor.mm", [ObjRef(x), ObjRef(x)], {}, [new_id()])[0])
        _, value = w.submit(Kind.INFO, "count", want_value=True)
        acks = [w.ack_future(s) for s in seqs]
        if kind == "websocket":
            assert node is not None
            os.kill(node.pid, signal.SIGKILL)
        elif kind == "mock":
            assert isinstance(w.link, MockLink)
            w.link.drop()
        else:
            w.link.close()
        pending = [f for f in [*acks, value] if f is not None]
        if kind == "inproc":  # in process nothing is ever pending: all ran before the loss
            assert all(f.done() and f.exception() is None for f in pending)
        else:
            for fut in pending:
                with pytest.raises(sy.ConnectionLostError):
                    fut.result(30)
        with pytest.raises(sy.ConnectionLostError):
            w.request(Kind.PING, timeout=30)  # known to be gone: no hang
    finally:
        if node is not None:
            node.stop()


def test_reconnect_reaches_surviving_objects(harness: Harness) -> None:
    w = harness.worker
    kept = _store(w, torch.arange(4))
    harness.result(w.ack_future(w.session.last_seq))
    if harness.kind == "websocket":
        assert isinstance(w, sy.WebsocketClientWorker)
        ws = w.link._ws
        assert ws is not None
        w.link.io.loop.call_soon_threadsafe(ws.transport.abort)  # the network drops the link
        with pytest.raises(sy.ConnectionLostError):
            w.ping(timeout=10)
    else:
        w.close()
    again = harness.reconnect()
    harness.worker = again
    if harness.kind == "websocket":
        harness.cleanup.append(again.close)
    assert _get(harness, kept).tolist() == [0, 1, 2, 3]


def test_a_borrowed_buffer_is_written_before_submit_returns(harness: Harness) -> None:
    w = harness.worker
    big = torch.ones(2**19)  # 2 MiB: sent from the tensor's own memory
    obj = new_id()
    seq, _ = w.submit(Kind.STORE, obj, big, [], None)
    assert not w.session.has_outgoing()  # taken and written, not queued
    big.fill_(5.0)  # changing it now must not change what the node got
    assert _get(harness, obj).sum().item() == 2**19
    assert w.error_of(seq) is None


def test_connect_inproc_opens_a_second_session_to_a_node_in_this_process(hook: sy.TorchHook) -> None:
    bob = sy.VirtualWorker(hook, id="bob")
    x = torch.tensor([1.0, 2.0]).tag("#shared").send(bob)
    other_hook = sy.TorchHook(torch, federation=sy.Federation())
    second = sy.connect("inproc://bob", hook=other_hook)
    assert second is not bob and second.id == "bob" and second.address == "inproc://bob"
    assert other_hook.workers["bob"] is second
    found = second.search("#shared")
    assert len(found) == 1 and found[0].get().tolist() == [1.0, 2.0]
    assert len(bob._objects) == 0  # the second session's get took it off the node
    del x
    with pytest.raises(sy.FedwsConnectionError, match="nobody"):
        sy.connect("inproc://nobody", hook=hook)
    with pytest.raises(sy.FedwsConnectionError, match="'bob', not 'alice'"):
        sy.connect("inproc://bob", hook=hook, id="alice")


async def test_connect_async_inproc(hook: sy.TorchHook) -> None:
    carol = sy.VirtualWorker(hook, id="carol")
    carol.store(torch.ones(1), obj_id=5)
    async with await sy.connect_async("inproc://carol", hook=sy.TorchHook(torch, federation=sy.Federation())) as w:
        assert (await w.request_async(Kind.GET, 5, False)).tolist() == [1.0]


@pytest.mark.parametrize("url", ["ftp://x", "inproc://", "localhost:8777", "ws://"])
def test_malformed_urls_are_value_errors(hook: sy.TorchHook, url: str) -> None:
    with pytest.raises(ValueError):
        sy.connect(url, hook=hook)


def test_latest_inproc_node_of_a_name_wins(hook: sy.TorchHook) -> None:
    sy.VirtualWorker(hook, id="dave").store(torch.zeros(1), obj_id=1)
    newer = sy.VirtualWorker(sy.TorchHook(torch, federation=sy.Federation()), id="dave")
    newer.store(torch.ones(1), obj_id=1)
    handle = sy.connect("inproc://dave", federation=sy.Federation())
    assert handle.request(Kind.GET, 1, False).tolist() == [1.0]
