"""Sans-I/O: ``Node.end_session`` frees what a session left, except durable objects and
served data, and never another session's objects."""

from __future__ import annotations

import torch
from test_policy import Client  # one test client for the policy tests

from fedws.node import Node
from fedws.node.policy import Policy
from fedws.protocol.codec import ObjRef
from fedws.protocol.messages import Kind

X_ID, Y_ID = 1000, 1001  # served data


def private_node() -> Node:
    node = Node("alice", policy=Policy("private"))
    node.serve(X_ID, torch.ones(1000), ["#x"], "patient features")
    node.serve(Y_ID, torch.ones(2), ["#y"], "labels")
    return node


def test_end_session_frees_the_sessions_objects_but_not_durable_served_or_others() -> None:
    node = private_node()
    served_bytes = node.store.nbytes
    a = Client(node, "lab-a", "a" * 32)
    b = Client(node, "lab-a", "b" * 32)  # same principal, another session
    a.store(1, torch.ones(1000))
    a.cmd("torch.add", [ObjRef(1), 1.0], [2])
    a.cmd("torch.mul", [ObjRef(X_ID), 2.0], [3])  # derived from served data (private)
    a.store(4, torch.ones(10))
    a.cmd("fedws.persist", [4], [])
    b.store(5, torch.ones(7))
    b.denied(Kind.CMD, "fedws.persist", [1], {}, [])  # only the owner makes it durable
    b.denied(Kind.CMD, "fedws.persist", [X_ID], {}, [])  # served data is the node's
    held = node.store.nbytes

    freed, nbytes = node.end_session(a.caller)

    assert freed == 3 and nbytes == 3 * 4000  # ids 1, 2 and 3
    assert node.store.nbytes == held - nbytes
    assert set(node.store.objects) == {X_ID, Y_ID, 4, 5}
    assert node.store.nbytes == served_bytes + 40 + 28
    # the durable object stays the session's: a reconnect with the same key reaches it
    again = Client(node, "lab-a", "a" * 32)
    assert again.caller is a.caller
    assert again.get(4).tolist() == [1.0] * 10
    # deleting a durable object frees it as usual
    again.ok(Kind.DELETE, [4])
    assert 4 not in node.store.durable
    assert b.get(5).shape == (7,)


def test_a_session_that_kept_nothing_is_forgotten() -> None:
    node = private_node()
    a = Client(node, "lab-a", "a" * 32)
    a.store(1, torch.ones(3))
    assert node.end_session(a.caller) == (1, 12)
    again = Client(node, "lab-a", "a" * 32)
    assert again.caller is not a.caller  # a fresh session: nothing of the old one is reachable
    assert again.ok(Kind.INFO, "count") == 2  # the served data only


def test_open_node_frees_nothing() -> None:
    node = Node("alice", policy=Policy("open"))
    a = Client(node, "lab-a", "a" * 32)
    a.store(1, torch.ones(3))
    a.cmd("fedws.persist", [1], [])  # accepted, a no-op
    assert node.end_session(a.caller) == (0, 0)
    assert 1 in node.store.objects
