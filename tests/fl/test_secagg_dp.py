"""Differential privacy composed with secure aggregation: each node clips and noises its
update *before* masking it, under its own release rule.

On both transports: the noised sum is exact in fixed point at zero noise and carries the
noise of every survivor otherwise; FedAvg with ``DPConfig(mode="distributed")`` reports
the epsilon of the sum's effective noise each round. On private nodes (no transport, and a
real ``fedws worker`` process): an unnoised masked release of private values is refused, a
noised one is charged to the principal and raised to the rule's noise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fedws as sy
from fedws.fl import DPConfig, FedAvg, FedAvgConfig
from fedws.fl.dp import clip_update, epsilon_for
from fedws.fl.secagg import SecAggConfig, SecureAggregation
from fedws.launch import start_node
from fedws.node import Node
from fedws.node.policy import DPRule, Policy
from fedws.node.secagg import FRAC_BITS, encode_fixed
from fedws.protocol.codec import ObjRef, decode, encode_bytes
from fedws.protocol.messages import Kind

pytest.importorskip("opacus")
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore:Optimal order")]

MakeWorker = Callable[..., sy.Worker]


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 8, generator=torch.Generator().manual_seed(1234)) * 3
    y = torch.randint(0, 3, (n,), generator=g)
    return centers[y] + torch.randn(n, 8, generator=g), y


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _noised_sum(ws: list[sy.Worker], xs: list[torch.Tensor], ref: torch.Tensor, clip: float, z: float) -> Any:
    agg = SecureAggregation(ws, 2, timeout=30.0)
    agg.advertise_keys()
    agg.share_keys()
    agg.collect_masked({w.id: [x.send(w)] for w, x in zip(ws, xs)}, None, (clip, z, [ref]))
    return agg.unmask()


def test_noised_sum_is_exact_at_zero_noise_and_carries_each_nodes_noise(make_worker: MakeWorker) -> None:
    ws = [make_worker(n) for n in ("bob", "alice", "carol")]
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(6, generator=g)
    xs = [ref + torch.randn(6, generator=g) * s for s in (0.1, 3.0, 10.0)]  # one under the clip, two over
    total = _noised_sum(ws, xs, ref, 2.0, 0.0)
    expected = sum(encode_fixed(clip_update({"w": x - ref}, 2.0)["w"]) for x in xs)
    assert torch.equal(torch.round(total.tensors[0] * (1 << FRAC_BITS)).to(torch.int64), expected)
    assert total.total_weight == 3.0
    zeros = torch.zeros(20_000)
    noisy = _noised_sum(ws, [zeros] * 3, zeros, 0.5, 2.0).tensors[0]
    assert noisy.std().item() == pytest.approx(2.0 * 0.5 * math.sqrt(3), rel=0.05)  # three nodes' noise


def test_fedavg_with_distributed_dp_reports_epsilon_per_round(make_worker: MakeWorker) -> None:
    ws, keep = [], []
    for i, name in enumerate(("bob", "alice", "carol")):
        w = make_worker(name)
        x, y = _blobs(40, seed=i)
        keep += [x.tag("#train", "#x").send(w), y.tag("#train", "#y").send(w)]
        ws.append(w)
    cfg = FedAvgConfig(rounds=2, batch_size=20, lr=0.1)
    dp = DPConfig(mode="distributed", clip=1.0, noise_multiplier=0.8)
    history = FedAvg(_model(), ws, cfg, progress=False, dp=dp, secure_aggregation=True).fit()
    assert [r.nodes for r in history] == [["bob", "alice", "carol"]] * 2
    # each node adds z / sqrt(t) (t = 2 of 3); three survivors: the sum's multiplier is z * sqrt(3/2)
    z_eff = 0.8 * math.sqrt(3 / 2)
    assert history.epsilons == [pytest.approx(epsilon_for(z_eff, 1.0, r, 1e-5)) for r in (1, 2)]
    local = FedAvg(_model(), ws, FedAvgConfig(rounds=1, batch_size=20), progress=False,
                   dp=DPConfig(mode="local", noise_multiplier=0.8), secure_aggregation=SecAggConfig(neighbours=2))
    assert local.fit().epsilons == [pytest.approx(epsilon_for(0.8, 1.0, 1, 1e-5))]  # each node's own release


def test_dp_combinations_that_do_not_fit_are_refused(hook: sy.TorchHook) -> None:
    ws = [sy.VirtualWorker(hook, id=n) for n in ("a", "b")]
    with pytest.raises(ValueError, match="mode='distributed'"):
        FedAvg(_model(), ws, dp=DPConfig(mode="central"), secure_aggregation=True)
    with pytest.raises(ValueError, match="needs secure_aggregation"):
        FedAvg(_model(), ws, dp=DPConfig(mode="distributed"))
    with pytest.raises(ValueError, match="fedavg strategy only"):
        FedAvg(_model(), ws, dp=DPConfig(mode="distributed"), secure_aggregation=True, strategy="fedmedian")


# -- private nodes, no transport -------------------------------------------------------


class Client:
    def __init__(self, node: Node, principal: str, session: str) -> None:
        self.node, self.caller, self.seq = node, node.caller(principal, session, "127.0.0.1:1"), 0

    def call(self, op: str, args: list[Any]) -> Any:
        rid = 5000 + self.seq
        frames = []
        for kind, fields in ((Kind.CMD, (op, args, {}, [rid])), (Kind.GET, (rid, True))):
            self.seq += 1
            frames.append(encode_bytes([int(kind), self.seq, *fields]))
        _, values, errors = decode(b"".join(self.node.handle(b"".join(frames), self.caller)))
        if errors:
            raise RuntimeError(f"{errors[0][1]['type']}: {errors[0][1]['message']}")
        return values[0][1]


def _ready_to_mask(bob: Node, principal: str = "lab") -> Callable[[Any], Any]:
    """Bob (private, serving object 1000) and two open peers through step 2; bob's mask call."""
    nodes = [bob, Node("alice"), Node("carol")]
    cs = [Client(n, principal, "l" * 32) for n in nodes]
    keys = torch.stack([c.call("fedws.secagg.keys", ["r", i + 1, 3, 2]) for i, c in enumerate(cs)])
    rows = [c.call("fedws.secagg.share", ["r", [1, 2, 3], keys]) for c in cs]
    return lambda dp: cs[0].call("fedws.secagg.mask", ["r", [2, 3], torch.stack([rows[1][0], rows[2][0]]),
                                                         [ObjRef(1000)], 1.0, *([] if dp is None else [dp])])


def _bob(rule: DPRule | None, roles: dict[str, frozenset[str]] | None = None) -> Node:
    bob = Node("bob", policy=Policy("private", dp=rule, roles=roles or {}))
    bob.serve(1000, torch.full((4,), 4242.0), ["#x"], None)
    return bob


def test_private_node_requiring_dp_masks_only_noised_updates_and_charges_them() -> None:
    rule = DPRule(max_norm=1.0, noise_multiplier=3.0, epsilon=50.0)
    bob = _bob(rule)
    mask = _ready_to_mask(bob)
    with pytest.raises(RuntimeError, match="PermissionDeniedError: .*refuses an unnoised masked release"):
        mask(None)
    assert bob.accountant is not None and bob.accountant.spent("lab") == 0.0
    y = mask([1.0, 0.0, None])  # asks for no noise: the node adds its rule's z = 3
    assert y.dtype == torch.int64 and y.numel() == 5  # released: the get went through
    assert bob.accountant.spent("lab") > 0
    with pytest.raises(RuntimeError, match="step 'masked'"):  # and only once
        mask([1.0, 3.0, None])


def test_private_node_without_a_rule_or_permission_refuses_a_masked_release() -> None:
    with pytest.raises(RuntimeError, match="no differentially private release rule"):
        _ready_to_mask(_bob(None))([1.0, 3.0, None])
    rule = DPRule(max_norm=1.0, noise_multiplier=3.0, epsilon=50.0)
    bob = _bob(rule, roles={"lab": frozenset({"secagg", "compute"})})
    with pytest.raises(RuntimeError, match="may not take differentially private releases"):
        _ready_to_mask(bob)([1.0, 3.0, None])
    with pytest.raises(RuntimeError, match="dp reference"):
        _ready_to_mask(_bob(rule))([1.0, 3.0, [torch.zeros(7)]])


# -- a real private node that requires DP ----------------------------------------------


def test_real_private_node_refuses_unnoised_secure_aggregation_and_takes_distributed_dp(
    tmp_path: Path, hook: sy.TorchHook
) -> None:
    x, y = _blobs(40, seed=0)
    save_file({"x": x, "y": y}, str(tmp_path / "alice.safetensors"))
    lines = ['id = "alice"', "port = 0", 'audit_log = "audit.jsonl"']
    for key, tag in (("x", "#x"), ("y", "#y")):
        lines += ["[[data]]", 'file = "alice.safetensors"', f'key = "{key}"', f'tags = ["#train", "{tag}"]']
    lines += ["[release.dp]", "max_norm = 1.0", "noise_multiplier = 2.0", "epsilon = 30.0", "always = true"]
    (tmp_path / "alice.toml").write_text("\n".join(lines) + "\n")
    node = start_node(tmp_path / "alice.toml", extra_args=["--threads", "1", "--token", "tok"])
    try:
        with sy.connect(node.url, "tok", hook=hook, timeout=30.0) as alice:
            bob = sy.VirtualWorker(hook, id="bob")
            bx, by = _blobs(40, seed=1)
            keep = [bx.tag("#train", "#x").send(bob), by.tag("#train", "#y").send(bob)]
            cfg = FedAvgConfig(rounds=1, batch_size=20, min_nodes=2)
            plain = FedAvg(_model(), [alice, bob], cfg, progress=False, secure_aggregation=True)
            with pytest.raises(sy.RoundFailedError, match="unnoised masked release"):
                plain.fit()
            dp = DPConfig(mode="distributed", clip=1.0, noise_multiplier=1.0)
            history = FedAvg(_model(), [alice, bob], cfg, progress=False, secure_aggregation=True, dp=dp).fit()
            assert history[-1].nodes == ["alice", "bob"] and history.epsilons[-1] is not None
            del keep
        log = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        masked = [r for r in log if r["event"] == "release" and r["rule"] == "dp-secagg"]
        assert len(masked) == 1 and masked[0]["noise_multiplier"] == 2.0  # raised to the rule's z
    finally:
        node.stop()
