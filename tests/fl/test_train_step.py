"""Your own training step (fedws.fl.train_step) run by FedAvg on real nodes and VirtualWorkers.

Every run is checked against the same training done locally with ``torch.optim`` (same
model, same minibatch order, same optimizer and scheduler) to float tolerance.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedws as sy
from fedws.exceptions import PlanError
from fedws.fl import FedAvg, FedAvgConfig, LocalStep, OptimizerSpec, step_plan_digest
from fedws.fl.local_training import _batch_generator

MakeWorker = Callable[..., sy.Worker]
FEATURES, CLASSES, N = 6, 3, 40

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, FEATURES, generator=g), torch.randint(0, CLASSES, (N,), generator=g)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))


def on_node(worker: sy.Worker, x: torch.Tensor, y: torch.Tensor) -> list[Any]:
    """The training shard, tagged as FedAvg looks for it (the pointers keep it alive)."""
    return [x.clone().tag("#train", "#x").send(worker), y.clone().tag("#train", "#y").send(worker)]


def my_step(model: nn.Module, optimizer: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


def reference(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: FedAvgConfig,
    make_opt: Callable[[Any], torch.optim.Optimizer],
    *,
    worker_id: str,
    rounds: int = 1,
    keep_state: bool = False,
    scheduler: Callable[[Any], Any] | None = None,
    clip: float | None = None,
    mu: float = 0.0,
) -> nn.Module:
    """The same local training, done here with torch.optim."""
    model = copy.deepcopy(model)
    opt = make_opt(model.parameters())
    for r in range(1, rounds + 1):
        if not keep_state and r > 1:
            opt = make_opt(model.parameters())
        start = [p.detach().clone() for p in model.parameters()]
        sched = scheduler(opt) if scheduler is not None else None
        gen = _batch_generator(cfg.seed, r, worker_id)
        for _ in range(cfg.local_epochs):
            order = torch.randperm(N, generator=gen)
            for lo in range(0, N, cfg.batch_size):
                idx = order[lo : lo + cfg.batch_size]
                opt.zero_grad()
                loss = F.cross_entropy(model(x[idx]), y[idx])
                if mu:
                    loss = loss + mu / 2 * sum(((p - s) ** 2).sum() for p, s in zip(model.parameters(), start))
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
            if sched is not None:
                sched.step()
    return model


def assert_same(a: nn.Module, b: nn.Module, atol: float = 2e-5) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=atol), f"{name}: max diff {(p - q).abs().max().item()}"


CASES: dict[str, dict[str, Any]] = {
    "adam": dict(optimizer="Adam", optimizer_args={"lr": 0.01}),
    "adamw": dict(optimizer=torch.optim.AdamW, optimizer_args={"lr": 0.01, "weight_decay": 0.1}),
    "sgd_wd_steplr": dict(
        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    ),
    "adam_clipped": dict(optimizer="Adam", optimizer_args={"lr": 0.05, "amsgrad": True}, max_grad_norm=0.1),
}
TORCH_OPT: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "sgd_wd_steplr": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam_clipped": lambda ps: torch.optim.Adam(ps, lr=0.05, amsgrad=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_step_with_each_optimizer_matches_a_local_torch_run(make_worker: MakeWorker, case: str) -> None:
    bob = make_worker("bob")
    x, y = data()
    keep = on_node(bob, x, y)
    model = make_model()
    cfg = FedAvgConfig(rounds=1, local_epochs=2, batch_size=16, seed=3)
    kwargs = CASES[case]
    history = FedAvg(model, [bob], cfg, train_step=my_step, progress=False, **kwargs).fit()
    want = reference(
        make_model(), x, y, cfg, TORCH_OPT[case], worker_id=bob.id,
        scheduler=kwargs.get("lr_scheduler"), clip=kwargs.get("max_grad_norm"),
    )
    assert_same(model, want)
    assert history[-1].train_loss > 0 and len(keep) == 2


@pytest.mark.parametrize("keep_state", [True, False])
def test_optimizer_state_is_kept_on_the_node_across_rounds_only_when_asked(
    make_worker: MakeWorker, keep_state: bool
) -> None:
    bob = make_worker("bob")
    x, y = data(1)
    keep = on_node(bob, x, y)
    model = make_model()
    cfg = FedAvgConfig(rounds=3, local_epochs=1, batch_size=16, keep_optimizer_state=keep_state)
    FedAvg(model, [bob], cfg, optimizer="Adam", optimizer_args={"lr": 0.02}, progress=False).fit()
    adam = lambda ps: torch.optim.Adam(ps, lr=0.02)  # noqa: E731
    want = reference(make_model(), x, y, cfg, adam, worker_id=bob.id, rounds=3, keep_state=keep_state)
    other = reference(make_model(), x, y, cfg, adam, worker_id=bob.id, rounds=3, keep_state=not keep_state)
    assert_same(model, want)
    assert not all(torch.allclose(p, q, atol=1e-4) for p, q in zip(model.parameters(), other.parameters()))
    assert len(keep) == 2


def test_fedprox_term_and_round_lr_come_from_the_round_config(make_worker: MakeWorker) -> None:
    bob = make_worker("bob")
    x, y = data(2)
    keep = on_node(bob, x, y)
    cfg = FedAvgConfig(rounds=1, local_epochs=2, batch_size=8, lr=0.5)
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.2)  # noqa: E731

    prox = make_model()
    FedAvg(prox, [bob], cfg, progress=False, round_config=lambda wid, r: {"proximal_mu": 1.0, "lr": 0.2}).fit()
    assert_same(prox, reference(make_model(), x, y, cfg, sgd, worker_id=bob.id, mu=1.0))

    plain = make_model()
    FedAvg(plain, [bob], cfg, progress=False, round_config=lambda wid, r: {"lr": 0.2}).fit()
    assert_same(plain, reference(make_model(), x, y, cfg, sgd, worker_id=bob.id))
    # The proximal term pulls towards the start: the update is smaller than without it.
    start = make_model()
    moved = lambda m: sum(((p - s) ** 2).sum() for p, s in zip(m.parameters(), start.parameters()))  # noqa: E731
    assert moved(prox) < moved(plain)
    assert len(keep) == 2


def test_a_step_reading_tensor_values_into_python_is_refused_at_build_time(make_worker: MakeWorker) -> None:
    bob = make_worker("bob")
    keep = on_node(bob, *data())

    def calls_item(model: nn.Module, optimizer: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        print(loss.item())
        return loss

    def branches_on_loss(model: nn.Module, optimizer: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if loss > 1.0:
            loss = loss * 2
        loss.backward()
        optimizer.step()
        return loss

    cfg = FedAvgConfig(rounds=1, batch_size=16)
    with pytest.raises(PlanError, match=r"\.item\(\)"):
        FedAvg(make_model(), [bob], cfg, train_step=calls_item, progress=False).fit()
    with pytest.raises(PlanError, match="if"):
        FedAvg(make_model(), [bob], cfg, train_step=branches_on_loss, progress=False).fit()

    def never_steps(model: nn.Module, optimizer: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    with pytest.raises(PlanError, match="optimizer.step"):
        FedAvg(make_model(), [bob], cfg, train_step=never_steps, progress=False).fit()
    assert len(keep) == 2


def test_unsupported_optimizers_are_refused_clearly() -> None:
    with pytest.raises(PlanError, match="RMSprop"):
        OptimizerSpec.of(torch.optim.RMSprop, {"lr": 0.1})
    with pytest.raises(PlanError, match="Adagrad"):
        OptimizerSpec.of("Adagrad")


def test_step_digest_depends_on_the_step_not_on_the_learning_rate() -> None:
    like = dict(x_like=((FEATURES,), torch.float32), y_like=((), torch.int64))
    adam1 = LocalStep(my_step, OptimizerSpec.of("Adam", {"lr": 0.1}))
    adam2 = LocalStep(my_step, OptimizerSpec.of("Adam", {"lr": 0.001}))
    sgd = LocalStep(my_step, OptimizerSpec.of("SGD", {"lr": 0.1}))
    d = step_plan_digest(make_model(), adam1, **like)  # type: ignore[arg-type]
    assert d == step_plan_digest(make_model(), adam2, **like)  # type: ignore[arg-type]
    assert d != step_plan_digest(make_model(), sgd, **like)  # type: ignore[arg-type]
    assert d != step_plan_digest(make_model(), adam1, proximal=True, **like)  # type: ignore[arg-type]


def test_a_private_node_runs_a_user_step_only_once_its_digest_is_approved(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from fedws.launch import start_node

    token = "tr41n-token"
    step = LocalStep(my_step, OptimizerSpec.of("Adam", {"lr": 0.01}))
    like = dict(x_like=((FEATURES,), torch.float32), y_like=((), torch.int64))
    digest = step_plan_digest(make_model(), step, proximal=True, **like)  # type: ignore[arg-type]
    x, y = data(4)
    save_file({"x": x, "y": y}, str(tmp_path / "d.safetensors"))
    lines = ['id = "alice"', "port = 0", "[release]", f'approved_plans = ["{digest}"]']
    for key, tag in (("x", "#x"), ("y", "#y")):
        lines += ["[[data]]", 'file = "d.safetensors"', f'key = "{key}"', f'tags = ["#train", "{tag}"]']
    (tmp_path / "alice.toml").write_text("\n".join(lines) + "\n")
    n = start_node(tmp_path / "alice.toml", extra_args=["--threads", "1", "--token", token])
    try:
        alice = sy.connect(n.url, token, hook=sy.TorchHook(torch, federation=sy.Federation()), timeout=30.0)
        cfg = FedAvgConfig(rounds=2, batch_size=16, keep_optimizer_state=True)
        prox = lambda wid, r: {"proximal_mu": 0.1}  # noqa: E731
        model = make_model()
        history = FedAvg(model, [alice], cfg, train_step=my_step, optimizer="Adam", optimizer_args={"lr": 0.01},
                         round_config=prox, progress=False).fit()
        assert [r.nodes for r in history] == [["alice"], ["alice"]]
        assert not torch.equal(next(model.parameters()), next(make_model().parameters()))
        # the same step without the proximal term is another plan: not approved, nothing leaves
        with pytest.raises(sy.RoundFailedError, match="PermissionDeniedError"):
            FedAvg(make_model(), [alice], cfg, train_step=my_step, optimizer="Adam", optimizer_args={"lr": 0.01},
                   progress=False).fit()
        alice.close()
    finally:
        n.stop()
