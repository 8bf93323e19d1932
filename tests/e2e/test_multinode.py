"""Many nodes in one process (``fedws worker`` with ``[[node]]`` tables, ``--nodes N``).

The isolation cases run twice over the same node configs: once as separate node processes
and once as logical nodes of one host process; a neighbour in the same process must be as
unreachable as a node in another process. Every node is private (the default).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fedws as sy
from fedws.fl import FedAvg, FedAvgConfig, training_plan_digest
from fedws.launch import NodeProcess, start_node
from fedws.node_config import load_configs
from fedws.node_host import NodeHost, node_configs
from fedws.protocol.messages import Kind
from fedws.transport.server import node_name

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FEATURES, CLASSES = 8, 3
SECRET = 4242.125
NAMES = ("alice", "bob", "carol")
FL = FedAvgConfig(rounds=1, local_epochs=1, batch_size=16, lr=0.1, min_nodes=3, data_tags=("#train",))


def token(name: str) -> str:
    return f"token-of-{name}"


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.ReLU(), nn.Linear(8, CLASSES))


def node_section(tmp: Path, name: str, seed: int, digest: str, table: str) -> str:
    """One node's keys; ``table`` is ``""`` (a file of its own) or ``"node."`` (a [[node]] table)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(48, FEATURES, generator=g), torch.randint(0, CLASSES, (48,), generator=g)
    x[0, 0] = SECRET
    save_file({"x": x, "y": y}, str(tmp / f"{name}.safetensors"))
    lines = [f'audit_log = "{name}-audit.jsonl"']
    for key, tag in (("x", "#x"), ("y", "#y")):
        lines += [f"[[{table}data]]", f'file = "{name}.safetensors"', f'key = "{key}"',
                  f'tags = ["#train", "{tag}", "#of-{name}"]']
    digest_of_token = hashlib.sha256(token(name).encode()).hexdigest()
    lines += [f"[[{table}tokens]]", 'principal = "lab"', f'sha256 = "{digest_of_token}"']
    lines += [f"[{table}release]", f'approved_plans = ["{digest}"]']
    return "\n".join(lines) + "\n"


@dataclass
class Nodes:
    how: str
    urls: dict[str, str]
    bare: str  # the URL without a path (one node's, for separate processes)
    audit_dir: Path

    def connect(self, name: str, as_: str | None = None) -> sy.Worker:
        fed = sy.TorchHook(torch, federation=sy.Federation())
        return sy.connect(self.urls[name], token(as_ or name), hook=fed, timeout=30.0)


@pytest.fixture(scope="module", params=["processes", "host"])
def nodes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    tmp = tmp_path_factory.mktemp(request.param)
    digest = training_plan_digest(make_model(), FL, x_like=((FEATURES,), torch.float32), y_like=((), torch.int64))
    started: list[NodeProcess] = []
    try:
        if request.param == "processes":  # two nodes are enough for the isolation cases
            configs = []
            for i, name in enumerate(NAMES[:2]):
                configs.append(tmp / f"{name}.toml")
                configs[-1].write_text(f'id = "{name}"\nport = 0\n' + node_section(tmp, name, i, digest, ""))
            with ThreadPoolExecutor(2) as pool:  # both import torch at once
                futures = [pool.submit(start_node, c, extra_args=["--threads", "1"]) for c in configs]
            failed = [f.exception() for f in futures if f.exception() is not None]
            started += [f.result() for f in futures if f.exception() is None]
            if failed:
                raise failed[0]  # type: ignore[misc]
            urls = {n.id: n.url for n in started}
            yield Nodes("processes", urls, urls["alice"], tmp)
        else:
            cfg = tmp / "host.toml"
            cfg.write_text("port = 0\n" + "".join(
                f'[[node]]\nid = "{name}"\n' + node_section(tmp, name, i, digest, "node.") for i, name in enumerate(NAMES)
            ))
            started.append(start_node(cfg, extra_args=["--threads", "1"]))
            base = started[-1].url
            yield Nodes("host", {name: f"{base}/{name}" for name in NAMES}, base, tmp)
    finally:
        for n in started:
            n.stop()


def test_each_node_answers_at_its_path_with_its_own_id(nodes: Nodes) -> None:
    for name in ("alice", "bob"):
        with nodes.connect(name) as w:
            assert w.id == name
            assert sorted(t for r in w.search("#train") for t in r.tags if t.startswith("#of-")) == [f"#of-{name}"] * 2
    fed = sy.TorchHook(torch, federation=sy.Federation())
    if nodes.how == "processes":  # the bare URL of a one-node process keeps working
        with sy.connect(nodes.bare, token("alice"), hook=fed) as w:
            assert w.id == "alice"
    else:
        with pytest.raises(sy.FedwsConnectionError, match="several nodes: add /NODE_ID"):
            sy.connect(nodes.bare, token("alice"), hook=fed)


def test_a_session_on_one_node_cannot_reach_a_neighbours_objects(nodes: Nodes) -> None:
    with nodes.connect("alice") as a, nodes.connect("bob") as b:
        theirs = torch.tensor([7.0, 8.0]).tag("#bobs").send(b)
        bid = theirs.id_at_location
        b.ping()
        with pytest.raises(sy.FedwsError) as err:  # read
            a.request(Kind.GET, bid, False)
        assert "7." not in str(err.value)
        a.submit(Kind.DELETE, [bid])  # delete: refused or a no-op, never bob's object
        a.ping()
        a.clear_objects_remote()
        assert a.search("#bobs") == [] and a.search("#of-bob") == []  # search
        assert bid not in {o["id"] for o in a.list_objects_remote()}  # list
        assert theirs.get().tolist() == [7.0, 8.0]  # intact on bob


def test_a_token_opens_only_its_own_node(nodes: Nodes) -> None:
    with pytest.raises(sy.AuthenticationError):
        nodes.connect("alice", as_="bob")


def test_unknown_and_hostile_paths_are_refused_at_the_handshake(nodes: Nodes) -> None:
    fed = sy.TorchHook(torch, federation=sy.Federation())
    with pytest.raises(sy.FedwsConnectionError, match="no node 'mallory'"):
        sy.connect(nodes.bare + "/mallory", token("alice"), hook=fed)
    for path in ("/alice/../bob", "/" + "a" * 5000, "/%2e%2e"):
        with pytest.raises(sy.FedwsConnectionError, match="malformed node path"):
            sy.connect(nodes.bare + path, token("alice"), hook=fed)
    with nodes.connect("alice") as a:  # and the node still serves
        assert a.ping() is not None


def test_node_names_are_bounded_and_plain() -> None:
    assert node_name("/") == "" and node_name("/alice") == "alice" and node_name("/alice/?x=1") == "alice"
    for bad in ("/a/b", "/..", "/.hidden", "/-x", "/a b", "/é", "/a%00", "/" + "a" * 65, "/" + "a" * 300):
        assert node_name(bad) is None, bad


def test_fedavg_and_pointers_across_three_nodes_of_one_host(nodes: Nodes) -> None:
    if nodes.how != "host":
        pytest.skip("three nodes live in the host only")
    workers = [nodes.connect(name) for name in NAMES]
    try:
        ptrs = [torch.full((2,), float(i)).send(w) for i, w in enumerate(workers)]
        assert [(p + 1).get().tolist() for p in ptrs] == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
        rounds = FedAvg(make_model(), workers, FL, progress=False).fit()
        assert rounds[0].nodes == list(NAMES)
    finally:
        for w in workers:
            w.close()
    for name in NAMES:  # each node's audit file has its own lines only, and no data value
        text = (nodes.audit_dir / f"{name}-audit.jsonl").read_text()
        assert {json.loads(line)["node"] for line in text.splitlines()} == {name}
        assert str(SECRET) not in text


def test_node_tables_and_nodes_n_make_one_config_per_node(tmp_path: Path) -> None:
    cfg = tmp_path / "host.toml"
    cfg.write_text('port = 0\npolicy = "private"\n[[node]]\nid = "a"\n[[node]]\nid = "b"\npolicy = "open"\n')
    a, b = load_configs(cfg)
    assert (a.id, a.policy, b.id, b.policy) == ("a", "private", "b", "open")
    for text, error in (
        ('[[node]]\nid = "a"\nport = 1\n', "top level"),
        ("[[node]]\npolicy = 'open'\n", "has no 'id'"),
        ('[[node]]\nid = "a"\n[[node]]\nid = "a"\n', "given twice"),
        ('[[node]]\nid = "a/b"\n', "cannot be a URL path"),
        ('[[node]]\nid = "a"\nbogus = 1\n', "unknown keys"),
    ):
        cfg.write_text(text)
        with pytest.raises(ValueError, match=error):
            NodeHost(load_configs(cfg))
    base = load_configs(tmp_path.joinpath("one.toml").write_text('id = "x"\n') and tmp_path / "one.toml")[0]
    assert [c.id for c in node_configs(base, 3, "site-")] == ["site-0", "site-1", "site-2"]
    with pytest.raises(ValueError, match="--nodes takes"):
        node_configs(base, 0)
