"""The private policy against real nodes on 127.0.0.1: identities, isolation, private data,
release rules, FedAvg under the policy, the audit log.

Every node here is a ``fedws worker`` process in its default (private) mode.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fedws as sy
from fedws.fl import FedAvg, FedAvgConfig, training_plan_digest
from fedws.launch import NodeProcess, start_node
from fedws.protocol.codec import ObjRef
from fedws.protocol.ids import new_id
from fedws.protocol.messages import Kind

TOKEN = "s3cret-token"
SECRET = 4242.125
FEATURES, CLASSES = 8, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(1234)) * 3
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = centers[y] + torch.randn(n, FEATURES, generator=g)
    x[0, 0] = SECRET
    return x, y


def write_config(
    tmp_path: Path, node_id: str, *, seed: int = 0, data: bool = True, extra: str = "", open_peers: bool = False
) -> Path:
    lines = [f'id = "{node_id}"', "port = 0", f'audit_log = "{node_id}-audit.jsonl"']
    if open_peers:  # links to any node (a development setting): what these tests probe is privacy
        lines.append("open_peers = true")
    if data:
        x, y = blobs(60, seed)
        save_file({"x": x, "y": y}, str(tmp_path / f"{node_id}.safetensors"))
        for key, tag in (("x", "#x"), ("y", "#y")):
            lines += ["[[data]]", f'file = "{node_id}.safetensors"', f'key = "{key}"',
                      f'tags = ["#train", "{tag}"]', f'description = "patient {key} (private)"']
    path = tmp_path / f"{node_id}.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def node(config: Path | None = None, **kwargs: Any) -> NodeProcess:
    return start_node(config, extra_args=["--threads", "1", "--token", TOKEN], **kwargs)


def connect(n: NodeProcess, token: str = TOKEN) -> sy.Worker:
    return sy.connect(n.url, token, hook=sy.TorchHook(torch, federation=sy.Federation()), timeout=30.0)


def error_of(worker: sy.Worker, seq: int) -> Exception | None:
    worker.ping()
    return worker.session.error_of(seq)


def test_two_coordinators_with_the_same_token_cannot_touch_each_others_objects() -> None:
    n = node(id="alice", port=0)
    try:
        with connect(n) as a, connect(n) as b:
            w = torch.tensor([1.0, 2.0, 3.0]).send(a)
            model = nn.Linear(2, 2).send(a)  # type: ignore[operator]
            weight = model.weight.id_at_location
            wid = w.id_at_location
            a.ping()  # both exist before B tries
            with pytest.raises(sy.PermissionDeniedError, match="belongs to another session"):
                b.request(Kind.GET, wid, False)
            for op, args in (
                ("Tensor.add_", [ObjRef(wid), 100.0]),  # poison A's tensor in place
                ("fedws.set_data", [ObjRef(weight), torch.zeros(7)]),  # reshape A's weight
                ("torch.ones", [2]),  # a result written over A's id ...
            ):
                seq, _ = b.submit(Kind.CMD, op, args, {}, [wid] if op == "torch.ones" else [])
                assert isinstance(error_of(b, seq), sy.PermissionDeniedError), op
            seq, _ = b.submit(Kind.CMD, "Tensor.mm", [torch.ones(2, 3), torch.ones(2, 3)], {}, [wid])
            assert error_of(b, seq) is not None  # ... and a failure recorded over it: not recorded
            seq, _ = b.submit(Kind.DELETE, [wid, weight])
            assert isinstance(error_of(b, seq), sy.PermissionDeniedError)
            b.clear_objects_remote()
            assert b.objects_count_remote() == 0 and b.list_objects_remote() == []
            assert b.search() == []
            # A's data is intact, A's link still works, A sees its own objects
            assert a.objects_count_remote() == 3
            assert w.get().tolist() == [1.0, 2.0, 3.0]
            assert model.weight.shape == (2, 2)
            assert model.get().weight.shape == (2, 2)  # type: ignore[operator]
    finally:
        n.stop()


def test_tokens_name_principals_hashed_at_rest(tmp_path: Path) -> None:
    (tmp_path / "lab-b.token").write_text("token-of-lab-b\n")
    digest = hashlib.sha256(b"token-of-lab-a").hexdigest()
    cfg = write_config(tmp_path, "alice", data=False, extra=(
        f'[[tokens]]\nprincipal = "lab-a"\nsha256 = "{digest}"\n'
        '[[tokens]]\nprincipal = "lab-b"\ntoken_file = "lab-b.token"\n'
    ))
    assert "token-of-lab-a" not in cfg.read_text()
    n = start_node(cfg, extra_args=["--threads", "1"])
    try:
        with pytest.raises(sy.AuthenticationError):
            sy.connect(n.url, "wrong", hook=sy.TorchHook(torch, federation=sy.Federation()))
        with connect(n, "token-of-lab-a") as a, connect(n, "token-of-lab-b") as b:
            w = torch.tensor([5.0]).send(a)
            w.wait()
            with pytest.raises(sy.PermissionDeniedError):
                b.request(Kind.GET, w.id_at_location, False)
            assert isinstance(a, sy.WebsocketClientWorker)
            a.link.io.loop.call_soon_threadsafe(a.link._ws.transport.abort)  # type: ignore[union-attr]
            with pytest.raises(sy.ConnectionLostError):
                a.ping(timeout=10)
            a.reconnect()  # the same session key: A gets its objects back
            assert w.get().tolist() == [5.0]
        log = [json.loads(line) for line in (tmp_path / "alice-audit.jsonl").read_text().splitlines()]
        assert {r["principal"] for r in log if r["event"] == "connect"} == {"lab-a", "lab-b"}
    finally:
        n.stop()


def test_private_data_cannot_leave_by_any_op_or_chain(tmp_path: Path) -> None:
    # No token on these two: their open peer links present none (listed peers are
    # tests/e2e/test_network_attacks.py's subject); privacy is what this test probes.
    bob = start_node(write_config(tmp_path, "bob", data=False, open_peers=True), extra_args=["--threads", "1"])
    alice = start_node(write_config(tmp_path, "alice", open_peers=True), extra_args=["--threads", "1"])
    try:
        with connect(alice) as a, connect(bob) as b:
            a.add_worker(b)
            b.add_worker(a)
            (x,) = a.search("#x")
            assert x.shape == (60, FEATURES)
            listing = a.list_objects_remote()  # the catalogue: metadata, never values
            assert {d["description"] for d in listing} == {"patient x (private)", "patient y (private)"}
            attempts = {
                "get": lambda: x.get(),
                "x + 0": lambda: (x + 0).get(),
                "x[0:1]": lambda: x[0:1].get(),
                "sum": lambda: x.sum().get(),
                "dp without a dp rule": lambda: (x * 1).get(dp=True),
                "move": lambda: x.move(b),
                "move derived": lambda: (x * 1).move(b),
                "pointer to pointer": lambda: x[0:5].send(b),
            }
            for what, attempt in attempts.items():
                with pytest.raises(sy.PermissionDeniedError):
                    attempt()
                    pytest.fail(f"{what} leaked")
            # a pointer chain built by hand, without the owner's share: bob's node asks alice
            chain_id = new_id()
            b.store(x, obj_id=chain_id)
            seq, _ = b.submit(Kind.CMD, "fedws.remote_get", [chain_id], {}, [])
            assert isinstance(error_of(b, seq), sy.RemoteError)
            # in place into my own tensor, then get
            w = torch.zeros(1, FEATURES).send(a)
            w.add_(x[0:1])
            with pytest.raises(sy.PermissionDeniedError):
                w.get()
            # the data is read-only and stays
            seq, _ = a.submit(Kind.CMD, "Tensor.mul_", [ObjRef(x.id_at_location), 0.0], {}, [])
            assert isinstance(error_of(a, seq), sy.PermissionDeniedError)
            a.clear_objects_remote()
            assert len(a.search("#x")) == 1
            # computation works, and a public value of mine still leaves
            mean = x.mean()
            assert mean.shape == ()
            assert torch.tensor([7.0]).send(a).get().tolist() == [7.0]
        text = (tmp_path / "alice-audit.jsonl").read_text()
        assert '"event": "refuse"' in text and str(SECRET) not in text
    finally:
        alice.stop()
        bob.stop()


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def test_fedavg_and_trusted_aggregator_run_on_private_nodes_with_the_plan_approved(tmp_path: Path) -> None:
    cfg = FedAvgConfig(rounds=2, local_epochs=1, batch_size=16, lr=0.1, min_nodes=2, data_tags=("#train",))
    digest = training_plan_digest(make_model(), cfg, x_like=((FEATURES,), torch.float32), y_like=((), torch.int64))
    release = f'[release]\napproved_plans = ["{digest}"]\n'
    nodes = [node(write_config(tmp_path, name, seed=i, extra=release)) for i, name in enumerate(["alice", "bob"])]
    peers = "".join(f'[[peers]]\nid = "{name}"\nurl = "{n.url}"\ntoken = "{TOKEN}"\n' for name, n in zip(["alice", "bob"], nodes))
    secure = node(write_config(tmp_path, "secure", data=False, extra=peers))  # it pulls the updates from its listed peers
    try:
        workers = [connect(n) for n in nodes]
        aggregator = connect(secure)
        test = blobs(200, 99)
        plain = FedAvg(make_model(), workers, cfg, test_data=test, progress=False).fit()
        assert [r.nodes for r in plain] == [["alice", "bob"]] * 2
        trusted = FedAvg(make_model(), workers, cfg, test_data=test, aggregator=aggregator, progress=False).fit()
        assert [r.nodes for r in trusted] == [["alice", "bob"]] * 2
        assert trusted[-1].test_accuracy == pytest.approx(plain[-1].test_accuracy, abs=0.02)
        # another plan (another architecture) is not approved: nothing it computes leaves
        with pytest.raises(sy.RoundFailedError, match="PermissionDeniedError"):
            other = nn.Sequential(nn.Linear(FEATURES, CLASSES))
            FedAvg(other, workers, cfg, progress=False).fit()
        for w in [*workers, aggregator]:
            w.close()
        log = [json.loads(line) for line in (tmp_path / "alice-audit.jsonl").read_text().splitlines()]
        runs = [r for r in log if r["event"] == "run_plan"]
        assert runs and all(r["plan"] == digest and r["approved"] for r in runs[:4])
        assert any(r["event"] == "release" and r["bytes"] > 0 for r in log)
        assert any(r["event"] == "refuse" for r in log)
        assert str(SECRET) not in (tmp_path / "alice-audit.jsonl").read_text()
    finally:
        for n in [*nodes, secure]:
            n.stop()


def test_dp_release_with_a_budget_on_a_real_node(tmp_path: Path) -> None:
    pytest.importorskip("opacus")
    dp = "[release.dp]\nmax_norm = 1.0\nnoise_multiplier = 4.0\nepsilon = 1.5\ndelta = 1e-5\n"
    n = node(write_config(tmp_path, "alice", extra=dp))
    try:
        with connect(n) as a:
            (x,) = a.search("#x")
            first = x.sum(0).get(dp=True)  # epsilon 1.01
            assert first.shape == (FEATURES,) and first.abs().max() < 100  # clipped + noised
            second = x.sum(0).get(dp=True)  # epsilon 1.48
            assert not torch.equal(first, second)
            with pytest.raises(sy.PrivacyBudgetExceededError):
                x.sum(0).get(dp=True)  # 1.85 > 1.5
            with pytest.raises(sy.PermissionDeniedError):
                x.sum(0).get()  # a plain get of a private value: never
        log = (tmp_path / "alice-audit.jsonl").read_text()
        assert log.count('"rule": "dp"') == 2
    finally:
        n.stop()


def test_operator_reviews_and_approves_a_plan_with_fedws_plan(tmp_path: Path) -> None:
    from fedws.cli import main

    @sy.func2plan(args_shape=[(-1, FEATURES)])
    def column_means(x: torch.Tensor) -> torch.Tensor:
        return x.mean(0)

    digest = column_means.signature.code.digest(column_means.state_tensors)
    cfg = write_config(tmp_path, "alice")
    for approved in (False, True):
        n = node(cfg)
        try:
            with connect(n) as a:
                (x,) = a.search("#x")
                means = column_means.send(a)(x)
                if approved:
                    assert means.get().shape == (FEATURES,)
                else:
                    with pytest.raises(sy.PermissionDeniedError):
                        means.get()
        finally:
            n.stop()
        if not approved:  # the operator reviews what arrived, then approves it
            audit = str(tmp_path / "alice-audit.jsonl")
            assert main(["plan", "show", audit]) == 0
            assert main(["plan", "show", audit, digest[:12]]) == 0
            assert main(["plan", "approve", digest, "--config", str(cfg)]) == 0
            assert main(["plan", "approve", "nothex", "--config", str(cfg)]) == 2
    from fedws.plan_admin import show
    assert "def column_means(arg_1):" in show(tmp_path / "alice-audit.jsonl", digest[:12])
    assert digest in cfg.read_text()
