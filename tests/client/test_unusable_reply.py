"""A reply the coordinator cannot use fails that one request; the connection stays up.

The issue's repro: two nodes, bob known to another federation only. alice holds a pointer
to bob, and getting ``p2p + p2p`` from alice hands the coordinator a pointer to a worker it
does not know. That used to tear down the whole connection to alice.
"""

from __future__ import annotations

import pytest
import torch
from conftest import NodePool

import fedws as sy
from fedws.client.worker import Worker
from fedws.protocol.messages import Kind
from fedws.testing import MockLink, reply_bytes


def _worker(transport: str, hook: sy.TorchHook, name: str, request: pytest.FixtureRequest) -> sy.Worker:
    if transport == "virtual":
        return sy.VirtualWorker(hook, id=name)
    pool: NodePool = request.getfixturevalue("node_pool")
    w = sy.connect(pool.url(name), hook=hook, timeout=30.0)
    w.clear_objects_remote()
    request.addfinalizer(w.close)
    return w


def test_a_pointer_to_an_unknown_worker_fails_only_its_request(
    hook: sy.TorchHook, transport: str, request: pytest.FixtureRequest
) -> None:
    other = sy.TorchHook(torch, federation=sy.Federation())
    bob = _worker(transport, other, "bob", request)  # bob: known to the other federation only
    alice = _worker(transport, hook, "alice", request)
    alice.add_worker(bob)
    p2p = torch.tensor([1, 2, 3]).send(bob).send(alice)
    pending = torch.ones(2).send(alice) * 2  # in flight on the same link meanwhile
    with pytest.raises(sy.PointerError, match="does not know worker 'bob'"):
        (p2p + p2p).get()
    assert pending.get().tolist() == [2.0, 2.0]
    assert alice.connected
    assert (torch.tensor([5]).send(alice) + 1).get().tolist() == [6]


def test_an_undecodable_reply_fails_the_requests_of_its_frame_and_keeps_the_link() -> None:
    w = Worker(sy.Federation(), "bob", link=MockLink)
    link = w.link
    assert isinstance(link, MockLink)
    s1, f1 = w.submit(Kind.INFO, "count", want_value=True)
    s2, f2 = w.submit(Kind.INFO, "count", want_value=True)
    assert len(link.frames) == 2  # each waited-on request leaves at once
    link.reply_raw(b"\x00\x01 garbage")
    assert f1 is not None and f2 is not None
    with pytest.raises(sy.ProtocolError, match="unreadable reply"):
        f1.result(0)
    assert not f2.done() and link.connected
    link.reply(s2, [[s2, 3]])
    assert f2.result(0) == 3
    assert link.requests()[0] == [Kind.INFO, s1, "count"]
    assert reply_bytes(1) == reply_bytes(1, [], [])
