"""Remote ops through pointers: operators, torch functions, methods, multi-output ops,
shapes known locally, async waiting, and nn.Module/optimizer on sent models."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn, optim

import fedws as sy

A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
B = torch.tensor([[0.5, -1.0], [2.0, 0.25]])


@pytest.fixture
def bob(make_worker):
    return make_worker("bob")


BINARY = [operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul, operator.pow]


@pytest.mark.parametrize("op", BINARY)
def test_binary_operators(bob, op) -> None:
    a, b = A.send(bob), B.send(bob)
    assert torch.allclose(op(a, b).get(), op(A, B))
    if op is not operator.matmul:
        assert torch.allclose(op(a, 2.0).get(), op(A, 2.0))  # pointer op scalar
        assert torch.allclose(op(3.0, a).get(), op(3.0, A))  # reflected


@pytest.mark.parametrize("op", [operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow])
def test_inplace_operators_keep_the_pointer(bob, op) -> None:
    a, b = A.clone().send(bob), B.send(bob)
    same = a
    a = op(a, b)
    assert a is same
    assert torch.allclose(a.get(), op(A.clone(), B))


def test_neg_abs_and_methods(bob) -> None:
    a, b = A.send(bob), B.send(bob)
    assert torch.equal((-a).get(), -A)
    assert torch.equal((-a).abs().get(), A)
    assert torch.equal(a.mm(b).get(), A.mm(B))
    assert torch.equal(a.sum().get(), A.sum())
    assert torch.equal(a.sum(0).get(), A.sum(0))
    assert torch.equal(a.view(4).get(), A.view(4))
    assert torch.equal(a.view(-1, 1).get(), A.view(-1, 1))
    assert torch.equal(a[1].get(), A[1])
    assert torch.equal(a.t().contiguous().get(), A.t())


def test_torch_functions(bob) -> None:
    a, b = A.send(bob), B.send(bob)
    assert torch.equal(torch.add(a, b).get(), torch.add(A, B))
    assert torch.equal(torch.add(a, b, alpha=2).get(), torch.add(A, B, alpha=2))
    assert torch.equal(torch.cat([a, b], dim=1).get(), torch.cat([A, B], dim=1))
    assert torch.allclose(torch.nn.functional.softmax(a, dim=1).get(), A.softmax(1))
    assert torch.equal(torch.where(a > 2, a, b).get(), torch.where(A > 2, A, B))
    assert torch.allclose(torch.linalg.norm(a).get(), torch.linalg.norm(A))


def test_multi_output_ops_return_tuples_of_pointers(bob) -> None:
    a = A.send(bob)
    mx = torch.max(a, 0)
    assert isinstance(mx, tuple) and all(isinstance(p, sy.PointerTensor) for p in mx)
    assert mx.values.shape == (2,) and mx.indices.dtype == torch.int64
    ref = torch.max(A, 0)
    assert torch.equal(mx.values.get(), ref.values) and torch.equal(mx.indices.get(), ref.indices)
    parts = torch.arange(5.0).send(bob).split(2)
    assert [p.shape for p in parts] == [(2,), (2,), (1,)]
    assert [p.get().tolist() for p in parts] == [[0.0, 1.0], [2.0, 3.0], [4.0]]
    vals, idx = torch.sort(a, descending=True)
    ref_vals, ref_idx = torch.sort(A, descending=True)
    assert torch.equal(vals.get(), ref_vals) and torch.equal(idx.get(), ref_idx)


def test_shape_and_dtype_known_locally(bob) -> None:
    x = torch.ones(3, 4, dtype=torch.float64).send(bob)
    assert x.shape == (3, 4) and x.dtype == torch.float64 and x.dim() == 2 and x.numel() == 12
    y = x @ torch.ones(4, 2, dtype=torch.float64).send(bob)
    assert y.shape == (2 * 0 + 3, 2) and y.dtype == torch.float64
    assert x.sum().shape == () and (x > 0).dtype == torch.bool
    assert x.to(torch.int32).dtype == torch.int32
    assert len(x) == 3
    # data-dependent shapes are asked of the node
    nz = (torch.tensor([0, 1, 0, 2]).send(bob)).nonzero()
    assert nz.shape == (2, 1)


def test_local_shape_errors_still_reach_the_node_error(bob) -> None:
    with pytest.raises(sy.RemoteError, match="cannot be multiplied"):
        A.send(bob).mm(torch.ones(3, 3).send(bob)).get()


async def test_await_pointer_and_get_async(bob) -> None:
    x = torch.tensor([1.0, 2.0]).send(bob)
    y = x * 3
    assert await y is y
    assert (await y.get_async()).tolist() == [3.0, 6.0]
    assert (await x.get_async()).tolist() == [1.0, 2.0]


def test_wait_returns_self(bob) -> None:
    x = torch.ones(2).send(bob)
    assert x.wait() is x and x.future().result(10) is None


def test_module_send_get_copy_move(make_worker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    bob.add_worker(alice)
    alice.add_worker(bob)
    model = nn.Linear(2, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model.weight
    model.send(bob)
    assert model.weight is weight and isinstance(model.weight, sy.PointerParameter)
    assert model.location is bob
    out = model(torch.ones(1, 2).send(bob))
    assert out.shape == (1, 1)
    expected = before["weight"].sum() + before["bias"]
    assert torch.allclose(out.get().flatten(), expected)
    copy = model.copy()
    assert copy.weight is not model.weight and copy.location is bob
    copy.move(alice)
    assert copy.location is alice
    copy.get()
    assert torch.equal(copy.weight.data, before["weight"])
    model.get()
    assert type(model.weight) is nn.Parameter and model.weight is weight
    assert torch.equal(model.weight.data, before["weight"])
    with pytest.raises(sy.PointerError):
        model.move(alice)  # a local module must be sent first


def test_optimizer_steps_a_sent_model_remotely(bob) -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    local = nn.Linear(2, 1)
    local.load_state_dict(model.state_dict())
    data, target = torch.tensor([[1.0, 1], [0, 1]]), torch.tensor([[1.0], [0]])
    model.send(bob)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lopt = optim.SGD(local.parameters(), lr=0.1, momentum=0.9)
    d, t = data.send(bob), target.send(bob)
    for _ in range(5):
        opt.zero_grad()
        ((model(d) - t) ** 2).sum().backward()
        opt.step()
        lopt.zero_grad()
        ((local(data) - target) ** 2).sum().backward()
        lopt.step()
    model.get()
    assert torch.allclose(model.weight, local.weight, atol=1e-6)
    assert torch.allclose(model.bias, local.bias, atol=1e-6)


def test_multi_pointer_maps_operators_and_methods_over_every_worker(make_worker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    x = torch.tensor([1.0, 2.0, 3.0]).send(bob, alice)
    assert isinstance(x, sy.MultiPointerTensor) and set(x.children) == {"bob", "alice"}
    for value in ((x + 1) * 2 - x).get():
        assert value.tolist() == [3.0, 4.0, 5.0]
    assert [v.tolist() for v in (-x).get()] == [[-1.0, -2.0, -3.0]] * 2
    assert [v.tolist() for v in (2**x).get()] == [[2.0, 4.0, 8.0]] * 2
    assert (x @ x).get(sum_results=True).item() == 28.0
    assert [v.shape for v in x.view(3, 1).get()] == [torch.Size([3, 1])] * 2
    with pytest.raises(AttributeError):
        x.not_a_tensor_method  # noqa: B018
