"""Hooking must not break torch: a slice of torch's own public API, run after TorchHook.

Also the TorchScript side of pointers: a ``torch.jit.script`` ed loss trains a remote model
on both transports, and an in-process node computes in the torch state a node process has,
whatever state its caller's thread is in.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

import fedws as sy


@pytest.fixture(autouse=True)
def _hooked(hook: sy.TorchHook) -> sy.TorchHook:
    """Every test here runs after ``sy.TorchHook(torch)``."""
    assert hasattr(torch.Tensor, "send") and hasattr(nn.Module, "send")
    return hook


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))


@torch.jit.script
def _scripted_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((pred - target) ** 2).mean()


def test_jit_trace_and_script_a_module() -> None:
    x = torch.randn(5, 2)
    lin = nn.Linear(2, 1)
    traced = torch.jit.trace(lin, x)
    scripted = torch.jit.script(nn.Linear(2, 1))
    torch.testing.assert_close(traced(x), lin(x))
    assert scripted(x).shape == (5, 1)
    model = _model()
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))
    assert nn.Module.location.fget(lin) is None  # the hook's property is still there, for Python


def test_jit_script_a_function_and_save_load() -> None:
    x, y = torch.randn(4, 1), torch.randn(4, 1)
    torch.testing.assert_close(_scripted_loss(x, y), ((x - y) ** 2).mean())
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(_model()), buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    torch.testing.assert_close(loaded(torch.ones(1, 2)), _model()(torch.ones(1, 2)))


@pytest.mark.parametrize(
    "name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam", "ASGD", "Rprop"]
)
def test_local_optimizers_single_and_foreach_agree(name: str) -> None:
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    finals = []
    for foreach in (False, True):
        model = _model()
        opt = getattr(torch.optim, name)(model.parameters(), lr=0.01, foreach=foreach)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        finals.append([p.detach().clone() for p in model.parameters()])
        assert all(type(v) is torch.Tensor for s in opt.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b)
    assert not torch.equal(finals[0][0], _model()[0].weight.detach())


def test_optimizer_grouping_is_torchs_own_for_local_tensors() -> None:
    from torch.optim import Optimizer

    a, b = torch.ones(2), torch.ones(3, dtype=torch.float64)
    lists = [[a, b], [a.clone(), b.clone()]]
    ours = Optimizer._group_tensors_by_device_and_dtype(lists, with_indices=True)
    theirs = torch._C._group_tensors_by_device_and_dtype(lists, True)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key][1] == theirs[key][1]
        for la, lb in zip(ours[key][0], theirs[key][0]):
            assert all(t1 is t2 for t1, t2 in zip(la, lb))


def test_state_dict_round_trips() -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    nn.functional.mse_loss(model(torch.randn(4, 2)), torch.randn(4, 1)).backward()
    opt.step()
    other = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    other.load_state_dict(model.state_dict())
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
    opt2 = torch.optim.Adam(other.parameters(), lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_deepcopy_of_modules_and_tensors() -> None:
    model = _model()
    twin = copy.deepcopy(model)
    assert twin is not model and twin[0].weight is not model[0].weight
    assert torch.equal(twin[0].weight, model[0].weight) and twin[0].weight.requires_grad
    t = torch.randn(3, requires_grad=True)
    t2 = copy.deepcopy(t)
    assert torch.equal(t, t2) and t2.requires_grad and t2 is not t


def test_torch_save_and_load_in_memory() -> None:
    model, t = _model(), torch.arange(6.0).reshape(2, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "t": t}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    assert torch.equal(back["t"], t)
    assert torch.equal(back["model"]["0.weight"], model[0].weight)


def test_torch_compile_on_cpu() -> None:
    model, x = _model(), torch.randn(4, 2)
    try:
        compiled = torch.compile(model, backend="aot_eager")
        out = compiled(x)
    except Exception as exc:  # no compiler stack on this machine: nothing of ours to test
        pytest.skip(f"torch.compile unavailable here: {type(exc).__name__}: {exc}")
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    assert model[0].weight.grad is not None


@pytest.mark.parametrize("foreach", [None, False, True])
def test_clip_grad_norm(foreach: bool | None) -> None:
    model = _model()
    (model(torch.randn(8, 2)) * 100).sum().backward()
    norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=foreach)
    assert norm > 1.0
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    torch.testing.assert_close(total, torch.tensor(1.0), atol=1e-4, rtol=1e-4)


def test_dataloader() -> None:
    data = TensorDataset(torch.arange(10.0).reshape(5, 2), torch.arange(5))
    batches = list(DataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(b[1]) for b in batches] == [2, 2, 1]
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == [0, 1, 2, 3, 4]


# -- TorchScript on pointers, on both transports -----------------------------------------


def test_scripted_loss_trains_a_remote_model(make_worker) -> None:
    bob = make_worker("bob")
    local = _model()
    remote = copy.deepcopy(local)
    x, y = torch.randn(6, 2), torch.randn(6, 1)
    _scripted_loss(local(x), y).backward()
    remote.send(bob)
    loss = _scripted_loss(remote(x.send(bob)), y.send(bob))
    assert isinstance(loss, sy.PointerTensor) and loss.location is bob
    loss.backward()
    remote.get()
    for p, q in zip(local.parameters(), remote.parameters()):
        torch.testing.assert_close(q.grad, p.grad)


def test_torchscript_without_python_source_is_refused_on_pointers(make_worker) -> None:
    bob = make_worker("bob")
    x = torch.ones(2, 1).send(bob)
    @torch.jit.script
    def plus_one(t: torch.Tensor) -> torch.Tensor:
        return t + 1

    del plus_one._torchdynamo_inline  # as from torch.jit.load: no Python source to run
    with pytest.raises(sy.PointerError, match="no Python source"):
        plus_one(x)
    with pytest.raises(sy.OpNotAllowedError, match="TorchScript module method"):
        torch.jit.script(nn.MSELoss())(x, x)


def test_node_computes_in_its_own_torch_state(make_worker) -> None:
    """What a caller's thread is in does not reach the node: below autograd (where a
    TorchScript kernel calls back into Python), or under a dispatch mode."""
    bob = make_worker("bob")
    model = _model()
    model.send(bob)
    x, y = torch.randn(4, 2).send(bob), torch.randn(4, 1).send(bob)
    with torch._C._AutoDispatchBelowADInplaceOrView():
        loss = ((model(x) - y) ** 2).sum()
    loss.backward()  # a VirtualWorker used to answer: element 0 of tensors does not require grad
    assert model[0].weight.grad is not None
    assert model[0].weight.grad.get().abs().sum() > 0

    class CountNodeOps(TorchDispatchMode):
        seen = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if any(isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.shape == (1000,) for a in args):
                CountNodeOps.seen += 1
            return func(*args, **(kwargs or {}))

    z = torch.ones(1000).send(bob)
    with CountNodeOps():
        doubled = z * 2
        doubled.wait()
    assert CountNodeOps.seen == 0  # the node's multiplication is not the caller's business
    assert doubled.get().sum().item() == 2000


def test_workers_know_their_hook_as_in_pysyft(hook: sy.TorchHook) -> None:
    """PySyft code reaches the hook through a worker (``sy.local_worker.hook``)."""
    bob = sy.VirtualWorker(hook, id="bob-hook")
    assert sy.local_worker.hook is hook and bob.hook is hook
    assert sy.VirtualWorker(hook.federation, id="carol-hook").hook is None  # built from a Federation
