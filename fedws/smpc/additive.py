"""AdditiveSharingTensor: a secret split into additive shares held by several workers.

``x.share(bob, alice, crypto_provider=carol)`` gives one. It is a plain local object that
holds one :class:`~fedws.pointers.PointerTensor` per party (an int64 share in the ring
Z/2^64, see :mod:`.ring`), not a ``torch.Tensor`` subclass: nothing of it is a tensor on
the coordinator, and torch's own dispatch would only get in the way of operators that
must talk to several workers. (PySyft 0.2 wrapped it in a torch tensor so that
``model.fix_precision().share(...)`` could put it into modules; fedws puts the
fixed-precision values in the module's parameter slots and answers the layers' torch
calls through ``__torch_function__``, see :mod:`.module`.)

What each role sees:

- each party: its own share of every value (uniform over the ring, independent of the
  secret), and in a multiplication the opened masks ``e = x - a`` and ``d = y - b``, which
  are uniform too since ``a`` and ``b`` are uniform and unknown to it;
- the crypto provider: the triples it drew, never a share of the data;
- the coordinator: pointers, and the opened masks ``e`` and ``d`` (it sums the parties'
  shares of them: :func:`~fedws.smpc.beaver.beaver_product`); it learns the secret only by
  ``get()``, which sums every share — the same capability it had when it shared.

A share never reaches a worker that could reconstruct alone: the parties are distinct
workers, the crypto provider is not one of them, and every share moved between parties is
first re-split (:meth:`AdditiveSharingTensor.truncate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..client.worker import Worker
from ..exceptions import SMPCError
from ..pointers import PointerTensor
from ..pointers.tensor import learn_shape
from ..protocol.codec import ObjRef
from .beaver import beaver_product
from .compare import msb
from .ring import gather, move_all, remote_results, send_value, split_local

__all__ = ["AdditiveSharingTensor", "PointerToShared", "check_parties"]

Public = int | torch.Tensor


def check_parties(workers: Sequence[Any], crypto_provider: Any) -> list[Worker]:
    """The parties, refused if one of them (or the crypto provider) could reconstruct alone.

    Raises:
        SMPCError: fewer than two parties, a party twice, or the crypto provider a party.
    """
    parties = list(workers)
    if len(parties) < 2:
        raise SMPCError("share() needs at least two workers: one worker alone would hold the secret")
    for w in parties:
        if not isinstance(w, Worker):
            raise TypeError(f"share() expects workers, got {type(w).__name__}")
    ids = [w.id for w in parties]
    if len(set(ids)) != len(ids):
        raise SMPCError(f"share(): worker listed twice in {ids}: it would hold several shares of one secret")
    if crypto_provider is not None:
        if not isinstance(crypto_provider, Worker):
            raise TypeError(f"crypto_provider must be a worker, got {type(crypto_provider).__name__}")
        if crypto_provider.id in ids:
            raise SMPCError(
                f"crypto provider {crypto_provider.id!r} is also a party: with the triples it draws "
                "it could reconstruct the values multiplied"
            )
    return parties


def _shape_of(ptr: PointerTensor) -> tuple[int, ...]:
    if ptr.signature is None:
        learn_shape(ptr)
    return tuple(ptr.shape)


class AdditiveSharingTensor:
    """Additive shares of an int64 tensor, one pointer per party.

    Args:
        shares: one int64 share per party (their sum, wrapping, is the secret).
        crypto_provider: the worker that draws Beaver triples for multiplications.

    Example:
        >>> x = torch.tensor([25]).share(bob, alice, crypto_provider=carol)
        >>> (x * x + 1).get()
        tensor([626])
    """

    def __init__(self, shares: Sequence[torch.Tensor], crypto_provider: Worker | None = None) -> None:
        self.shares: list[PointerTensor] = []
        for s in shares:
            if not isinstance(s, PointerTensor):
                raise TypeError(f"a share is a pointer to a worker's tensor, not {type(s).__name__}")
            self.shares.append(s)
        self.crypto_provider = crypto_provider
        check_parties([s.location for s in self.shares], crypto_provider)

    # -- making one -----------------------------------------------------------------------

    @classmethod
    def from_tensor(
        cls, secret: torch.Tensor, workers: Sequence[Worker], crypto_provider: Worker | None = None
    ) -> AdditiveSharingTensor:
        """Share a local int64 tensor: the shares are drawn here (``secrets``) and sent."""
        parties = check_parties(workers, crypto_provider)
        shares = split_local(secret, len(parties))
        return cls([send_value(s, w) for s, w in zip(shares, parties)], crypto_provider)

    @classmethod
    def from_pointer(
        cls, secret: PointerTensor, workers: Sequence[Worker], crypto_provider: Worker | None = None
    ) -> AdditiveSharingTensor:
        """Share a remote int64 tensor where it is: its node splits it (its own CSPRNG) and
        each other party's share moves there node to node; the coordinator sees nothing."""
        parties = check_parties(workers, crypto_provider)
        secret.check_live()
        if secret._dtype() != torch.int64:
            raise SMPCError("share(): the remote tensor must be int64; call fix_precision() on a float one first")
        home = secret.location
        shape = _shape_of(secret)
        shares = remote_results(
            home, "fedws.smpc.split", [ObjRef(secret.id_at_location), len(parties)], [shape] * len(parties),
            secret.owner,
        )
        return cls(move_all(shares, parties), crypto_provider)

    # -- what it is -----------------------------------------------------------------------

    @property
    def workers(self) -> list[Worker]:
        """The parties, in share order."""
        return [s.location for s in self.shares]

    @property
    def child(self) -> dict[str, PointerTensor]:
        """Each party's share by worker id (PySyft's ``.child``)."""
        return {s.location.id: s for s in self.shares}

    @property
    def shape(self) -> torch.Size:
        return torch.Size(_shape_of(self.shares[0]))

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.location.id}:{s.id_at_location}" for s in self.shares)
        cp = f", crypto_provider={self.crypto_provider.id}" if self.crypto_provider is not None else ""
        return f"[AdditiveSharingTensor {list(self.shape)} | {parts}{cp}]"

    def get(self) -> torch.Tensor:
        """Reconstruct: bring every share back (freeing it) and sum them."""
        values = gather(self.shares)
        out = values[0].clone()
        for v in values[1:]:
            out.add_(v)
        return out

    # -- linear operations: each party on its own share ----------------------------------------

    def _same(self, shares: Sequence[torch.Tensor]) -> AdditiveSharingTensor:
        return AdditiveSharingTensor(shares, self.crypto_provider)

    def _provider(self, other: AdditiveSharingTensor) -> Worker | None:
        a, b = self.crypto_provider, other.crypto_provider
        if a is not None and b is not None and a is not b:
            raise SMPCError(f"shared values with different crypto providers ({a.id!r}, {b.id!r})")
        return a or b

    def _aligned(self, other: AdditiveSharingTensor) -> list[tuple[PointerTensor, PointerTensor]]:
        mine, theirs = [w.id for w in self.workers], [w.id for w in other.workers]
        if mine != theirs:
            raise SMPCError(f"shared values held by different parties: {mine} and {theirs}; share both with the same workers")
        return list(zip(self.shares, other.shares))

    def _public_on(self, value: Public, worker: Worker) -> Any:
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                return _ring_int(value.item())
            if value.is_floating_point():
                raise SMPCError("a public float operand needs fixed precision: fix_precision() the shared value")
            return send_value(value.to(torch.int64), worker)
        return _ring_int(value)

    def _each(self, fn: Callable[[PointerTensor], torch.Tensor]) -> AdditiveSharingTensor:
        return self._same([fn(s) for s in self.shares])

    def __add__(self, other: Any) -> AdditiveSharingTensor:
        if isinstance(other, AdditiveSharingTensor):
            return AdditiveSharingTensor([a + b for a, b in self._aligned(other)], self._provider(other))
        if isinstance(other, (int, torch.Tensor)) and not isinstance(other, bool):
            first = self.shares[0] + self._public_on(other, self.workers[0])
            return self._same([first, *self._broadcast_rest(first)])
        return NotImplemented

    __radd__ = __add__

    def __neg__(self) -> AdditiveSharingTensor:
        return self._each(lambda s: -s)

    def __sub__(self, other: Any) -> AdditiveSharingTensor:
        if isinstance(other, AdditiveSharingTensor):
            return AdditiveSharingTensor([a - b for a, b in self._aligned(other)], self._provider(other))
        if isinstance(other, (int, torch.Tensor)) and not isinstance(other, bool):
            first = self.shares[0] - self._public_on(other, self.workers[0])
            return self._same([first, *self._broadcast_rest(first)])
        return NotImplemented

    def __rsub__(self, other: Any) -> AdditiveSharingTensor:
        return (-self).__add__(other)

    def _broadcast_rest(self, first: torch.Tensor) -> list[torch.Tensor]:
        """Copies of the other parties' shares (a result never aliases an operand's share:
        getting one would free the other), expanded if a public operand broadcast the first."""
        shape = tuple(first.shape) if isinstance(first, PointerTensor) and first.signature is not None else None
        rest = self.shares[1:]
        if shape is None or all(tuple(s.shape) == shape for s in rest):
            return [s.clone() for s in rest]
        return [s.expand(shape).clone() for s in rest]

    def _product(self, other: AdditiveSharingTensor, kind: str) -> AdditiveSharingTensor:
        """A Beaver product (:mod:`.beaver`) with the crypto provider's triple."""
        pairs = self._aligned(other)
        provider = self._provider(other)
        if provider is None:
            raise SMPCError(
                "multiplying two shared values needs a crypto provider: "
                "share(..., crypto_provider=worker) (a worker that is not a party)"
            )
        shares = beaver_product([x for x, _ in pairs], [y for _, y in pairs], provider, kind)
        return AdditiveSharingTensor(shares, provider)

    def __mul__(self, other: Any) -> AdditiveSharingTensor:
        if isinstance(other, AdditiveSharingTensor):
            return self._product(other, "mul")
        if isinstance(other, (int, torch.Tensor)) and not isinstance(other, bool):
            return self._same([s * self._public_on(other, s.location) for s in self.shares])
        return NotImplemented

    __rmul__ = __mul__

    def mul(self, other: Any) -> AdditiveSharingTensor:
        return self.__mul__(other)

    def matmul(self, other: Any) -> AdditiveSharingTensor:
        """Matrix product with another shared value (a Beaver triple) or a public int64 tensor."""
        if isinstance(other, AdditiveSharingTensor):
            return self._product(other, "matmul")
        if isinstance(other, torch.Tensor):
            return self._same([torch.matmul(s, self._public_on(other, s.location)) for s in self.shares])
        raise TypeError(f"matmul of a shared value with {type(other).__name__}")

    mm = matmul
    __matmul__ = matmul

    def __rmatmul__(self, other: Any) -> AdditiveSharingTensor:
        if isinstance(other, torch.Tensor):
            return self._same([torch.matmul(self._public_on(other, s.location), s) for s in self.shares])
        return NotImplemented

    def copy(self) -> AdditiveSharingTensor:
        """Fresh shares of the same value (each party clones its own)."""
        return self._each(lambda s: s.clone())

    def sum(self, *args: Any, **kwargs: Any) -> AdditiveSharingTensor:
        return self._each(lambda s: s.sum(*args, **kwargs))

    def view(self, *shape: Any) -> AdditiveSharingTensor:
        return self._each(lambda s: s.view(*shape))

    def reshape(self, *shape: Any) -> AdditiveSharingTensor:
        return self._each(lambda s: s.reshape(*shape))

    def t(self) -> AdditiveSharingTensor:
        return self._each(lambda s: s.t())

    def __truediv__(self, other: Any) -> AdditiveSharingTensor:
        if isinstance(other, int) and not isinstance(other, bool):
            return self.truncate(other)
        return NotImplemented

    __floordiv__ = __truediv__

    # -- truncation ---------------------------------------------------------------------------

    def truncate(self, divisor: int) -> AdditiveSharingTensor:
        """Divide the secret by a public positive int, each party on its share (SecureML).

        Party 0 floors its share, party 1 floors the negation of its own and negates back;
        the result is the quotient up to 1 in the last place, wrong only with probability
        about ``|secret| / 2**63`` per element. With more than two parties, each other
        party first re-splits its share on its own node and gives one half to party 0 and
        one to party 1 (each half alone is uniform), keeping a zero share.
        """
        if not isinstance(divisor, int) or isinstance(divisor, bool) or divisor <= 0:
            raise SMPCError(f"a shared value is divided by a positive public int, not {divisor!r}")
        first, second, *rest = self.shares
        w0, w1 = first.location, second.location
        s0: torch.Tensor = first
        s1: torch.Tensor = second
        for s in rest:
            shape = _shape_of(s)
            u, v = remote_results(s.location, "fedws.smpc.split", [ObjRef(s.id_at_location), 2], [shape] * 2, s.owner)
            s0 = s0 + u.move(w0)
            s1 = s1 + v.move(w1)
        t0 = torch.div(s0, divisor, rounding_mode="floor")
        t1 = -torch.div(-s1, divisor, rounding_mode="floor")
        zeros = [s * 0 for s in rest]
        return self._same([t0, t1, *zeros])

    # -- comparisons (:mod:`.compare`): shared 0/1 results ----------------------------------

    def _need_provider(self, what: str) -> Worker:
        if self.crypto_provider is None:
            raise SMPCError(f"{what} of shared values needs a crypto provider: share(..., crypto_provider=worker)")
        return self.crypto_provider

    def _signs(self, other: Any) -> tuple[AdditiveSharingTensor, AdditiveSharingTensor]:
        """Shared bits ``(self < other, self > other)``: the sign bits of ``±(self - other)``,
        both in one run of the protocol."""
        diff = self._minus(other)
        provider = diff._need_provider("comparison")
        stacked = [torch.stack([d, -d]) for d in diff.shares]
        bits = msb(stacked, provider)
        return (AdditiveSharingTensor([b[0] for b in bits], provider),
                AdditiveSharingTensor([b[1] for b in bits], provider))

    def _minus(self, other: Any) -> AdditiveSharingTensor:
        diff = self.__sub__(other)
        if diff is NotImplemented:
            raise TypeError(f"cannot compare a shared value with {type(other).__name__}")
        return diff

    def __lt__(self, other: Any) -> AdditiveSharingTensor:
        diff = self._minus(other)
        return AdditiveSharingTensor(msb(diff.shares, diff._need_provider("comparison")), diff.crypto_provider)

    def __gt__(self, other: Any) -> AdditiveSharingTensor:
        diff = self._minus(other)
        provider = diff._need_provider("comparison")
        return AdditiveSharingTensor(msb((-diff).shares, provider), provider)

    def __ge__(self, other: Any) -> AdditiveSharingTensor:
        return self.__lt__(other).__rsub__(1)

    def __le__(self, other: Any) -> AdditiveSharingTensor:
        return self.__gt__(other).__rsub__(1)

    def __eq__(self, other: object) -> AdditiveSharingTensor:  # type: ignore[override]
        lt, gt = self._signs(other)
        return (lt + gt).__rsub__(1)

    def __ne__(self, other: object) -> AdditiveSharingTensor:  # type: ignore[override]
        lt, gt = self._signs(other)
        return lt + gt

    gt, lt, ge, le, eq, ne = __gt__, __lt__, __ge__, __le__, __eq__, __ne__
    __hash__ = object.__hash__

    def relu(self) -> AdditiveSharingTensor:
        """``max(x, 0)``: ``x * (x > 0)`` (a comparison and a Beaver product)."""
        return self * (self > 0)

    def max(self, dim: int | None = None) -> Any:
        """The largest value (``dim=None``, shape ``[1]``) or ``(values, indices)`` along ``dim``,
        by a tournament of comparisons; the indices are shared too."""
        x = self.view(-1) if dim is None else self
        d = 0 if dim is None else dim % x.dim()
        n = x.shape[d]
        shape = [1] * x.dim()
        shape[d] = n
        index: Any = torch.arange(n, dtype=torch.int64).view(shape).expand(tuple(x.shape)).clone()
        while n > 1:
            half = n // 2
            a, b = x.narrow(d, 0, half), x.narrow(d, half, half)
            ia, ib = _narrow(index, d, 0, half), _narrow(index, d, half, half)
            bit = a > b
            best = b + bit * (a - b)
            best_index = bit * (ia - ib) + ib
            if n % 2:
                best = best.cat(x.narrow(d, n - 1, 1), d)
                best_index = _cat(best_index, _narrow(index, d, n - 1, 1), d)
            x, index, n = best, best_index, best.shape[d]
        if dim is None:
            return x
        return x.squeeze(d), index.squeeze(d)

    def narrow(self, dim: int, start: int, length: int) -> AdditiveSharingTensor:
        return self._each(lambda s: s.narrow(dim, start, length))

    def squeeze(self, *dim: int) -> AdditiveSharingTensor:
        return self._each(lambda s: s.squeeze(*dim))

    def _public_share_of(self, value: torch.Tensor) -> AdditiveSharingTensor:
        """A public tensor as a sharing among these parties: party 0 holds it, the others 0."""
        zeros = torch.zeros_like(value)
        return self._same([send_value(value if i == 0 else zeros, w) for i, w in enumerate(self.workers)])

    def cat(self, other: AdditiveSharingTensor, dim: int = 0) -> AdditiveSharingTensor:
        """``torch.cat([self, other], dim)`` share by share."""
        return AdditiveSharingTensor(
            [torch.cat([a, b], dim) for a, b in self._aligned(other)], self._provider(other)
        )

    def __bool__(self) -> bool:
        raise SMPCError("the truth value of a shared value is secret; get() it first")


def _narrow(value: Any, dim: int, start: int, length: int) -> Any:
    return value.narrow(dim, start, length)


def _cat(a: Any, b: Any, dim: int) -> Any:
    """Concatenate a shared index with a public one (or two public ones)."""
    if isinstance(a, AdditiveSharingTensor):
        return a.cat(b if isinstance(b, AdditiveSharingTensor) else a._public_share_of(b), dim)
    return torch.cat([a, b], dim)


def _ring_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SMPCError(f"public operand {value!r} of a shared value must be an int (fix_precision() for floats)")
    return value


class PointerToShared:
    """What ``ptr.share(...)`` returns for a remote tensor: PySyft's pointer to the shared value.

    In PySyft 0.2 the worker holding the data built the AdditiveSharingTensor and the
    coordinator got a pointer to it, then ``.get()`` brought that (not the secret) back.
    In fedws the coordinator holds the share pointers from the start; ``get()`` hands
    them over, moving no data and revealing nothing.
    """

    def __init__(self, shared: Any, location: Worker) -> None:
        self._shared = shared
        self.location = location

    def get(self) -> Any:
        """The shared value (its shares stay where they are)."""
        return self._shared

    def __repr__(self) -> str:
        return f"[PointerToShared -> {self.location.id}: {self._shared!r}]"
