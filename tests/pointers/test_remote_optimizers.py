"""Every torch.optim optimizer steps a model sent to a worker, and lands where local
training lands (float tolerance): single-tensor and foreach paths, lr schedulers,
zero_grad with and without set_to_none. The optimizer's state lives on the worker."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fedws as sy

OPTIMIZERS = [
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("Adam", {"lr": 0.05, "amsgrad": True}),
    ("AdamW", {"lr": 0.05, "weight_decay": 0.1}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.5, "centered": True}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01}),
    ("Adadelta", {"lr": 1.0, "weight_decay": 0.01}),
    ("Adamax", {"lr": 0.05}),
    ("NAdam", {"lr": 0.05}),
    ("RAdam", {"lr": 0.05}),
    ("ASGD", {"lr": 0.05, "t0": 1.0}),
    ("Rprop", {"lr": 0.05}),
]
# ASGD's foreach path multiplies the parameters by per-parameter tensors it keeps on the
# coordinator (mu, eta): local data mixed into remote math, refused with a LocationError.
CASES = [
    pytest.param(name, kw, foreach, id=f"{name}-{'foreach' if foreach else 'single'}")
    for name, kw in OPTIMIZERS
    for foreach in (False, True)
    if not (name == "ASGD" and foreach)
]


def _data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), torch.randn(8, 3), torch.randn(8, 2)


def _train(model: nn.Module, opt: torch.optim.Optimizer, data: torch.Tensor, target: torch.Tensor, steps: int,
           set_to_none: bool) -> None:
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    for _ in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        loss = ((model(data) - target) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zero"])
@pytest.mark.parametrize(("name", "kwargs", "foreach"), CASES)
def test_remote_training_equals_local(make_worker, one_torch_thread, name: str, kwargs: dict[str, float],
                                      foreach: bool, set_to_none: bool) -> None:
    bob = make_worker("bob")
    local, data, target = _data()
    remote = copy.deepcopy(local)
    cls = getattr(torch.optim, name)
    _train(local, cls(local.parameters(), foreach=foreach, **kwargs), data, target, 3, set_to_none)

    opt = cls(remote.parameters(), foreach=foreach, **kwargs)  # built before send, as tutorials do
    remote.send(bob)
    _train(remote, opt, data.send(bob), target.send(bob), 3, set_to_none)
    state_tensors = [v for s in opt.state.values() for v in s.values()
                     if isinstance(v, torch.Tensor) and v.dim() > 0]
    remote.get()

    for p_local, p_remote in zip(local.parameters(), remote.parameters()):
        assert type(p_remote) is nn.Parameter
        torch.testing.assert_close(p_remote.data, p_local.data, atol=1e-5, rtol=1e-4)
    if name not in ("SGD",) or kwargs.get("momentum"):
        assert state_tensors, "the optimizer kept no state"
    for t in state_tensors:  # moments, sums, buffers: on the worker, never copied back
        assert isinstance(t, sy.PointerTensor) and t.location is bob


def test_asgd_foreach_says_why(make_worker) -> None:
    bob = make_worker("bob")
    model, data, target = _data()
    opt = torch.optim.ASGD(model.parameters(), lr=0.05, foreach=True)
    model.send(bob)
    ((model(data.send(bob)) - target.send(bob)) ** 2).mean().backward()
    with pytest.raises(sy.LocationError, match="local tensor"):
        opt.step()


def test_clip_grad_norm_on_a_remote_model(make_worker) -> None:
    bob = make_worker("bob")
    local, data, target = _data()
    remote = copy.deepcopy(local)
    ((local(data) - target) ** 2).sum().backward()
    expected = nn.utils.clip_grad_norm_(local.parameters(), 0.5)
    remote.send(bob)
    ((remote(data.send(bob)) - target.send(bob)) ** 2).sum().backward()
    for foreach in (None, False):  # foreach=True: torch refuses the shells' meta device itself
        norm = nn.utils.clip_grad_norm_(remote.parameters(), 0.5, foreach=foreach)
        assert isinstance(norm, sy.PointerTensor)
    torch.testing.assert_close(norm.get(), torch.tensor(0.5), atol=1e-5, rtol=1e-4)  # clipped once already
    remote.get()
    for p_local, p_remote in zip(local.parameters(), remote.parameters()):
        torch.testing.assert_close(p_remote.grad, p_local.grad, atol=1e-5, rtol=1e-4)
    assert expected > 0.5


def test_out_argument_writes_the_pointer(make_worker) -> None:
    bob = make_worker("bob")
    a, b = torch.tensor([1.0, 5.0]).send(bob), torch.tensor([3.0, 2.0]).send(bob)
    out = torch.zeros(2).send(bob)
    assert torch.maximum(a, b, out=out) is out
    assert out.get().tolist() == [3.0, 5.0]
    with pytest.raises(sy.PointerError, match="out="):
        torch.maximum(a, b, out=torch.zeros(2))


def test_metadata_functions_are_answered_locally(make_worker) -> None:
    bob = make_worker("bob")
    x = torch.ones(2, 3).send(bob)
    assert torch.is_complex(x) is False and torch.is_floating_point(x) is True
    assert torch.numel(x) == 6 and torch.result_type(x, 1) == torch.float32
    with pytest.raises(sy.PointerError, match="get"):
        torch.is_nonzero(x)
    assert x.to(torch.ones(1, device="meta").device) is x  # a pointer's shell device is no place


def test_one_optimizer_follows_the_model_between_workers(make_worker) -> None:
    """Part 02 with Adam and one optimizer: the moments follow the model to each worker,
    and back home when the model trains locally again."""
    bob, alice = make_worker("bob"), make_worker("alice")
    local, data, target = _data()
    remote = copy.deepcopy(local)
    opt_local = torch.optim.Adam(local.parameters(), lr=0.05)
    opt = torch.optim.Adam(remote.parameters(), lr=0.05)
    for worker in (bob, alice, bob, None):
        for model, o, d, t in ((local, opt_local, data, target), (remote, opt, data, target)):
            if model is remote and worker is not None:
                model.send(worker)
                d, t = d.send(worker), t.send(worker)
            o.zero_grad()
            ((model(d) - t) ** 2).mean().backward()
            o.step()
            if model is remote and worker is not None:
                locations = {v.location.id for s in o.state.values() for v in s.values()
                             if isinstance(v, sy.PointerTensor)}
                assert locations == {worker.id}
                model.get()
    assert not any(isinstance(v, sy.PointerTensor) for s in opt.state.values() for v in s.values())
    for p_local, p_remote in zip(local.parameters(), remote.parameters()):
        torch.testing.assert_close(p_remote.data, p_local.data, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_one_optimizer_over_parameters_on_two_workers(make_worker, foreach: bool) -> None:
    """foreach groups by worker: each worker's tensors are updated by that worker's ops."""
    bob, alice = make_worker("bob"), make_worker("alice")
    torch.manual_seed(0)
    local = [nn.Linear(2, 2), nn.Linear(2, 1)]
    remote = copy.deepcopy(local)
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    opt_local = torch.optim.Adam([p for m in local for p in m.parameters()], lr=0.1, foreach=foreach)
    opt = torch.optim.Adam([p for m in remote for p in m.parameters()], lr=0.1, foreach=foreach)
    remote[0].send(bob)
    remote[1].send(alice)
    xb, ya = x.send(bob), y.send(alice)
    for _ in range(2):
        for o, (first, second), (d, t), (z0, z1) in (
            (opt_local, local, (x, y), (torch.zeros(4, 2), torch.zeros(4, 2))),
            (opt, remote, (xb, ya), (torch.zeros(4, 2).send(bob), torch.zeros(4, 2).send(alice))),
        ):
            o.zero_grad()
            ((first(d) - z0) ** 2).mean().backward()  # a loss on each worker
            ((second(z1) - t) ** 2).mean().backward()
            o.step()
    assert {v.location.id for s in opt.state.values() for k, v in s.items() if k != "step"} == {"bob", "alice"}
    for m_local, m_remote in zip(local, remote):
        m_remote.get()
        for p, q in zip(m_local.parameters(), m_remote.parameters()):
            torch.testing.assert_close(q.data, p.data, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["Adagrad", "Adam"])
def test_optimizer_built_after_send(make_worker, name: str) -> None:
    """Built on a sent model, state is made on the worker from the first step (Adagrad: at once)."""
    bob = make_worker("bob")
    local, data, target = _data()
    remote = copy.deepcopy(local)
    _train(local, getattr(torch.optim, name)(local.parameters(), lr=0.1), data, target, 2, True)
    remote.send(bob)
    opt = getattr(torch.optim, name)(remote.parameters(), lr=0.1)
    _train(remote, opt, data.send(bob), target.send(bob), 2, True)
    assert all(v.location is bob for s in opt.state.values() for k, v in s.items() if k != "step")
    remote.get()
    for p, q in zip(local.parameters(), remote.parameters()):
        torch.testing.assert_close(q.data, p.data, atol=1e-5, rtol=1e-4)
