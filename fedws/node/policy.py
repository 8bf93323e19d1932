"""What a principal may do on a node, and what may leave it: the data owner's rules.

A node runs in one of two modes:

* ``"open"`` (development; VirtualWorkers and ``fedws worker --insecure-dev``): every
  coordinator may do everything, as in the tutorials. Nothing below is checked.
* ``"private"`` (the default of ``fedws worker``): every stored object has an owner (the
  :class:`Caller` — principal and session — that made it) and only its owner may use,
  read, change, delete, list or search it. Data the node serves from its config is owned by
  the node: any principal may compute on it, nobody may read, change or delete it. Values
  derived from private data are private too (the node tracks a flag per stored object).
  A private value leaves the node only through a release rule of :class:`Policy`:
  outputs of approved plans (by :func:`plan_digest`), or a differentially private release
  (:class:`DPRule`, accounted per principal by Opacus's RDP accountant).

The checks themselves live in :mod:`fedws.node.node` (they need its request handling); this
module holds the data of a policy and the pieces that do not depend on a request: who a
caller is, which ops write into which arguments, the plan digest, the DP mechanism and
its accountant. No I/O here.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..exceptions import PermissionDeniedError, PrivacyBudgetExceededError
from ..protocol.ops import is_inplace
from ..protocol.plan import PlanCode

__all__ = [
    "OPEN",
    "PRIVATE",
    "Caller",
    "NODE",
    "LOCAL",
    "DPRule",
    "Policy",
    "PERMISSIONS",
    "PrivacyAccountant",
    "plan_digest",
    "written_args",
    "dp_noise",
    "clip_and_noise",
    "BACKWARD_OPS",
]

OPEN = "open"
PRIVATE = "private"
MODES = (OPEN, PRIVATE)


class Caller:
    """Who sends a frame: a principal (named by the credential) and a session.

    A node interns one Caller per (principal, session), so ownership is checked by
    identity (``owner is caller``): one pointer comparison on the hot path. The session
    is what the client presented in the handshake (kept across reconnects of one handle)
    or one drawn for the connection; two coordinators that share a token are still two
    sessions and cannot touch each other's objects.
    """

    __slots__ = ("principal", "session", "address")

    def __init__(self, principal: str, session: str, address: str | None = None) -> None:
        self.principal = principal
        self.session = session
        self.address = address

    def __repr__(self) -> str:
        return f"<Caller {self.principal}/{self.session[:8]}>"


NODE = Caller("<node>", "node")
"""Owner of the data a node serves from its config."""

LOCAL = Caller("local", "local")
"""The coordinator of an in-process VirtualWorker (open mode)."""


@dataclass(frozen=True)
class DPRule:
    """Differentially private release of private values (Gaussian mechanism).

    A released tensor is clipped to L2 norm ``max_norm`` and gets Gaussian noise of standard
    deviation ``noise_multiplier * max_norm`` in every entry. Each release is one step of
    the Gaussian mechanism with sensitivity ``max_norm`` (sample rate 1); Opacus's RDP
    accountant adds them up per principal, and a release that would take the principal
    past ``epsilon`` at ``delta`` is refused.

    ``always``: every release of a private value is a DP release, even a plain ``get()``.
    """

    max_norm: float
    noise_multiplier: float
    epsilon: float
    delta: float = 1e-5
    always: bool = False

    def __post_init__(self) -> None:
        if not (self.max_norm > 0 and self.noise_multiplier > 0 and self.epsilon > 0 and 0 < self.delta < 1):
            raise ValueError("dp: max_norm, noise_multiplier and epsilon must be > 0, and 0 < delta < 1")


@dataclass
class Policy:
    """The operator's rules for one node.

    Attributes:
        mode: :data:`OPEN` or :data:`PRIVATE`.
        approved_plans: hex digests (:func:`plan_digest`) of plans whose outputs — and the
            arguments they update in place — may leave the node.
        dp: differentially private release, or None (no DP release).
    """

    mode: str = OPEN
    approved_plans: frozenset[str] = field(default_factory=frozenset)
    dp: DPRule | None = None
    roles: dict[str, frozenset[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"policy must be one of {MODES}, got {self.mode!r}")
        self.approved_plans = frozenset(h.lower() for h in self.approved_plans)
        for principal, may in self.roles.items():
            unknown = set(may) - PERMISSIONS
            if unknown:
                raise ValueError(f"principal {principal!r}: unknown permissions {sorted(unknown)}")

    def allows(self, principal: str, permission: str) -> bool:
        """Whether ``principal`` may do ``permission`` (a principal with no role: all)."""
        may = self.roles.get(principal)
        return may is None or permission in may

    @property
    def enforce(self) -> bool:
        return self.mode == PRIVATE


PERMISSIONS = frozenset({"compute", "plans", "dp", "peers", "status", "smpc", "secagg"})
"""What an operator grants a principal (``[[tokens]] may = [...]``):

- ``compute``: use the data the node serves in commands and plans;
- ``plans``: store and run plans (an approved plan is the way its outputs leave);
- ``dp``: take differentially private releases (charged to its own budget);
- ``peers``: make the node link to a listed peer (pointer chains, move);
- ``status``: see the whole node in ``INFO "status"`` (``fedws status``): every session's
  objects, bytes and plans, the connections; without it, only its own session's numbers.
- ``smpc``: draw secret shares and Beaver triples (``fedws.smpc.*``, secure computation).
- ``secagg``: take part in secure aggregation (``fedws.secagg.*``: keys, masked updates).

A principal's own objects are always its own to compute on, read and delete.
"""


def plan_digest(code: PlanCode, state: list[torch.Tensor]) -> str:
    """The hex sha256 of a plan as the node keeps it: its code *and* its state tensors.

    Computed on the canonical msgpack encoding of :meth:`PlanCode.to_wire` (the same bytes
    a coordinator sends for the same plan), so a coordinator and an operator get the same
    digest for the same traced plan. The state is included because it is part of what
    the plan computes (captured constants are state): an approval covers exactly the code
    and the constants the operator reviewed; only the arguments are the caller's choice.
    """
    return code.digest(list(state))


# -- which arguments an op writes ---------------------------------------------------------

BACKWARD_OPS = frozenset({"Tensor.backward"})
"""Ops that write gradients into leaf tensors they do not name."""

_SET_OPS = frozenset({"fedws.set_grad", "fedws.set_data", "Tensor.set_", "Tensor.requires_grad_"})
# Functions that update tensors other than their first argument in place (running stats).
_WRITES_ALL = frozenset(
    name
    for base in ("batch_norm", "instance_norm", "native_batch_norm", "rrelu_with_noise", "_batch_norm_impl_index")
    for name in (f"torch.{base}", f"torch.nn.functional.{base}", f"torch.nn.functional.{base.lstrip('_')}")
)


def written_args(op: str, args: list[Any], kwargs: dict[str, Any]) -> list[Any]:
    """The tensors ``op(*args, **kwargs)`` may write into (its in-place targets).

    First argument of in-place ops (``add_``, ``__iadd__``, ``__setitem__``, ``.grad =``,
    ``.data =``, ``inplace=True``; every tensor of it for ``torch._foreach_*_``), whatever ``out=`` names, and every tensor argument of
    the few functions that update running statistics.
    """
    out: list[Any] = []
    if args and (op in _SET_OPS or is_inplace(op) or kwargs.get("inplace") is True):
        first = args[0]
        if isinstance(first, (list, tuple)):  # torch._foreach_*_: every tensor of the list
            out.extend(first)
        else:
            out.append(first)
    if "out" in kwargs:
        target = kwargs["out"]
        out.extend(target if isinstance(target, (list, tuple)) else [target])
    if op in _WRITES_ALL:
        out.extend(a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.Tensor))
    return out


def storage_key(t: Any) -> int:
    """Address of a tensor's storage (0: none, or not a plain CPU tensor)."""
    if not isinstance(t, torch.Tensor):
        return 0
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return 0


def refuse_writes(op: str, args: list[Any], kwargs: dict[str, Any], readonly: Iterable[int] | set[int],
                  worker: str | None) -> None:
    """Raise if ``op`` would write into the storage of data the node serves.

    Raises:
        PermissionDeniedError: a target shares storage with served data (a view of it too).
    """
    for t in written_args(op, args, kwargs):
        key = storage_key(t)
        if key and key in readonly:
            raise PermissionDeniedError(
                f"{op} would change data worker {worker!r} serves; served data is read-only "
                "(compute on a copy: x.clone())",
                worker=worker,
                op=op,
            )


def guarded(fn: Callable[..., Any], op: str, readonly: set[int], worker: str | None) -> Callable[..., Any]:
    """``fn`` refusing to write into served data (for plan steps, checked with real args)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        refuse_writes(op, list(args), kwargs, readonly, worker)
        return fn(*args, **kwargs)

    return call


def may_write(op: str, kwargs: dict[str, Any]) -> bool:
    """Whether ``op`` can write into one of its arguments at all (cheap pre-test)."""
    return (
        op in _SET_OPS or is_inplace(op) or op in _WRITES_ALL or "out" in kwargs or kwargs.get("inplace") is True
    )


# -- differential privacy -----------------------------------------------------------------

_rng_lock = threading.Lock()
_generator: torch.Generator | None = None


def _noise_generator() -> torch.Generator:
    global _generator
    with _rng_lock:
        if _generator is None:
            _generator = torch.Generator().manual_seed(secrets.randbits(63))  # the OS CSPRNG
        return _generator


def dp_noise(value: Any, rule: DPRule) -> torch.Tensor:
    """``value`` clipped to L2 norm ``rule.max_norm`` plus Gaussian noise (a new tensor).

    Raises:
        TypeError: not a floating-point tensor (only those can carry noise).
    """
    return clip_and_noise([value], rule.max_norm, rule.noise_multiplier)[0]


def clip_and_noise(
    values: list[Any], clip: float, noise_multiplier: float, reference: list[Any] | None = None
) -> list[torch.Tensor]:
    """The Gaussian mechanism on several tensors taken as one vector (a model update).

    ``values`` (minus ``reference``, when given: an update is the trained model minus the
    one the node was sent) are scaled together so their joint L2 norm is at most ``clip``,
    then every entry gets Gaussian noise of standard deviation ``noise_multiplier * clip``
    from the node's own generator (seeded from the OS CSPRNG, never by a caller). One
    call is one release of sensitivity ``clip``. Computed in float64; new tensors in the
    dtypes of ``values``.

    Raises:
        TypeError: a value is not a dense floating-point tensor, or a reference does not match.
    """
    for value in values:
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point or value.is_sparse:
            raise TypeError(
                f"a differentially private release needs a dense floating-point tensor, got "
                f"{type(value).__name__}{'' if not isinstance(value, torch.Tensor) else ' ' + str(value.dtype)}"
            )
    if reference is not None and (
        len(reference) != len(values)
        or not all(isinstance(r, torch.Tensor) and r.shape == v.shape for r, v in zip(reference, values))
    ):
        raise TypeError("a differentially private update needs one reference tensor of the same shape per value")
    with torch.no_grad():
        xs = [v.detach().to(torch.float64) for v in values]
        if reference is not None:
            xs = [x - r.detach().to(torch.float64) for x, r in zip(xs, reference)]
        norm = math.sqrt(sum(float(torch.linalg.vector_norm(x)) ** 2 for x in xs))
        if norm > clip:
            xs = [x * (clip / norm) for x in xs]
        sigma = noise_multiplier * clip
        gen = _noise_generator()
        out = []
        for x, v in zip(xs, values):
            if sigma > 0:
                with _rng_lock:
                    x = x + torch.normal(0.0, sigma, size=x.shape, generator=gen, dtype=torch.float64)
            out.append(x.to(v.dtype))
        return out


class PrivacyAccountant:
    """Privacy spent per principal under one :class:`DPRule` (Opacus's RDP accountant).

    Opacus is imported on the first DP release only: nodes without DP never pay for it.
    """

    def __init__(self, rule: DPRule) -> None:
        self.rule = rule
        self._releases: dict[str, int] = {}
        self._lock = threading.Lock()

    def epsilon(self, releases: int) -> float:
        """Epsilon at ``rule.delta`` after ``releases`` Gaussian releases."""
        if releases <= 0:
            return 0.0
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        acc.history = [(self.rule.noise_multiplier, 1.0, releases)]
        return float(acc.get_epsilon(delta=self.rule.delta))

    def spent(self, principal: str) -> float:
        with self._lock:
            n = self._releases.get(principal, 0)
        return self.epsilon(n)

    def charge(self, principal: str, *, worker: str | None = None) -> float:
        """Account one more release for ``principal``; return the epsilon spent after it.

        Raises:
            PrivacyBudgetExceededError: it would exceed ``rule.epsilon``; nothing is charged.
        """
        with self._lock:
            n = self._releases.get(principal, 0) + 1
            eps = self.epsilon(n)
            if not math.isfinite(eps) or eps > self.rule.epsilon:
                raise PrivacyBudgetExceededError(
                    f"privacy budget of principal {principal!r} exhausted: another release would "
                    f"spend epsilon {eps:.3g} > {self.rule.epsilon:g} (delta {self.rule.delta:g}) "
                    f"after {n - 1} release(s)",
                    worker=worker,
                )
            self._releases[principal] = n
            return eps
