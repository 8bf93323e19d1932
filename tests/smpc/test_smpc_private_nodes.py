"""Secure computation on private ``fedws worker`` nodes (their default mode), end to end.

The coordinator's own values are shared and multiplied: the parties pull their triple
shares from the crypto provider in their own sessions (the share ids are the capability
``fedws.share`` grants). Data a node serves never leaves as shares either: its shares
are derived from it, private, and refused at the move.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fedws as sy
from fedws.launch import NodeProcess, start_node

TOKEN = "smpc-token"  # no token on the nodes: their open peer links present none (as in
# tests/e2e/test_security_policy.py); the policy is what this test probes

def _config(tmp_path: Path, node_id: str, data: bool = False) -> Path:
    lines = [f'id = "{node_id}"', "port = 0", "open_peers = true"]
    if data:
        save_file({"x": torch.tensor([4242, 7])}, str(tmp_path / f"{node_id}.safetensors"))
        lines += ["[[data]]", f'file = "{node_id}.safetensors"', 'key = "x"', 'tags = ["#x"]']
    path = tmp_path / f"{node_id}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_shares_and_triples_on_private_nodes(tmp_path: Path, one_torch_thread: None) -> None:
    nodes: list[NodeProcess] = []
    try:
        for name in ("bob", "alice", "carol"):
            nodes.append(start_node(_config(tmp_path, name, data=name == "bob"),
                                    extra_args=["--threads", "1"]))
        hook = sy.TorchHook(torch, federation=sy.Federation())
        bob, alice, carol = (sy.connect(n.url, TOKEN, hook=hook, timeout=30.0) for n in nodes)
        for a in (bob, alice, carol):
            for b in (bob, alice, carol):
                if a is not b:
                    a.add_worker(b)
        x = torch.tensor([25.5, -2.0]).fix_precision().share(bob, alice, crypto_provider=carol)
        y = torch.tensor([2.0, 3.25]).fix_precision().share(bob, alice, crypto_provider=carol)
        assert (x * y).get().float_precision().tolist() == [51.0, -6.5]
        assert (x > y).get().float_precision().tolist() == [1.0, 0.0]
        # a value of mine on bob, shared where it is
        mine = torch.tensor([1.5]).send(bob).fix_precision().share(bob, alice).get()
        assert mine.get().float_precision().tolist() == [1.5]
        # the data bob serves: its shares are private and do not move to alice
        (served,) = bob.search("#x")
        with pytest.raises(sy.PermissionDeniedError, match="private"):
            served.share(bob, alice, crypto_provider=carol)
        for w in (bob, alice, carol):
            w.close()
    finally:
        for n in nodes:
            n.stop()
