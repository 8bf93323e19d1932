"""Secure aggregation (Bonawitz et al. 2017): the nodes mask, the coordinator learns the sum.

On both transports: the sum is exact in fixed point with 0, 1 and ``n - t`` dropouts; what
the coordinator receives from one node is uniform over the ring whatever the update; too
many dropouts fail clearly before anything is revealed; a node refuses to give away both
secrets of one node; FedAvg with ``secure_aggregation=True`` trains like plain FedAvg.
Without a transport: bounds, the ``secagg`` permission and per-session state on a private
node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import fedws as sy
from fedws.exceptions import RoundFailedError
from fedws.fl import FedAvg, FedAvgConfig
from fedws.fl.secagg import SecureAggregation, _call, secure_sum
from fedws.node import Node
from fedws.node.policy import Policy
from fedws.node.secagg import (
    FRAC_BITS,
    MAX_PARTICIPANTS,
    encode_fixed,
    graph,
    neighbourhood,
    ring_order,
    shamir_combine,
    shamir_split,
)
from fedws.protocol.codec import ObjRef, decode, encode_bytes
from fedws.protocol.messages import Kind

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MakeWorker = Callable[..., sy.Worker]


def _workers(make_worker: MakeWorker, n: int) -> list[sy.Worker]:
    return [make_worker(name) for name in ("bob", "alice", "carol", "james", "charlie")[:n]]


def _exact(total: torch.Tensor) -> torch.Tensor:
    """A decoded sum back to its ring integers (exact: they are below 2^53)."""
    return torch.round(total * (1 << FRAC_BITS)).to(torch.int64)


def _expected(xs: list[torch.Tensor], weights: list[float], keep: list[int]) -> torch.Tensor:
    return sum((encode_fixed(xs[i].double() * weights[i]) for i in keep), torch.zeros(xs[0].shape, dtype=torch.int64))


# -- the sum --------------------------------------------------------------------------


@pytest.mark.parametrize("dropouts", [0, 1, 2])
def test_sum_is_exact_with_dropouts_up_to_the_threshold(make_worker: MakeWorker, dropouts: int) -> None:
    n, t = 5, 3  # up to n - t = 2 dropouts
    ws = _workers(make_worker, n)
    g = torch.Generator().manual_seed(dropouts)
    xs = [torch.randn(4, 3, generator=g) * 10 for _ in ws]
    weights = [float(i + 1) for i in range(n)]
    updates = {w.id: [x.send(w)] for w, x in zip(ws, xs)}
    agg = SecureAggregation(ws, t, timeout=30.0)
    agg.advertise_keys()
    if dropouts >= 2:  # one vanishes before it shares its keys: nobody masks with it
        agg.drop(ws[4].id, "vanished")
    agg.share_keys()
    if dropouts >= 1:  # one fails after sharing: the others masked with it, its key is rebuilt
        updates[ws[3].id] = [torch.zeros(4, 3, dtype=torch.bool).send(ws[3])]
    agg.collect_masked(updates, {w.id: wt for w, wt in zip(ws, weights)})
    gone = [3, 4][:dropouts]
    keep = [i for i in range(n) if i not in gone]
    assert sorted(agg.dropped) == sorted(ws[i].id for i in gone)
    total = agg.unmask()
    assert total.survivors == [ws[i].id for i in keep]
    assert torch.equal(_exact(total.tensors[0]), _expected(xs, weights, keep))
    assert total.total_weight == sum(weights[i] for i in keep)
    assert torch.allclose(total.tensors[0], sum(xs[i].double() * weights[i] for i in keep), atol=1e-3)


def test_secure_sum_of_several_tensors_in_one_call(make_worker: MakeWorker) -> None:
    ws = _workers(make_worker, 3)
    a = [torch.tensor([1.5, -2.25]), torch.tensor([[3.0]])]
    b = [torch.tensor([0.5, 0.25]), torch.tensor([[-1.0]])]
    c = [torch.tensor([1.0, 1.0]), torch.tensor([[0.125]])]
    total = secure_sum({w: [t.send(w) for t in u] for w, u in zip(ws, (a, b, c))}, threshold=2)
    assert total.tensors[0].tolist() == [3.0, -1.0]
    assert total.tensors[1].tolist() == [[2.125]]
    assert total.total_weight == 3.0 and total.dropped == {}


def test_more_dropouts_than_the_threshold_allows_fail_before_any_reveal(make_worker: MakeWorker) -> None:
    ws = _workers(make_worker, 5)
    agg = SecureAggregation(ws, 3, timeout=30.0)
    agg.advertise_keys()
    agg.share_keys()
    bad = [torch.zeros(2, dtype=torch.bool)]
    updates = {w.id: [torch.ones(2).send(w)] if i < 2 else [bad[0].send(w)] for i, w in enumerate(ws)}
    with pytest.raises(RoundFailedError, match="2 of 5 nodes remain, the threshold is 3.*nothing was revealed"):
        agg.collect_masked(updates)
    # a coordinator that asks anyway is refused: the round is forgotten, and before that a
    # node answers only with at least t survivors
    with pytest.raises(sy.RemoteError, match="no round"):
        _call(ws[0], "fedws.secagg.reveal", [agg.round_id, [1, 2], [3, 4, 5]]).result(30)


# -- what the coordinator sees ----------------------------------------------------------


def _chi2_uniform(data: torch.Tensor) -> float:
    counts = torch.bincount(data.to(torch.int64), minlength=256).double()
    expected = data.numel() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def _chi2_same(a: torch.Tensor, b: torch.Tensor) -> float:
    """Homogeneity of two byte samples (2 x 256 contingency table)."""
    ca = torch.bincount(a.to(torch.int64), minlength=256).double()
    cb = torch.bincount(b.to(torch.int64), minlength=256).double()
    total = ca + cb
    ea = total * a.numel() / (a.numel() + b.numel())
    eb = total * b.numel() / (a.numel() + b.numel())
    return float(((ca - ea) ** 2 / ea).sum() + ((cb - eb) ** 2 / eb).sum())


# chi-square with 255 degrees of freedom: P(X > 340) ~ 3e-4
CHI2_LIMIT = 340.0


def _received_from_one_node(ws: list[sy.Worker], update: torch.Tensor) -> torch.Tensor:
    agg = SecureAggregation(ws, 2, timeout=30.0)
    agg.advertise_keys()
    agg.share_keys()
    agg.collect_masked({w.id: [(update if i == 0 else torch.zeros_like(update)).send(w)]
                        for i, w in enumerate(ws)})
    agg.forget()
    return agg.masked[1]


def test_a_nodes_masked_update_is_uniform_and_independent_of_the_update(make_worker: MakeWorker) -> None:
    ws = _workers(make_worker, 3)
    size = 8192
    structured = torch.where(torch.arange(size) % 2 == 0, 0.0, 1000.0)  # half 0, half 1000
    for update in (torch.zeros(size), structured):
        y = _received_from_one_node(ws, update)
        assert y.dtype == torch.int64 and y.numel() == size + 1  # the update, then its weight
        raw = y.view(torch.uint8)
        assert _chi2_uniform(raw) < CHI2_LIMIT
        top = (y[:size] >> 56) & 0xFF  # the most significant byte of each element
        assert _chi2_uniform(top) < CHI2_LIMIT
        # the elements that hid 0 and those that hid 1000 are distributed alike
        assert _chi2_same(top[0::2], top[1::2]) < CHI2_LIMIT
    # and fixed-point encoding of the plain update would be anything but uniform
    assert _chi2_uniform(encode_fixed(structured).view(torch.uint8)) > 10 * CHI2_LIMIT


def test_a_node_never_reveals_both_secrets_of_one_node(make_worker: MakeWorker) -> None:
    ws = _workers(make_worker, 3)
    agg = SecureAggregation(ws, 2, timeout=30.0)
    agg.advertise_keys()
    agg.share_keys()
    agg.collect_masked({w.id: [torch.ones(3).send(w)] for w in ws})
    rid = agg.round_id

    def reveal(w: sy.Worker, survivors: list[int], dropped: list[int]) -> Any:
        return _call(w, "fedws.secagg.reveal", [rid, survivors, dropped]).result(30)

    # node 2 both a survivor (self-mask share) and a dropout (mask-key share): refused
    with pytest.raises(sy.RemoteError, match="both a survivor and a dropout"):
        reveal(ws[0], [1, 2, 3], [2])
    with pytest.raises(sy.RemoteError, match="not a dropout"):
        reveal(ws[0], [2, 3], [1])
    with pytest.raises(sy.RemoteError, match="fewer than the threshold"):
        reveal(ws[0], [1], [2, 3])
    # an honest request is answered once; asking again (with the other split) is refused
    assert reveal(ws[0], [1, 2], [3]).shape == (3, 66)
    with pytest.raises(sy.RemoteError, match="no round"):
        reveal(ws[0], [1, 3], [2])
    # and a node masks once: a second masked vector would give away a difference
    with pytest.raises(sy.RemoteError, match="step 'masked'"):
        _call(ws[1], "fedws.secagg.mask", [rid, [1, 3], torch.zeros(2, 164, dtype=torch.uint8),
                                            [], 1.0]).result(30)


# -- FedAvg ------------------------------------------------------------------------------


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 8, generator=torch.Generator().manual_seed(1234)) * 3
    y = torch.randint(0, 3, (n,), generator=g)
    return centers[y] + torch.randn(n, 8, generator=g), y


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def test_fedavg_with_secure_aggregation_matches_plain_fedavg(make_worker: MakeWorker) -> None:
    ws = _workers(make_worker, 3)
    keep = []
    for i, w in enumerate(ws):
        x, y = _blobs(40 + 20 * i, seed=i)
        keep += [x.tag("#train", "#x").send(w), y.tag("#train", "#y").send(w)]
    cfg = FedAvgConfig(rounds=2, batch_size=16, lr=0.1)
    plain = FedAvg(_model(), ws, cfg, progress=False)
    plain.fit()
    secure = FedAvg(_model(), ws, cfg, progress=False, secure_aggregation=True)
    history = secure.fit()
    assert history[-1].nodes == [w.id for w in ws]
    for p, s in zip(plain.model.state_dict().values(), secure.model.state_dict().values()):
        assert torch.allclose(p, s, atol=1e-4)
    with pytest.raises(ValueError, match="not both"):
        FedAvg(_model(), ws, cfg, aggregator=ws[0], secure_aggregation=True)


# -- the node commands without a transport ----------------------------------------------


class Client:
    """One caller (principal + session) of a node."""

    def __init__(self, node: Node, principal: str, session: str) -> None:
        self.node = node
        self.caller = node.caller(principal, session, "127.0.0.1:1")
        self.seq = 0

    def call(self, op: str, args: list[Any]) -> Any:
        """Run ``op``; its result (removed), or raise the node's error as (type, message)."""
        rid = 1000 + self.seq + 10**6 * int(self.caller.session[0], 36)
        frames = []
        for kind, fields in ((Kind.CMD, (op, args, {}, [rid])), (Kind.GET, (rid, True))):
            self.seq += 1
            frames.append(encode_bytes([int(kind), self.seq, *fields]))
        _, values, errors = decode(b"".join(self.node.handle(b"".join(frames), self.caller)))
        if errors:
            raise RuntimeError(errors[0][1]["type"], errors[0][1]["message"])
        return values[0][1]


def test_private_node_requires_the_secagg_permission() -> None:
    node = Node("carol", policy=Policy("private", roles={"viewer": frozenset({"compute"}),
                                                        "agg": frozenset({"secagg"})}))
    with pytest.raises(RuntimeError) as refused:
        Client(node, "viewer", "v" * 32).call("fedws.secagg.keys", ["r1", 1, 3, 2])
    assert refused.value.args[0] == "PermissionDeniedError" and "'secagg'" in refused.value.args[1]
    assert Client(node, "agg", "a" * 32).call("fedws.secagg.keys", ["r1", 1, 3, 2]).shape == (64,)


def test_another_session_cannot_reach_a_round_or_its_update() -> None:
    node = Node("bob", policy=Policy("private"))
    owner, attacker = Client(node, "lab", "a" * 32), Client(node, "lab", "b" * 32)
    owner.call("fedws.secagg.keys", ["r1", 1, 3, 2])
    with pytest.raises(RuntimeError, match="no round 'r1'"):  # state is per session
        attacker.call("fedws.secagg.share", ["r1", [1, 2], torch.zeros(2, 64, dtype=torch.uint8)])
    with pytest.raises(RuntimeError, match="no round 'r1'"):
        attacker.call("fedws.secagg.reveal", ["r1", [1, 2], []])


def test_sizes_are_bounded_before_anything_is_made() -> None:
    c = Client(Node("bob"), "local", "s" * 32)
    for args, why in (
        (["r", 1, MAX_PARTICIPANTS + 1, 600], "n must be"),
        (["r", 1, 4, 2], "m/2 < t"),  # a minority could unmask
        (["r", 5, 4, 3], "index must be"),
        (["x" * 65, 1, 4, 3], "round id"),
    ):
        with pytest.raises(RuntimeError, match=why):
            c.call("fedws.secagg.keys", args)
    c.call("fedws.secagg.keys", ["r", 1, 3, 2])
    with pytest.raises(RuntimeError, match=r"\[2, 64\] uint8"):
        c.call("fedws.secagg.share", ["r", [1, 2], torch.zeros(2, 10**6, dtype=torch.uint8)])
    for i in range(7):
        c.call("fedws.secagg.keys", [f"r{i}", 1, 3, 2])
    with pytest.raises(RuntimeError, match="unfinished rounds"):
        c.call("fedws.secagg.keys", ["r7", 1, 3, 2])


def test_shamir_reconstructs_from_any_t_shares_and_not_fewer() -> None:
    secret = bytes(range(32))
    ys = shamir_split(secret, [1, 2, 3, 4, 5], 3)
    pts = list(zip([1, 2, 3, 4, 5], ys))
    assert shamir_combine(pts[:3], 3) == secret and shamir_combine(pts[2:], 3) == secret
    with pytest.raises(ValueError, match="threshold"):
        shamir_combine(pts[:2], 3)


def _store(c: Client, obj_id: int, value: torch.Tensor) -> None:
    c.seq += 1
    frame = encode_bytes([int(Kind.STORE), c.seq, obj_id, value, [], None])
    _, _, errors = decode(b"".join(c.node.handle(frame, c.caller)))
    assert errors == []


def test_on_private_nodes_masking_private_data_does_not_release_it() -> None:
    """Three private nodes, one session each: the sum of the coordinator's own stored values
    works; a masked vector of data a node serves stays private; an attacker session can
    neither mask the owner's update nor use the owner's round."""
    nodes = [Node(n, policy=Policy("private")) for n in ("bob", "alice", "carol")]
    nodes[0].serve(1000, torch.tensor([4242.0]), ["#x"], None)
    labs = [Client(n, "lab", "l" * 32) for n in nodes]
    for i, c in enumerate(labs):
        _store(c, 500, torch.tensor([float(i + 1)]))
    pubs = [c.call("fedws.secagg.keys", ["r", i + 1, 3, 2]) for i, c in enumerate(labs)]
    keys = torch.stack(pubs)
    rows = [c.call("fedws.secagg.share", ["r", [1, 2, 3], keys]) for c in labs]
    attacker = Client(nodes[1], "lab", "m" * 32)
    own = attacker.call("fedws.secagg.keys", ["r", 2, 3, 2])  # its own round "r", beside lab's
    attacker.call("fedws.secagg.share", ["r", [1, 2, 3], torch.stack([pubs[0], own, pubs[2]])])
    with pytest.raises(RuntimeError, match="belongs to another session"):
        attacker.call("fedws.secagg.mask", ["r", [1, 3], torch.stack([rows[0][1], rows[2][1]]), [ObjRef(500)], 1.0])

    def mask(i: int, update: int) -> Any:
        others = [v for v in (1, 2, 3) if v != i + 1]
        return labs[i].call("fedws.secagg.mask", ["r", others, torch.stack([rows[v - 1][i] for v in others]),
                                                  [ObjRef(update)], 1.0])

    with pytest.raises(RuntimeError, match="PermissionDenied|private"):
        mask(0, 1000)  # bob's served data: masked, but still private; it does not leave
    assert mask(1, 500).dtype == torch.int64 and mask(2, 500).dtype == torch.int64


# -- SecAgg+ (Bell et al. 2020): masks with k neighbours only ------------------------------


def _plus(ws: list[sy.Worker], k: int, t: int | None = None) -> SecureAggregation:
    agg = SecureAggregation(ws, t, neighbours=k, timeout=30.0)
    agg.advertise_keys()
    return agg


@pytest.mark.parametrize("dropouts", [0, 1])
def test_secagg_plus_sum_is_exact_and_each_node_works_with_its_neighbours_only(
    make_worker: MakeWorker, dropouts: int
) -> None:
    ws = _workers(make_worker, 5)  # k=2: a ring, closed neighbourhoods of 3, t=2: one dropout each
    xs = [torch.randn(3, 2, generator=torch.Generator().manual_seed(i)) * 5 for i in range(5)]
    agg = _plus(ws, 2)
    assert agg.t == 2 and all(len(p) == 3 for p in agg.peers.values())
    agg.share_keys()
    assert all(len(order) == 3 for order in agg.share_order.values())  # O(k) keys and shares, not O(n)
    updates = {w.id: [x.send(w)] for w, x in zip(ws, xs)}
    if dropouts:  # fails after sharing: its neighbours masked with it, its key is rebuilt
        updates[ws[2].id] = [torch.zeros(3, 2, dtype=torch.bool).send(ws[2])]
    agg.collect_masked(updates)
    assert all(len(s) == 2 for s in agg.senders.values())  # masks with its 2 neighbours
    keep = [i for i in range(5) if not (dropouts and i == 2)]
    total = agg.unmask()
    assert torch.equal(_exact(total.tensors[0]), _expected(xs, [1.0] * 5, keep))
    assert total.total_weight == len(keep)


def test_secagg_plus_survives_threshold_dropouts_in_a_neighbourhood(hook: sy.TorchHook) -> None:
    ws = [sy.VirtualWorker(hook, id=f"n{i}") for i in range(8)]
    agg = _plus(ws, 4)  # neighbourhoods of 5, t = 3: two dropouts in one neighbourhood
    assert agg.t == 3
    ring = ring_order(agg.round_id, 8)
    early, late = ws[ring[0] - 1], ws[ring[1] - 1]  # ring neighbours: in four common neighbourhoods
    agg.drop(early.id, "vanished")  # before sharing: nobody masks with it
    agg.share_keys()
    xs = [torch.full((4,), float(i + 1)) for i in range(8)]
    updates = {w.id: [x.send(w)] for w, x in zip(ws, xs)}
    updates[late.id] = [torch.zeros(4, dtype=torch.bool).send(late)]  # fails after sharing
    agg.collect_masked(updates)
    total = agg.unmask()
    keep = [i for i, w in enumerate(ws) if w not in (early, late)]
    assert total.tensors[0].tolist() == [float(sum(i + 1 for i in keep))] * 4
    assert torch.equal(_exact(total.tensors[0]), _expected(xs, [1.0] * 8, keep))
    # three neighbours failing after they shared leave too few shares of the middle one's key
    agg = _plus(ws, 4)
    agg.share_keys()
    bad = {ws[i - 1].id for i in ring_order(agg.round_id, 8)[:3]}
    agg.collect_masked({w.id: [torch.ones(4, dtype=torch.bool if w.id in bad else torch.float32).send(w)]
                        for w in ws})
    with pytest.raises(RoundFailedError, match="too few shares.*nothing was revealed"):
        agg.unmask()


def test_secagg_plus_masked_update_is_uniform(make_worker: MakeWorker) -> None:
    ws = _workers(make_worker, 5)
    size = 8192
    structured = torch.where(torch.arange(size) % 2 == 0, 0.0, 1000.0)
    agg = _plus(ws, 2)
    agg.share_keys()
    agg.collect_masked({w.id: [(structured if i == 0 else torch.zeros(size)).send(w)] for i, w in enumerate(ws)})
    agg.forget()
    y = agg.masked[1]
    assert len(agg.senders[1]) == 2
    assert _chi2_uniform(y.view(torch.uint8)) < CHI2_LIMIT
    top = (y[:size] >> 56) & 0xFF
    assert _chi2_uniform(top) < CHI2_LIMIT and _chi2_same(top[0::2], top[1::2]) < CHI2_LIMIT


def test_a_node_derives_its_own_neighbourhood() -> None:
    node = Node("bob")
    c = Client(node, "lab", "s" * 32)
    c.call("fedws.secagg.keys", ["g", 1, 8, 3, 4])
    mine = sorted(neighbourhood("g", 8, 4, 1))
    outsider = next(i for i in range(1, 9) if i not in mine)
    keys = torch.zeros(5, 64, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="neighbourhood"):  # a peer the graph does not give it
        c.call("fedws.secagg.share", ["g", sorted([*mine[:4], outsider]), keys])
    with pytest.raises(RuntimeError, match="m/2 < t"):  # t counts within the 5-node neighbourhood
        c.call("fedws.secagg.keys", ["h", 1, 8, 2, 4])
    assert graph("g", 8, 4)[1] == frozenset(mine) and len(graph("g", 8, None)[1]) == 8
