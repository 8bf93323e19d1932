"""A node frees what a session left once it ended, after a grace period (real nodes).

A session ends when its last connection closes (or is lost); its objects are freed
``--session-grace`` seconds later unless the same handle reconnects first. Objects the owner
made durable (``ptr.persist()``) and the data the node serves stay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import torch

import fedws as sy
from fedws.launch import NodeProcess, start_node
from fedws.protocol.messages import Kind

N = 25_000  # floats: 100 kB per tensor


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def short_grace() -> Iterator[NodeProcess]:
    n = start_node(id="alice", port=0, extra_args=["--threads", "1", "--session-grace", "0.5"])
    try:
        yield n
    finally:
        n.stop()


def connect(n: NodeProcess) -> sy.Worker:
    return sy.connect(n.url, hook=sy.TorchHook(torch, federation=sy.Federation()), timeout=30.0)


def held(w: sy.Worker) -> int:
    """Bytes the whole node holds (every session's)."""
    return int(w.request(Kind.INFO, "nbytes"))


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_objects_of_a_closed_session_are_freed_after_the_grace_period(short_grace: NodeProcess) -> None:
    with connect(short_grace) as other:
        base = held(other)
        a = connect(short_grace)
        ptrs = [torch.ones(N).send(a) for _ in range(4)]
        ptrs.append(ptrs[0] + 1)  # computed on the node: owned by the session too
        a.ping()
        assert held(other) >= base + 5 * 4 * N
        a.close()  # the coordinator goes away; its pointers never send their deletes
        assert wait_until(lambda: held(other) <= base), f"{held(other)} bytes still held"
        assert other.objects_count_remote() == 0
        del ptrs


def test_a_session_ends_when_its_last_connection_closes(short_grace: NodeProcess) -> None:
    with connect(short_grace) as other:
        base = held(other)
        a = connect(short_grace)
        x = torch.ones(N).send(a)
        a.ping()
        a2 = connect(short_grace)
        a2.link.session_key = a.link.session_key  # type: ignore[attr-defined]
        a2.reconnect()  # a second connection of the same session
        a.close()
        time.sleep(1.0)  # past the grace period: the session still has a connection
        assert held(other) >= base + 4 * N
        a2.close()
        assert wait_until(lambda: held(other) <= base)
        del x


def test_a_durable_object_survives_the_end_of_its_session(short_grace: NodeProcess) -> None:
    with connect(short_grace) as other:
        base = held(other)
        a = connect(short_grace)
        keep = torch.arange(float(N)).send(a).persist()
        drop = torch.ones(N).send(a)
        keep.wait()
        a.close()
        assert wait_until(lambda: held(other) <= base + 4 * N)  # `drop` freed, `keep` held
        assert held(other) == base + 4 * N
        a.reconnect()  # the same handle (session key) reaches its durable object again
        try:
            assert torch.equal(keep.get(), torch.arange(float(N)))
            assert held(other) == base
        finally:
            a.close()
        del drop


def test_a_reconnect_within_the_grace_period_keeps_the_objects() -> None:
    grace = 2.0
    n = start_node(id="bob", port=0, extra_args=["--threads", "1", "--session-grace", str(grace)])
    try:
        with connect(n) as a:
            x = torch.arange(5.0).send(a)
            a.ping()
            closed = time.monotonic()
            a.reconnect()
            assert time.monotonic() - closed < grace, "reconnect took longer than the grace period"
            # Wait past the grace period that began when the first connection closed: the
            # timer, had it not been cancelled by the reconnect, would have fired by now.
            time.sleep(max(0.0, closed + grace + 0.5 - time.monotonic()))
            assert x.get().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    finally:
        n.stop()
