"""Differential privacy: the node command, local and central DP-FedAvg, the accountant,
DP-SGD, and DP under a private node's release policy (a real ``fedws worker`` process)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fedws as sy
from fedws.fl import DPConfig, FedAvg, FedAvgConfig, dp_sgd_step
from fedws.fl.dp import Privacy, central_dp_average, clip_update, epsilon_for, update_norm
from fedws.launch import start_node
from fedws.node import Node
from fedws.node.policy import DPRule, Policy
from fedws.protocol.codec import ObjRef, decode, encode_bytes
from fedws.protocol.ids import new_id
from fedws.protocol.messages import Kind

pytest.importorskip("opacus")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FEATURES, CLASSES = 8, 3
OP = "fedws.dp.clip_and_noise"


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(1234)) * 3
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return centers[y] + torch.randn(n, FEATURES, generator=g), y


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def release(worker: sy.Worker, ptrs: list[Any], clip: float, z: float, reference: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Run the node command on ``ptrs`` and fetch its results."""
    ids = [new_id() for _ in ptrs]
    worker.submit(Kind.CMD, OP, [[ObjRef(p.id_at_location) for p in ptrs], clip, z, reference], {}, ids)
    return [worker.request(Kind.GET, i, True) for i in ids]


# -- the node command, both transports ------------------------------------------------------


def test_node_clips_the_whole_update_to_exactly_the_bound(make_worker: Any) -> None:
    bob = make_worker("bob")
    trained = [torch.full((3, 4), 2.0), torch.full((5,), -1.0)]
    start = [torch.ones(3, 4), torch.zeros(5)]  # delta: 12 ones and 5 minus-ones, norm sqrt(17)
    ptrs = [t.send(bob) for t in trained]
    out = release(bob, ptrs, 0.5, 0.0, start)
    assert [o.shape for o in out] == [(3, 4), (5,)]
    assert update_norm({str(i): o for i, o in enumerate(out)}) == pytest.approx(0.5, rel=1e-6)
    direction = torch.cat([o.flatten() for o in out]) / 0.5
    expected = torch.cat([torch.ones(12), -torch.ones(5)]) / math.sqrt(17)
    assert torch.allclose(direction, expected, atol=1e-6)
    small = release(bob, ptrs, 100.0, 0.0, start)  # under the bound: unchanged
    assert torch.allclose(small[0], torch.ones(3, 4)) and torch.allclose(small[1], -torch.ones(5))


def test_node_noise_has_std_z_times_clip_and_is_drawn_on_the_node(make_worker: Any) -> None:
    bob = make_worker("bob")
    zeros = torch.zeros(40_000).send(bob)
    a = release(bob, [zeros], 0.5, 2.0)[0]
    b = release(bob, [zeros], 0.5, 2.0)[0]
    assert a.std().item() == pytest.approx(1.0, rel=0.03)  # z * C = 2 * 0.5
    assert abs(a.mean().item()) < 0.03
    assert not torch.equal(a, b)  # fresh noise from the node's own generator every time
    torch.manual_seed(0)  # the coordinator's seed has no say in the node's noise
    c = release(bob, [zeros], 0.5, 2.0)[0]
    torch.manual_seed(0)
    assert not torch.equal(c, release(bob, [zeros], 0.5, 2.0)[0])


def test_node_command_refuses_bad_arguments(make_worker: Any) -> None:
    bob = make_worker("bob")
    p = torch.ones(3).send(bob)
    for args in ([[ObjRef(p.id_at_location)], -1.0, 1.0, None], [[ObjRef(p.id_at_location)], 1.0, float("nan"), None],
                 [[ObjRef(p.id_at_location)], 1.0, 1.0, [torch.ones(4)]], [[], 1.0, 1.0, None]):
        rid = new_id()
        bob.submit(Kind.CMD, OP, args, {}, [rid])
        with pytest.raises(sy.RemoteError):
            bob.request(Kind.GET, rid, True)
    ints = torch.ones(3, dtype=torch.int64).send(bob)
    with pytest.raises(sy.RemoteError, match="floating-point"):
        release(bob, [ints], 1.0, 1.0)


# -- the node command under a private policy (no transport) --------------------------------


class Caller:
    def __init__(self, node: Node, principal: str, session: str) -> None:
        self.node, self.caller, self.seq = node, node.caller(principal, session), 0

    def send(self, kind: Kind, *fields: Any) -> tuple[list[Any], list[Any]]:
        self.seq += 1
        _, values, errors = decode(b"".join(self.node.handle(encode_bytes([int(kind), self.seq, *fields]), self.caller)))
        return [v for _, v in values], errors

    def error(self, kind: Kind, *fields: Any) -> str | None:
        _, errors = self.send(kind, *fields)
        return None if not errors else f"{errors[0][1]['type']}: {errors[0][1]['message']}"


def private_node(rule: DPRule | None, roles: dict[str, frozenset[str]] | None = None) -> Node:
    node = Node("alice", policy=Policy("private", dp=rule, roles=roles or {}))
    node.serve(1000, torch.full((4,), 4242.125), ["#x"], "private")
    return node


def test_private_value_is_released_once_charged_and_refused_past_the_budget() -> None:
    rule = DPRule(max_norm=1.0, noise_multiplier=4.0, epsilon=2.0, delta=1e-5)  # 3 releases fit
    node = private_node(rule)
    a = Caller(node, "lab-a", "a" * 32)
    assert a.error(Kind.CMD, "torch.mul", [ObjRef(1000), 2.0], {}, [10]) is None  # private, derived
    assert "private" in str(a.error(Kind.GET, 10, False))
    outs = []
    for i in range(4):
        err = a.error(Kind.CMD, OP, [[ObjRef(10)], 1.0, 0.0, None], {}, [20 + i])  # asks for no noise
        if err is None:
            values, errors = a.send(Kind.GET, 20 + i, True)  # released: a plain get, not charged again
            assert errors == []
            outs.append(values[0])
        else:
            assert err.startswith("PrivacyBudgetExceededError")
    assert len(outs) == 3
    assert node.accountant is not None and node.accountant.spent("lab-a") == pytest.approx(1.85, abs=0.01)
    # the node used its rule's noise (z=4, sd 4), not the z=0 asked for: nothing near 8485
    assert all(o.abs().max() < 100 and not torch.allclose(o, torch.full((4,), 0.5)) for o in outs)


def test_private_node_refuses_attackers_and_nodes_without_a_rule() -> None:
    rule = DPRule(max_norm=1.0, noise_multiplier=4.0, epsilon=2.0)
    node = private_node(rule, roles={"lab-b": frozenset({"compute"})})
    a, thief, b = Caller(node, "lab-a", "a" * 32), Caller(node, "lab-a", "t" * 32), Caller(node, "lab-b", "b" * 32)
    a.send(Kind.CMD, "torch.mul", [ObjRef(1000), 2.0], {}, [10])
    assert "another session" in str(thief.error(Kind.CMD, OP, [[ObjRef(10)], 1.0, 1.0, None], {}, [11]))
    b.send(Kind.CMD, "torch.mul", [ObjRef(1000), 2.0], {}, [12])
    assert "may not take differentially private releases" in str(b.error(Kind.CMD, OP, [[ObjRef(12)], 1.0, 1.0, None], {}, [13]))
    assert "private" in str(b.error(Kind.GET, 13, False))  # nothing was released in its place
    no_rule = private_node(None)
    c = Caller(no_rule, "lab-a", "c" * 32)
    c.send(Kind.CMD, "torch.mul", [ObjRef(1000), 2.0], {}, [10])
    assert "no differentially private release rule" in str(c.error(Kind.CMD, OP, [[ObjRef(10)], 1.0, 5.0, None], {}, [11]))
    assert "private" in str(c.error(Kind.GET, 10, False))
    # a release marks only its own results: the next private computation stays private
    assert a.error(Kind.CMD, OP, [[ObjRef(10)], 1.0, 1.0, None], {}, [30]) is None
    assert a.send(Kind.GET, 30, True)[1] == []
    assert a.error(Kind.CMD, "torch.mul", [ObjRef(1000), 3.0], {}, [31]) is None
    assert "private" in str(a.error(Kind.GET, 31, False))


# -- coordinator arithmetic and accounting --------------------------------------------------


def test_central_average_clips_each_update_and_noises_the_mean() -> None:
    big = {"w": torch.full((4,), 10.0)}  # norm 20 -> clipped to 1
    small = {"w": torch.full((4,), 0.1)}  # norm 0.2 -> kept
    assert update_norm(clip_update(big, 1.0)) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    exact = central_dp_average([big, small], 1.0, 0.0, g)["w"]
    assert torch.allclose(exact, torch.full((4,), (0.5 + 0.1) / 2, dtype=torch.float64))
    noisy = central_dp_average([{"w": torch.zeros(40_000)}] * 4, 2.0, 1.5, g)["w"]
    assert noisy.std().item() == pytest.approx(1.5 * 2.0 / 4, rel=0.03)


def test_epsilon_is_opacus_rdp_accountant_for_the_same_q_sigma_steps_delta() -> None:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    for z, q, steps in ((1.1, 0.5, 10), (0.8, 1.0, 3), (2.0, 0.1, 100)):
        rdp = compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=orders)
        expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
        assert epsilon_for(z, q, steps, 1e-5) == pytest.approx(expected)
    central = Privacy(DPConfig(mode="central", noise_multiplier=1.1))
    acc = RDPAccountant()
    for _ in range(5):
        eps = central.account(["a", "b"], 4)  # q = 2/4
        acc.step(noise_multiplier=1.1, sample_rate=0.5)
        assert eps == pytest.approx(acc.get_epsilon(delta=1e-5))
    local = Privacy(DPConfig(mode="local", noise_multiplier=1.1))
    local.account(["a", "b"], 4)
    assert local.account(["a"], 4) == pytest.approx(epsilon_for(1.1, 1.0, 2, 1e-5))  # "a" took part twice


def test_dp_config_is_validated() -> None:
    for bad in (dict(mode="both"), dict(clip=0.0), dict(noise_multiplier=-1.0), dict(delta=1.0)):
        with pytest.raises(ValueError):
            DPConfig(**bad)  # type: ignore[arg-type]
    hook = sy.TorchHook(torch, federation=sy.Federation())
    alice, agg = sy.VirtualWorker(hook, id="alice"), sy.VirtualWorker(hook, id="agg")
    with pytest.raises(ValueError, match="aggregator"):
        FedAvg(make_model(), [alice], aggregator=agg, dp=DPConfig())


# -- FedAvg with DP, both transports --------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Optimal order")  # z=0.05: a tiny sigma, a huge epsilon
@pytest.mark.parametrize("mode", ["local", "central"])
def test_dp_fedavg_still_learns_and_reports_epsilon(make_worker: Any, mode: str) -> None:
    workers, keep = [], []
    for i, name in enumerate(["alice", "bob"]):
        w = make_worker(name)
        x, y = blobs(120, seed=i)
        keep += [x.tag("#train", "#x").send(w), y.tag("#train", "#y").send(w)]
        workers.append(w)
    test = blobs(300, seed=99)
    model = make_model()
    before = sy.fl.evaluate(model, *test, torch.nn.functional.cross_entropy)
    dp = DPConfig(mode=mode, clip=2.0, noise_multiplier=0.05, delta=1e-5)
    cfg = FedAvgConfig(rounds=4, batch_size=32, lr=0.1)
    history = FedAvg(model, workers, cfg, test_data=test, progress=False, dp=dp).fit()
    assert [r.nodes for r in history] == [["alice", "bob"]] * 4
    eps = history.epsilons
    assert all(e is not None for e in eps) and eps == sorted(eps)  # type: ignore[type-var]
    q = 1.0  # every node every round
    assert eps[-1] == pytest.approx(epsilon_for(0.05, q, 4, 1e-5))
    assert history[-1].test_loss is not None and history[-1].test_loss < before[0]
    assert history[-1].test_accuracy is not None and history[-1].test_accuracy > 0.8


# -- a private node that requires DP for what leaves it (a real process) ---------------------


def test_private_node_with_dp_always_charges_each_round_and_refuses_past_the_budget(tmp_path: Path) -> None:
    x, y = blobs(60, seed=0)
    save_file({"x": x, "y": y}, str(tmp_path / "alice.safetensors"))
    lines = ['id = "alice"', "port = 0", 'audit_log = "alice-audit.jsonl"']
    for key, tag in (("x", "#x"), ("y", "#y")):
        lines += ["[[data]]", 'file = "alice.safetensors"', f'key = "{key}"', f'tags = ["#train", "{tag}"]']
    # no approved plan: what training computes is private and leaves only as a DP release
    lines += ["[release.dp]", "max_norm = 1.0", "noise_multiplier = 4.0", "epsilon = 2.0", "always = true"]
    (tmp_path / "alice.toml").write_text("\n".join(lines) + "\n")
    node = start_node(tmp_path / "alice.toml", extra_args=["--threads", "1", "--token", "tok"])
    try:
        with sy.connect(node.url, "tok", hook=sy.TorchHook(torch, federation=sy.Federation()), timeout=30.0) as w:
            # Without DP the trained parameters do not leave (each get would be its own charge).
            dp = DPConfig(mode="local", clip=1.0, noise_multiplier=1.0)  # the node raises z to its 4.0
            trainer = FedAvg(make_model(), [w], FedAvgConfig(rounds=3, batch_size=30), progress=False, dp=dp)
            first = trainer.run_round(1)
            assert first.nodes == ["alice"]
            # the round's loss (dp.always: a DP get) and the update: 2 of the 3 releases z=4 allows
            with pytest.raises(sy.RoundFailedError, match="PrivacyBudgetExceededError"):
                trainer.run_round(2)
        log = [json.loads(line) for line in (tmp_path / "alice-audit.jsonl").read_text().splitlines()]
        updates = [r for r in log if r["event"] == "release" and r["rule"] == "dp-update"]
        assert updates and updates[0]["noise_multiplier"] == 4.0 and updates[0]["principal"] == "default"
        assert "4242.125" not in (tmp_path / "alice-audit.jsonl").read_text()
    finally:
        node.stop()


# -- DP-SGD ---------------------------------------------------------------------------------


def test_dp_sgd_step_clips_per_example_gradients() -> None:
    model = make_model()
    x, y = blobs(6, seed=3)
    clip, lr = 0.05, 1.0
    ref = make_model()
    grads = []
    for i in range(6):  # the per-example gradients by hand, one backward each
        ref.zero_grad()
        torch.nn.functional.cross_entropy(ref(x[i : i + 1]), y[i : i + 1]).backward()
        flat = torch.cat([p.grad.flatten() for p in ref.parameters()])  # type: ignore[union-attr]
        grads.append(flat * min(1.0, clip / float(flat.norm())))
    expected = torch.cat([p.detach().flatten() for p in ref.parameters()]) - lr * torch.stack(grads).mean(0)
    dp_sgd_step(model, torch.nn.functional.cross_entropy, x, y, clip, 0.0, torch.Generator(), lr)
    got = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(got, expected, atol=1e-6)


def test_dp_sgd_trains_a_toy_model() -> None:
    model = make_model()
    x, y = blobs(256, seed=4)
    g = torch.Generator().manual_seed(0)
    first = float(torch.nn.functional.cross_entropy(model(x), y).detach())
    for _ in range(3):
        for lo in range(0, 256, 64):
            dp_sgd_step(model, torch.nn.functional.cross_entropy, x[lo : lo + 64], y[lo : lo + 64], 1.0, 1.0, g, 0.5)
    assert float(torch.nn.functional.cross_entropy(model(x), y).detach()) < first * 0.5


@pytest.mark.filterwarnings("ignore:Optimal order")
def test_readme_snippet_runs() -> None:
    text = (Path(__file__).parents[2] / "README.md").read_text()
    start = text.index("```python", text.index("### Differential privacy")) + len("```python")
    scope: dict[str, Any] = {}
    exec(text[start : text.index("```", start)], scope)  # noqa: S102  # our own README
    eps = scope["history"].epsilons
    assert len(eps) == 3 and eps[0] < eps[1] < eps[2]
