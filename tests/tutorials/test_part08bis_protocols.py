"""PySyft 0.2 tutorial "Part 8 bis - Introduction to Protocols", cell by cell.

The cells are the tutorial's, with ``import fedws as sy``; the workers come from
``make_worker`` (VirtualWorkers or real nodes). Moving a plan's output to the next step's
worker goes node to node, so the test first tells alice, bob and charlie where the others
are (a real node's operator lists its peers).

One cell differs: after ``protocol.send(james)`` PySyft ran the protocol *on james*, which
then drove alice, bob and charlie, so the result was a pointer (on james) to a pointer and
took two ``get()`` calls. A fedws node never issues commands to other nodes on its own:
``send(james)`` deploys every step on james, the run happens there, and one ``get()``
brings the value back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch as th

import fedws as sy


def test_part08bis_cells(hook: sy.TorchHook, make_worker: Callable[..., sy.Worker]) -> None:
    # IMPORTANT: Local worker should not be a client worker
    hook.local_worker.is_client_worker = False

    @sy.func2plan(args_shape=[(1,)])
    def inc1(x):
        return x + 1

    @sy.func2plan(args_shape=[(1,)])
    def inc2(x):
        return x + 1

    @sy.func2plan(args_shape=[(1,)])
    def inc3(x):
        return x + 1

    protocol = sy.Protocol([("worker1", inc1), ("worker2", inc2), ("worker3", inc3)])

    bob = make_worker("bob")  # sy.VirtualWorker(hook, id="bob")
    alice = make_worker("alice")  # sy.VirtualWorker(hook, id="alice")
    charlie = make_worker("charlie")  # sy.VirtualWorker(hook, id="charlie")
    for a in (alice, bob, charlie):  # the operators' peer lists
        for b in (alice, bob, charlie):
            if a is not b:
                a.add_worker(b)

    workers = alice, bob, charlie

    protocol.deploy(*workers)
    assert protocol.is_deployed

    # 2. Run a protocol
    x = th.tensor([1.0])
    ptr = protocol.run(x)
    assert ptr.location is charlie  # the last plan's worker
    assert ptr.get().tolist() == [4.0]

    james = make_worker("james")  # sy.VirtualWorker(hook, id="james")
    protocol.send(james)
    x = th.tensor([1.0]).send(james)
    ptr = protocol.run(x)
    # As you see the result is a pointer to james
    assert ptr.location is james
    ptr = ptr.get()
    assert ptr.tolist() == [4.0]  # PySyft needed a second get() here (see the module docstring)

    # 3. Search for a protocol
    protocol = sy.Protocol([("worker1", inc1), ("worker2", inc2), ("worker3", inc3)])
    protocol.tag('my_protocol')
    protocol.send(james)

    me = sy.hook.local_worker  # get access to me as a local worker
    assert me is hook.local_worker

    responses = me.request_search(['my_protocol'], location=james)
    assert len(responses) == 1
    ptr_protocol = responses[0]
    protocol_back = ptr_protocol.get()
    assert isinstance(protocol_back, sy.Protocol) and not protocol_back.is_deployed

    protocol_back.deploy(alice, bob, charlie)

    x = th.tensor([1.0])
    ptr = protocol_back.run(x)
    assert ptr.get().tolist() == [4.0]
