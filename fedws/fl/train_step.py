"""A user's own training step, traced into one plan and run on the nodes.

The user writes ordinary PyTorch::

    def train_step(model, optimizer, x, y):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

and picks any optimizer fedws can replay (``torch.optim.SGD`` with momentum, dampening,
Nesterov and weight decay; ``Adam``/``AdamW`` with or without amsgrad), an lr scheduler,
gradient clipping and a number of local epochs. :func:`build_step_plan` traces the step
once into a :class:`~fedws.plans.Plan`; each minibatch is then one RUN_PLAN message.

Why not trace ``torch.optim``'s own ``step()``: its state is created lazily inside the first
step (a trace would record "make zeros" on every call), and Adam turns its step counter into
a Python float (``step.item()``), which a trace freezes at its build-time value. So the
``optimizer`` the step function receives is a :class:`FunctionalOptimizer`: the same update
arithmetic as ``torch.optim``'s single-tensor code, written with tensor ops on state tensors
that are plan arguments (so the state lives on the node, across rounds if wanted), and with
the learning rate a 0-dim tensor argument (so a schedule needs no retracing). The hyper-
parameters are read from a real ``torch.optim`` optimizer built by the user's spec, so the
defaults are torch's own.

The contract of a step function (checked when the plan is built, :class:`PlanError` if not):

- signature ``train_step(model, optimizer, x, y) -> loss``; ``x``, ``y`` one minibatch;
- it calls ``loss.backward()`` and ``optimizer.step()`` (once); it returns the batch's mean
  loss as a 0-dim tensor;
- only allowlisted torch ops on tensors; Python ``if``/``for`` only on values fixed at build
  time (shapes, constants) — never on tensor values: ``.item()``, ``.tolist()``, ``float(t)``,
  ``bool(t)`` and ``if loss > 1:`` are refused;
- gradients are cleared after every step (no accumulation across steps); ``max_grad_norm``
  clipping and the FedProx term (``proximal_mu``) are applied inside ``optimizer.step()``;
- ``optimizer.param_groups[0]["lr"]`` is the step's learning rate, a 0-dim tensor.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..exceptions import PlanError
from ..plans import Plan

__all__ = [
    "StepFn",
    "OptimizerSpec",
    "LocalStep",
    "FunctionalOptimizer",
    "build_step_plan",
    "default_train_step",
    "lr_schedule",
    "new_state",
]

StepFn = Callable[[nn.Module, Any, torch.Tensor, torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerLike = str | type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]

_KINDS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@dataclass(frozen=True)
class OptimizerSpec:
    """Which update rule a step uses, and its hyperparameters (``torch.optim``'s defaults filled in).

    Attributes:
        kind: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: the base learning rate (a round config's ``"lr"`` replaces it for that round).
        hyper: the other hyperparameters, as ``torch.optim``'s ``param_groups[0]`` has them.
    """

    kind: str
    lr: float
    hyper: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, optimizer: OptimizerLike | None, args: Mapping[str, Any] | None = None, *, lr: float | None = None) -> OptimizerSpec:
        """Read a spec from ``"Adam"``, ``torch.optim.Adam``, or ``lambda params: Adam(params, ...)``.

        Args:
            optimizer: a name, an optimizer class, or a factory of parameters. None: SGD.
            args: keyword arguments for the optimizer (``{"lr": 0.01, "weight_decay": 1e-4}``).
            lr: the learning rate when ``args`` gives none.

        Raises:
            PlanError: an optimizer whose update fedws cannot replay on a node.
        """
        kwargs = dict(args or {})
        if lr is not None:
            kwargs.setdefault("lr", lr)
        probe = [torch.zeros(1, requires_grad=True)]
        if optimizer is None:
            optimizer = "SGD"
        if isinstance(optimizer, str):
            cls_ = _KINDS.get(optimizer.lower())
            if cls_ is None:
                raise PlanError(f"optimizer {optimizer!r} is not supported in a node step; use one of SGD, Adam, AdamW")
            real = cls_(probe, **kwargs)
        elif isinstance(optimizer, type):
            real = optimizer(probe, **kwargs)
        else:
            real = optimizer(probe)
        kind = next((k for k, c in _KINDS.items() if type(real) is c), None)
        if kind is None:
            raise PlanError(
                f"optimizer {type(real).__name__} is not supported in a node step; use one of SGD, Adam, AdamW"
            )
        group = dict(real.param_groups[0])
        group.pop("params")
        if group.get("maximize") or group.get("differentiable"):
            raise PlanError(f"{type(real).__name__}: maximize and differentiable are not supported in a node step")
        if kind == "sgd" and group.get("nesterov") and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise PlanError("SGD: Nesterov momentum requires a momentum and zero dampening")
        base_lr = float(group.pop("lr"))
        keep = ("momentum", "dampening", "nesterov", "weight_decay", "betas", "eps", "amsgrad")
        hyper = tuple((k, _plain(group[k])) for k in keep if k in group)
        return cls(kind, base_lr, hyper)

    def get(self, name: str, default: Any = None) -> Any:
        return dict(self.hyper).get(name, default)

    def slots(self) -> int:
        """State tensors per trainable parameter."""
        if self.kind == "sgd":
            return 1 if self.get("momentum", 0.0) else 0
        return 3 if self.get("amsgrad") else 2


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return float(v)
    if isinstance(v, (list, tuple)):
        return tuple(_plain(x) for x in v)
    return v


def default_train_step(loss_fn: LossFn) -> StepFn:
    """The step most people write: zero grads, forward, loss, backward, optimizer step."""

    def train_step(model: nn.Module, optimizer: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        return loss

    train_step.__qualname__ = f"default_train_step[{getattr(loss_fn, '__name__', 'loss')}]"
    return train_step


@dataclass(frozen=True)
class LocalStep:
    """Everything about one node step except the model and the data.

    Attributes:
        train_step: ``train_step(model, optimizer, x, y) -> loss``.
        optimizer: the update rule.
        max_grad_norm: clip the gradients' global L2 norm to this before the update.
        lr_scheduler: ``lambda opt: StepLR(opt, step_size=1, gamma=0.5)``: a torch scheduler
            run on the coordinator to give each step its lr (restarted every round).
        scheduler_step: ``"epoch"`` (``scheduler.step()`` after each local epoch) or ``"batch"``.
    """

    train_step: StepFn
    optimizer: OptimizerSpec
    max_grad_norm: float | None = None
    lr_scheduler: SchedulerFactory | None = field(default=None, compare=False)
    scheduler_step: str = "epoch"

    def __post_init__(self) -> None:
        if self.scheduler_step not in ("epoch", "batch"):
            raise ValueError(f"scheduler_step must be 'epoch' or 'batch', got {self.scheduler_step!r}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        params = list(inspect.signature(self.train_step).parameters)
        if len(params) < 4:
            raise PlanError(
                f"train_step must take (model, optimizer, x, y), got ({', '.join(params)})"
            )

    def key(self) -> Hashable:
        """What the traced plan depends on (the lr and the schedule are arguments, not baked in)."""
        return (self.train_step, self.optimizer.kind, self.optimizer.hyper, self.max_grad_norm)


def lr_schedule(step: LocalStep, base_lr: float, epochs: int, batches_per_epoch: int) -> list[float]:
    """Each step's learning rate for one local run, from the user's torch scheduler."""
    if step.lr_scheduler is None:
        return [base_lr] * (epochs * batches_per_epoch)
    dummy = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([dummy], lr=base_lr)
    sched = step.lr_scheduler(opt)
    out: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(epochs):
            for _ in range(batches_per_epoch):
                out.append(float(opt.param_groups[0]["lr"]))
                opt.step()  # no grad: changes nothing, but keeps the scheduler's order check quiet
                if step.scheduler_step == "batch":
                    sched.step()
            if step.scheduler_step == "epoch":
                sched.step()
    return out


class FunctionalOptimizer:
    """What a traced step calls ``optimizer``: torch.optim's update, on state it is handed.

    Args:
        spec: the update rule.
        params: the trainable parameters.
        state: ``[step, *slots]``: a 0-dim step count, then ``spec.slots()`` tensors per
            parameter (momentum buffer; or exp_avg, exp_avg_sq[, max_exp_avg_sq]).
        lr: the step's learning rate (0-dim tensor).
        max_grad_norm: clip before the update.
        mu, anchor: the FedProx term: adds ``mu * (p - anchor)`` to each gradient, the
            gradient of ``mu/2 * ||w - w_global||^2``. None: no term.
    """

    def __init__(
        self,
        spec: OptimizerSpec,
        params: list[torch.Tensor],
        state: list[torch.Tensor],
        lr: torch.Tensor,
        *,
        max_grad_norm: float | None = None,
        mu: torch.Tensor | None = None,
        anchor: list[torch.Tensor] | None = None,
    ) -> None:
        self.spec = spec
        self.params = params
        self.state = state
        self.max_grad_norm = max_grad_norm
        self.mu = mu
        self.anchor = anchor
        self.steps_taken = 0
        self.param_groups = [{"params": params, "lr": lr, **dict(spec.hyper)}]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise PlanError("optimizer.step(closure) is not supported in a node step")
        self.steps_taken += 1
        lr: torch.Tensor = self.param_groups[0]["lr"]
        live = [(i, p) for i, p in enumerate(self.params) if p.grad is not None]
        with torch.no_grad():
            grads = [p.grad for _, p in live]
            if self.max_grad_norm is not None and grads:
                norms = torch.stack([torch.linalg.vector_norm(g, 2) for g in grads])
                total = torch.linalg.vector_norm(norms, 2)
                coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
                grads = [g.mul(coef) for g in grads]  # type: ignore[union-attr]
            if self.mu is not None and self.anchor is not None:
                grads = [g + self.mu * (p - self.anchor[i]) for g, (i, p) in zip(grads, live)]  # type: ignore[operator]
            count = self.state[0]
            count.add_(1)
            n = self.spec.slots()
            for g, (i, p) in zip(grads, live):
                assert g is not None
                slots = self.state[1 + i * n : 1 + (i + 1) * n]
                if self.spec.kind == "sgd":
                    self._sgd(p, g, slots, lr, count)
                else:
                    self._adam(p, g, slots, lr, count)

    def _sgd(self, p: torch.Tensor, g: torch.Tensor, slots: list[torch.Tensor], lr: torch.Tensor, count: torch.Tensor) -> None:
        s = self.spec
        wd, momentum = s.get("weight_decay", 0.0), s.get("momentum", 0.0)
        if wd:
            g = g.add(p, alpha=wd)
        if momentum:
            buf = slots[0]
            dampening = s.get("dampening", 0.0)
            moved = buf.mul(momentum).add(g, alpha=1 - dampening)
            if dampening:  # torch starts the buffer at the first gradient, undamped
                moved = torch.where(count == 1, g, moved)
            buf.copy_(moved)
            g = g.add(buf, alpha=momentum) if s.get("nesterov") else buf
        p.sub_(g * lr)

    def _adam(self, p: torch.Tensor, g: torch.Tensor, slots: list[torch.Tensor], lr: torch.Tensor, count: torch.Tensor) -> None:
        s = self.spec
        beta1, beta2 = s.get("betas")
        wd, eps = s.get("weight_decay", 0.0), s.get("eps")
        if wd:
            if s.kind == "adamw":
                p.mul_(1 - lr * wd)
            else:
                g = g.add(p, alpha=wd)
        exp_avg, exp_avg_sq = slots[0], slots[1]
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc1 = 1 - torch.pow(beta1, count)
        bc2_sqrt = torch.sqrt(1 - torch.pow(beta2, count))
        if s.get("amsgrad"):
            slots[2].copy_(torch.maximum(slots[2], exp_avg_sq))
            denom = (slots[2].sqrt() / bc2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
        p.sub_(exp_avg / denom * (lr / bc1))


_HOST_READS = {
    torch.Tensor.item: ".item()",
    torch.Tensor.tolist: ".tolist()",
    torch.Tensor.__bool__: "bool(tensor) (an `if` or `while` on a tensor value)",
    torch.Tensor.__float__: "float(tensor)",
    torch.Tensor.__int__: "int(tensor)",
    torch.Tensor.__index__: "a tensor used as a Python index",
    torch.Tensor.numpy: ".numpy()",
}


class _NoHostReads(TorchFunctionMode):
    """Refuses reading a tensor's value into Python while a step is traced.

    The tracer would freeze such a value at build time: the plan would then replay the first
    batch's loss or branch on every batch, silently.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        what = _HOST_READS.get(func)
        if what is not None:
            raise PlanError(
                f"train step {self.name!r} reads a tensor's value into Python ({what}); a plan records "
                "tensor ops only, so that value would be frozen at build time. Keep values as tensors "
                "(torch.where instead of if, return the loss tensor instead of loss.item())",
            )
        return func(*args, **(kwargs or {}))


def build_step_plan(
    model: nn.Module,
    step: LocalStep,
    *,
    x_like: tuple[tuple[int, ...], torch.dtype],
    y_like: tuple[tuple[int, ...], torch.dtype],
    proximal: bool = False,
) -> Plan:
    """Trace one user step of ``model`` as a plan.

    The plan is called as ``plan(x, y, idx, lr, mu, loss_sum, params, buffers, opt_state,
    anchor)``: the node's whole shard, the minibatch's row indices, the step's lr and the
    FedProx mu (0-dim tensors), the running loss total, ``list(model.parameters())``,
    ``list(model.buffers())``, the optimizer state (:class:`FunctionalOptimizer`) and, with
    ``proximal``, the round's starting parameters (else an empty list). It updates
    parameters, buffers, optimizer state and ``loss_sum`` in place, leaves every grad None,
    and returns the batch's loss sum.

    Raises:
        PlanError: the step breaks the contract (see the module docstring).
        OpNotAllowedError: it uses a torch call outside the allowlist.
    """
    net = copy.deepcopy(model)
    params = list(net.parameters())
    for p in params:
        p.grad = None
    trainable: list[torch.Tensor] = [p for p in params if p.requires_grad]
    name = getattr(step.train_step, "__name__", "train_step")
    user_step = step.train_step
    spec = step.optimizer

    def run_step(
        x: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        lr: torch.Tensor,
        mu: torch.Tensor,
        loss_sum: torch.Tensor,
        params: list[torch.Tensor],
        buffers: list[torch.Tensor],
        opt_state: list[torch.Tensor],
        anchor: list[torch.Tensor],
    ) -> torch.Tensor:
        opt = FunctionalOptimizer(
            spec, trainable, opt_state, lr, max_grad_norm=step.max_grad_norm,
            mu=mu if proximal else None, anchor=anchor if proximal else None,
        )
        with _NoHostReads(name):
            loss = user_step(net, opt, x[idx], y[idx])
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise PlanError(f"train step {name!r} must return the batch's mean loss as a 0-dim tensor")
        if opt.steps_taken != 1:
            raise PlanError(
                f"train step {name!r} must call optimizer.step() exactly once, it called it {opt.steps_taken} times",
            )
        with torch.no_grad():
            for p in trainable:
                p.grad = None
            batch = loss.detach() * idx.shape[0]
            loss_sum.add_(batch)
        return batch

    dtype = param_dtype(params)
    example = (
        *example_batch(x_like, y_like),
        torch.tensor(spec.lr, dtype=dtype),
        torch.zeros((), dtype=dtype),
        torch.zeros((), dtype=dtype),
        params,
        list(net.buffers()),
        new_state(trainable, spec, dtype),
        [p.detach().clone() for p in trainable] if proximal else [],
    )
    plan = Plan(run_step, name=name)
    plan.build(*example)
    return plan


TensorLike = tuple[tuple[int, ...], torch.dtype]


def example_batch(x_like: TensorLike, y_like: TensorLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A two-example batch ``(x, y, indices)`` of the data's signature, to trace a step plan on.

    The built-in step and a user's step are traced on the same example inputs, so their plans
    (and the digests operators approve) depend only on what the step does.
    """
    return (
        torch.zeros((2, *x_like[0]), dtype=x_like[1]),
        torch.zeros((2, *y_like[0]), dtype=y_like[1]),
        torch.arange(2),
    )


def param_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    """The floating dtype of a model's parameters (lr and loss tensors of a step use it)."""
    return next((p.dtype for p in params if p.dtype.is_floating_point), torch.get_default_dtype())


def new_state(trainable: Sequence[torch.Tensor], spec: OptimizerSpec, dtype: torch.dtype) -> list[torch.Tensor]:
    """Fresh optimizer state (works on pointers too: ``zeros_like`` runs where ``p`` is)."""
    slots = [torch.zeros_like(p) for p in trainable for _ in range(spec.slots())]
    return [torch.zeros((), dtype=dtype), *slots]
