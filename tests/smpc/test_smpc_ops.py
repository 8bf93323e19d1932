"""Secure computation on both transports: sharing, arithmetic, Beaver products, fixed
precision, and who holds (and sees) what."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from smpc_stats import assert_same_distribution, assert_uniform
from tests_helpers_smpc import link

import fedws as sy
from fedws.client.worker import Worker
from fedws.node import Node
from fedws.protocol.messages import Kind
from fedws.smpc import AdditiveSharingTensor, FixedPrecisionTensor, PointerToShared
from fedws.smpc.beaver import request_triple


@pytest.fixture
def parties(make_worker: Callable[..., sy.Worker]) -> tuple[Worker, Worker, Worker, Worker]:
    bob, alice, bill, carol = (make_worker(i) for i in ("bob", "alice", "bill", "carol"))
    link(bob, alice, bill, carol)
    return bob, alice, bill, carol


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, Kind, tuple[Any, ...]]]]:
    """Every request the coordinator sends: (worker id, kind, fields).

    In-process nodes reach each other through the same Worker handles: requests made while
    a node handles a frame are node to node, not the coordinator's, and are left out."""
    seen: list[tuple[str, Kind, tuple[Any, ...]]] = []
    real_submit, real_handle = Worker.submit, Node.handle
    inside = threading.local()

    def submit(self: Worker, kind: Kind, *fields: Any, want_value: bool = False) -> Any:
        if not getattr(inside, "depth", 0):
            seen.append((self.id, Kind(kind), fields))
        return real_submit(self, kind, *fields, want_value=want_value)

    def handle(self: Node, *args: Any, **kwargs: Any) -> Any:
        inside.depth = getattr(inside, "depth", 0) + 1
        try:
            return real_handle(self, *args, **kwargs)
        finally:
            inside.depth -= 1

    monkeypatch.setattr(Worker, "submit", submit)
    monkeypatch.setattr(Node, "handle", handle)
    yield seen


def test_share_add_sub_public_ops(parties: Any) -> None:
    bob, alice, bill, _ = parties
    x = torch.tensor([25, -3]).share(bob, alice, bill)
    y = torch.tensor([5, 4]).share(bob, alice, bill)
    assert isinstance(x, AdditiveSharingTensor) and x.shape == (2,)
    assert set(x.child) == {"bob", "alice", "bill"}
    assert (x + y).get().tolist() == [30, 1]
    assert (x - y).get().tolist() == [20, -7]
    assert (x * 3).get().tolist() == [75, -9]
    assert (x * torch.tensor([2, -1])).get().tolist() == [50, 3]
    assert (x + 1).get().tolist() == [26, -2]
    assert (100 - x).get().tolist() == [75, 103]
    assert (-x).get().tolist() == [-25, 3]
    assert x.sum().get().item() == 22
    assert x.get().tolist() == [25, -3]


def test_shares_wrap_around_the_ring(parties: Any) -> None:
    bob, alice, _, _ = parties
    big = torch.tensor([2**63 - 1])
    x = big.share(bob, alice)
    assert (x + 1).get().item() == -(2**63)  # Z/2^64, as int64
    assert x.get().item() == 2**63 - 1


def test_mul_and_matmul_with_beaver_triples(parties: Any) -> None:
    bob, alice, _, carol = parties
    x = torch.tensor([25, -4]).share(bob, alice, crypto_provider=carol)
    y = torch.tensor([5, 6]).share(bob, alice, crypto_provider=carol)
    assert (x * y).get().tolist() == [125, -24]
    a = torch.tensor([[1, 2], [3, 4]]).share(bob, alice, crypto_provider=carol)
    b = torch.tensor([[2, 0], [0, 2]]).share(bob, alice, crypto_provider=carol)
    assert a.mm(b).get().tolist() == [[2, 4], [6, 8]]
    assert (a @ torch.tensor([[1], [1]])).get().tolist() == [[3], [7]]
    assert (a.matmul(b) * a).sum().get().item() == 2 * (1 + 4 + 9 + 16)


def test_fixed_precision_three_parties_truncation(parties: Any) -> None:
    bob, alice, bill, carol = parties
    x = torch.tensor([0.5, -1.25, 3.1, 100.0]).fix_precision()
    assert isinstance(x, FixedPrecisionTensor) and x.child.tolist() == [500, -1250, 3100, 100000]
    y = torch.tensor([2.0, 4.0, -0.5, -0.001]).fix_prec()
    sx, sy_ = x.share(bob, alice, bill, crypto_provider=carol), y.share(bob, alice, bill, crypto_provider=carol)
    prod = (sx * sy_).get().float_precision()
    assert torch.allclose(prod, torch.tensor([1.0, -5.0, -1.55, -0.1]), atol=2e-3)
    assert torch.allclose((sx * 0.5).get().float_precision(), torch.tensor([0.25, -0.625, 1.55, 50.0]), atol=2e-3)
    assert torch.allclose((sx / 4).get().float_precision(), torch.tensor([0.125, -0.3125, 0.775, 25.0]), atol=2e-3)
    m = torch.tensor([[0.5, 1.0], [2.0, -1.5]]).fix_precision().share(bob, alice, bill, crypto_provider=carol)
    n = torch.tensor([[1.5], [0.25]]).fix_precision().share(bob, alice, bill, crypto_provider=carol)
    assert torch.allclose(m.mm(n).get().float_precision(), torch.tensor([[1.0], [2.625]]), atol=3e-3)
    assert torch.allclose((sx + sy_).sum().get().float_precision(), torch.tensor(107.849), atol=2e-3)


def test_refusals(parties: Any) -> None:
    bob, alice, _, carol = parties
    with pytest.raises(sy.SMPCError, match="at least two"):
        torch.tensor([1]).share(bob)
    with pytest.raises(sy.SMPCError, match="twice"):
        torch.tensor([1]).share(bob, bob)
    with pytest.raises(sy.SMPCError, match="crypto provider 'carol' is also a party"):
        torch.tensor([1]).share(bob, carol, crypto_provider=carol)
    with pytest.raises(sy.SMPCError, match="fix_precision"):
        torch.tensor([1.5]).share(bob, alice)
    x = torch.tensor([1]).share(bob, alice)
    with pytest.raises(sy.SMPCError, match="crypto provider"):
        x * x
    y = torch.tensor([1]).share(alice, bob)
    with pytest.raises(sy.SMPCError, match="different parties"):
        x + y
    with pytest.raises(sy.SMPCError, match="comparison of shared values needs a crypto provider"):
        x > x  # noqa: B015
    with pytest.raises(sy.SMPCError, match="secret"):
        bool(x)
    assert x.get().item() == 1


def test_a_pointers_data_is_shared_where_it_is(parties: Any, requests: list[Any]) -> None:
    """PySyft Part 10: ``remote.fix_precision().share(...)``; the data never passes the coordinator."""
    bob, alice, _, carol = parties
    p = torch.tensor([1.5, 2.25]).send(bob)
    q = torch.tensor([0.5, 0.25]).send(alice)
    requests.clear()
    ep = p.fix_precision().share(bob, alice, crypto_provider=carol)
    eq = q.fix_precision().share(bob, alice, crypto_provider=carol)
    assert isinstance(ep, PointerToShared) and ep.location is bob
    total = ep.get() + eq.get()
    assert not [r for r in requests if r[1] == Kind.GET]  # nothing came back so far
    assert [r for r in requests if r[1] == Kind.CMD and r[2][0] == "fedws.smpc.split"]
    avg = total.get().float_precision() / 2
    assert torch.allclose(avg, torch.tensor([1.0, 1.25]))


def test_the_coordinator_never_holds_a_triple(parties: Any, requests: list[Any]) -> None:
    bob, alice, bill, carol = parties
    x = torch.tensor([3, 4]).share(bob, alice, bill, crypto_provider=carol)
    y = torch.tensor([5, 6]).share(bob, alice, bill, crypto_provider=carol)
    requests.clear()
    z = x * y
    gets = [r for r in requests if r[1] == Kind.GET]
    assert len(gets) == 6 and {g[0] for g in gets} == {"bob", "alice", "bill"}  # e and d: a share each
    to_carol = [r for r in requests if r[0] == "carol"]
    # the triple command, then letting each party reach its shares: nothing gotten or stored
    assert [(r[1], r[2][0]) for r in to_carol] == [(Kind.CMD, "fedws.smpc.triple")] + [(Kind.CMD, "fedws.share")] * 9
    assert not [r for r in requests if r[1] == Kind.STORE and r[0] == "carol"]
    assert z.get().tolist() == [15, 24]


def test_every_worker_holds_one_share_of_each_value_and_no_more(parties: Any) -> None:
    """After products (triples moved, masks opened, 3-party truncation) nothing lingers:
    each party holds exactly its share of each live value, the crypto provider nothing."""
    from conftest import stored_count

    bob, alice, bill, carol = parties
    x = torch.tensor([1.5, -2.0]).fix_precision().share(bob, alice, bill, crypto_provider=carol)
    y = torch.tensor([2.0, 3.0]).fix_precision().share(bob, alice, bill, crypto_provider=carol)
    z = x * y
    assert [stored_count(w) for w in (bob, alice, bill, carol)] == [3, 3, 3, 0]
    assert torch.allclose(z.get().float_precision(), torch.tensor([3.0, -6.0]))
    assert [stored_count(w) for w in (bob, alice, bill, carol)] == [2, 2, 2, 0]


def test_a_partys_shares_are_uniform_and_independent_of_the_secret(parties: Any) -> None:
    """What one worker holds, over 20,000 elements: uniform over the ring, whatever the secret;
    for shares made here, made by a node (``ptr.share``) and for triple shares."""
    bob, alice, _, carol = parties
    n = 20_000
    zeros = torch.zeros(n, dtype=torch.int64).share(bob, alice)
    large = torch.full((n,), 10**12, dtype=torch.int64).share(bob, alice)
    for who in ("bob", "alice"):
        a, b = zeros.child[who].get(), large.child[who].get()
        assert_uniform(a)
        assert_uniform(b)
        assert_same_distribution(a, b)
    remote = torch.full((n,), 10**12, dtype=torch.int64).send(bob).share(bob, alice).get()
    for who in ("bob", "alice"):
        assert_uniform(remote.child[who].get())
    a, b, c = request_triple(carol, "mul", [n], [n], [bob, alice])
    assert [p.location.id for p in a] == ["bob", "alice"]
    for share in (a[0], b[1], c[0], c[1]):
        assert_uniform(share.get())


def test_comparisons_relu_and_max(parties: Any) -> None:
    bob, alice, bill, carol = parties
    v = torch.tensor([-7, 0, 3, 2**40, -(2**40), 5])
    w = torch.tensor([-7, 1, -3, 2**40 - 1, 7, 5])
    three = v.share(bob, alice, bill, crypto_provider=carol)  # A2B with two binary additions
    assert (three < w.share(bob, alice, bill, crypto_provider=carol)).get().tolist() == (v < w).long().tolist()
    a, b = v.share(bob, alice, crypto_provider=carol), w.share(bob, alice, crypto_provider=carol)
    assert (a > b).get().tolist() == (v > w).long().tolist()
    assert (a <= b).get().tolist() == (v <= w).long().tolist()
    assert (a >= b).get().tolist() == (v >= w).long().tolist()
    assert (a == b).get().tolist() == (v == w).long().tolist()
    assert (a != b).get().tolist() == (v != w).long().tolist()
    assert (a > 2).get().tolist() == (v > 2).long().tolist()
    assert a.relu().get().tolist() == v.relu().tolist()
    m = torch.tensor([[2, 3, 9], [4, 1, 0], [5, -1, 3]])
    x = m.share(bob, alice, crypto_provider=carol)
    assert x.max().get().tolist() == [9]
    values, indices = x.max(dim=1)
    assert values.get().tolist() == [9, 4, 5] and indices.get().tolist() == [2, 0, 0]
    values, indices = x.max(dim=0)
    assert values.get().tolist() == [5, 3, 9] and indices.get().tolist() == [2, 0, 0]
    f = torch.tensor([0.5, -0.25, 1.0]).fix_precision().share(bob, alice, crypto_provider=carol)
    g = torch.tensor([0.25, -0.5, 1.0]).fix_precision().share(bob, alice, crypto_provider=carol)
    assert (f > g).get().float_precision().tolist() == [1.0, 1.0, 0.0]
    assert (f == g).get().float_precision().tolist() == [0.0, 0.0, 1.0]
    assert f.relu().get().float_precision().tolist() == [0.5, 0.0, 1.0]
    assert f.max().get().float_precision().tolist() == [1.0]


def test_a_comparison_opens_only_masks(parties: Any, requests: list[Any]) -> None:
    """Every value the coordinator gets during a comparison is a share of a masked value
    (x ^ a, y ^ b, bit ^ r), never of the operands; the crypto provider gives nothing back."""
    bob, alice, _, carol = parties
    x = torch.tensor([25]).share(bob, alice, crypto_provider=carol)
    y = torch.tensor([5]).share(bob, alice, crypto_provider=carol)
    requests.clear()
    z = x > y
    gets = [r for r in requests if r[1] == Kind.GET]
    assert {g[0] for g in gets} == {"bob", "alice"}
    assert len(gets) == 2 * 2 * 7 + 2  # 7 ANDs (e and d of each party), then bit ^ r
    shares = {x.child["bob"].id_at_location, x.child["alice"].id_at_location,
              y.child["bob"].id_at_location, y.child["alice"].id_at_location}
    assert not shares & {g[2][0] for g in gets}
    assert not [r for r in requests if r[0] == "carol" and r[1] != Kind.CMD]
    assert z.get().tolist() == [1]


def test_a_shared_model_evaluates_shared_inputs(parties: Any) -> None:
    """``model.fix_precision().share(...)``: encrypted inference through Linear and ReLU."""
    bob, alice, _, carol = parties

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(4, 3)
            self.fc2 = torch.nn.Linear(3, 1)

        def forward(self, x: Any) -> Any:
            return self.fc2(torch.nn.functional.relu(self.fc1(x)))

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(5, 4)
    with torch.no_grad():
        want = model(x)
    assert model.fix_precision().share(bob, alice, crypto_provider=carol) is model
    assert isinstance(model.fc1.weight, FixedPrecisionTensor)
    assert isinstance(model.fc1.weight.child, AdditiveSharingTensor)
    out = model(x.fix_precision().share(bob, alice, crypto_provider=carol)).get().float_precision()
    assert torch.allclose(out, want, atol=5e-3)
    model.get().float_precision()
    assert isinstance(model.fc1.weight, torch.nn.Parameter)
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=2e-3)
    with pytest.raises(sy.SMPCError, match="fix_precision"):
        Net().share(bob, alice)
