"""Nodes that dial out: ``fedws worker --connect URL`` processes and a coordinator that
listens (``sy.serve``). Everything an inbound node does works the same way; tokens are
checked in both directions; the node redials and keeps its objects within its grace.

Every node here is a real ``fedws worker`` process in its default (private) mode.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fedws as sy
from fedws.fl import FedAvg, FedAvgConfig, training_plan_digest
from fedws.launch import NodeProcess, start_node

TOKEN = "dial-out-token"
FEATURES, CLASSES = 8, 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(1234)) * 3
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return centers[y] + torch.randn(n, FEATURES, generator=g), y


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))


FEDAVG = FedAvgConfig(rounds=2, local_epochs=1, batch_size=16, lr=0.1, min_nodes=2, data_tags=("#train",))


def write_config(tmp: Path, node_id: str, seed: int) -> Path:
    x, y = blobs(60, seed)
    save_file({"x": x, "y": y}, str(tmp / f"{node_id}.safetensors"))
    digest = training_plan_digest(make_model(), FEDAVG, x_like=((FEATURES,), torch.float32), y_like=((), torch.int64))
    lines = [f'id = "{node_id}"']
    for key, tag in (("x", "#x"), ("y", "#y")):
        lines += ["[[data]]", f'file = "{node_id}.safetensors"', f'key = "{key}"', f'tags = ["#train", "{tag}"]']
    lines += ["[release]", f'approved_plans = ["{digest}"]']
    path = tmp / f"{node_id}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[sy.NodeListener, list[NodeProcess]]]:
    tmp = tmp_path_factory.mktemp("dialout")
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    listener = sy.serve("127.0.0.1", 0, token=TOKEN, hook=sy.TorchHook(torch, federation=sy.Federation()),
                        timeout=30.0)
    assert listener.url is not None
    nodes: list[NodeProcess] = []
    try:
        for i, name in enumerate(("alice", "bob")):
            nodes.append(start_node(write_config(tmp, name, i), connect=listener.url,
                                    extra_args=["--threads", "1", "--token-file", str(token_file)]))
        yield listener, nodes
    finally:
        for n in nodes:
            n.stop()
        listener.close()


def test_pointers_a_plan_and_fedavg_work_on_dial_out_nodes(federation: tuple[sy.NodeListener, list[NodeProcess]]) -> None:
    listener, nodes = federation
    alice, bob = listener.wait_for_nodes(2, timeout=30)
    assert (alice.id, bob.id) == ("alice", "bob") == tuple(n.id for n in nodes)
    assert alice.address == "dialout://alice"
    x = torch.tensor([1.0, 2.0, 3.0]).send(alice)
    assert torch.equal((x * 2 + 1).get(), torch.tensor([3.0, 5.0, 7.0]))

    @sy.func2plan(args_shape=[(3,)])
    def double(t: torch.Tensor) -> torch.Tensor:
        return t * 2

    y = torch.ones(3).send(bob)
    assert torch.equal(double.send(bob)(y).get(), torch.full((3,), 2.0))

    history = FedAvg(make_model(), [alice, bob], FEDAVG, test_data=blobs(100, 9), progress=False).fit()
    assert [r.nodes for r in history] == [["alice", "bob"]] * 2
    assert history[-1].test_accuracy is not None and history[-1].test_accuracy > 0.5

    (private,) = alice.search("#x")  # a private node: its served data never leaves
    with pytest.raises(sy.PermissionDeniedError):
        private.get()
    with pytest.raises(sy.OpNotAllowedError):  # relayed links go only to listed peers
        alice.add_worker(bob)


def test_nodes_redial_after_the_listener_restarts_and_keep_their_objects(
    federation: tuple[sy.NodeListener, list[NodeProcess]],
) -> None:
    listener, _ = federation
    alice, _bob = listener.wait_for_nodes(2, timeout=30)
    kept = torch.tensor([4.0, 5.0]).send(alice)
    alice.ping()
    port = listener.acceptor.port
    listener.close()  # every link drops; the nodes start redialling
    assert not alice.connected
    listener.start()
    assert listener.acceptor.port == port
    again = listener.wait_for_nodes(2, timeout=30)
    assert again[0] is alice  # the same worker: pointers made before the drop still work
    assert torch.equal(kept.get(), torch.tensor([4.0, 5.0]))


def test_a_node_with_the_wrong_token_is_refused_and_says_so(
    federation: tuple[sy.NodeListener, list[NodeProcess]], tmp_path: Path
) -> None:
    listener, _ = federation
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    assert listener.url is not None
    done = subprocess.run(
        [sys.executable, "-m", "fedws", "worker", "--id", "mallory", "--connect", listener.url,
         "--token-file", str(wrong)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "refused this node's token" in done.stderr
    assert "mallory" not in listener.federation.workers
