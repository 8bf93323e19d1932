"""Attacks on and through the network, against real nodes on 127.0.0.1 (issue 9).

Each test failed on the commit before the fix it proves: a node that opens links for
anyone, handshakes that starve honest coordinators, ``sy.connect`` leaking websockets'
exceptions, and pointers reporting success for work a killed node never ran.
"""

from __future__ import annotations

import asyncio
import os
import signal
from urllib.parse import urlsplit

import pytest
import torch

import fedws as sy
from fedws.launch import start_node

# -- no silent lies after the link is lost ------------------------------------------------


def test_commands_a_killed_node_never_ran_never_report_success(hook: sy.TorchHook) -> None:
    """After ``kill -9``, wait()/await/future() of every unacknowledged command raise
    ConnectionLostError, also when asked after the loss and after a reconnect."""
    n = start_node(id="doomed", port=0, extra_args=["--threads", "1"])
    restarted = None
    try:
        w = sy.connect(n.url, hook=hook, timeout=30)
        x = torch.randn(400, 400).send(w)
        y = x
        results = []
        for _ in range(60):  # a dependent chain: seconds of work, far from done at the kill
            y = y.mm(x).tanh()
            results.append(y)
        last = results[-1].future()
        os.kill(n.pid, signal.SIGKILL)
        with pytest.raises(sy.ConnectionLostError):
            last.result(10)
        # asked after the loss: none of the unacknowledged commands may look done
        lost = [r for r in results if _fails(r.wait)]  # (pointers compare remotely: no `in`)
        assert lost and lost[-1] is results[-1] and len(lost) >= len(results) // 2
        for r in lost:
            with pytest.raises(sy.ConnectionLostError):
                r.future().result(0)

            async def awaited(r: sy.PointerTensor = r) -> None:
                await r

            with pytest.raises(sy.ConnectionLostError):
                asyncio.run(awaited())
        # a node comes back on the same address; the lost commands stay lost
        port = urlsplit(n.url).port
        restarted = start_node(id="doomed", port=port)
        w.reconnect()
        assert (torch.ones(2).send(w) + 1).get().tolist() == [2.0, 2.0]
        for r in lost:
            with pytest.raises(sy.ConnectionLostError):
                r.wait(timeout=5)
        w.close()
    finally:
        n.stop()
        if restarted is not None:
            restarted.stop()


def _fails(call: object) -> bool:
    try:
        call(timeout=5)  # type: ignore[operator]
    except sy.ConnectionLostError:
        return True
    return False
