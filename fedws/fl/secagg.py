"""Secure aggregation, coordinator side: drive the rounds, learn only the sum.

The nodes mask their own updates (:mod:`fedws.node.secagg` has the protocol and the
fixed-point encoding); this module relays what they publish and unmasks the sum.
The coordinator holds no secret of any node: it sees public keys, AES-GCM ciphertexts
addressed to other nodes, masked vectors (uniform over Z/2^64 one by one) and, at the
end, the shares it needs to remove the masks of the sum — self-mask seeds of the nodes
whose vectors it has, mask keys of the nodes that dropped out — never both for one node.

Threat model: an honest-but-curious coordinator (it follows the protocol and tries to
learn more from what it sees) colluding with fewer than ``t`` nodes learns nothing about
an honest node's update beyond the sum. A coordinator plus ``t`` colluding nodes can
reconstruct any node's secrets; a coordinator that lies about which nodes take part
(impersonates peers, since keys are not signed) is outside this model.

SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020): with ``neighbours=k`` (:class:`SecAggConfig`) each node agrees
keys, shares secrets and masks only with its ``k`` neighbours on a random ring graph
derived from the round id (:func:`fedws.node.secagg.graph`), so a node's cost is O(k)
instead of O(n); the Shamir threshold ``t`` then counts within a node's closed
neighbourhood (``k + 1`` nodes). The same threat model holds per neighbourhood: fewer than
``t`` of a node's neighbours colluding with the coordinator learn nothing of it. With
``k`` of order ``log n`` this is the paper's setting; the graph here is a ring, which is
cheaper to check than a random ``k``-regular graph but makes neighbourhoods overlap.

Example:
    >>> total = secure_sum({alice: [ptr_a], bob: [ptr_b], carol: [ptr_c]}, threshold=2)
    >>> total.tensors[0]  # ptr_a + ptr_b + ptr_c, decoded from fixed point
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..client.worker import Worker
from ..exceptions import RoundFailedError
from ..node.secagg import (
    CIPHER_BYTES,
    KEY_BYTES,
    MAX_PARTICIPANTS,
    SHARE_BYTES,
    decode_fixed,
    graph,
    neighbourhood_size,
    pair_seed,
    prg,
    self_seed,
    shamir_combine,
)
from ..pointers import PointerTensor
from ..protocol.codec import ObjRef
from ..protocol.ids import new_id
from ..protocol.messages import Kind
from .remote import Deadline, wait_all

__all__ = ["SecAggConfig", "SecureAggregation", "SecureSum", "secure_sum", "default_threshold"]

log = logging.getLogger("fedws.fl")


def default_threshold(n: int) -> int:
    """A strict majority: the smallest ``t`` the nodes accept (``n/2 < t``)."""
    return n // 2 + 1


@dataclass(frozen=True)
class SecAggConfig:
    """How :class:`~fedws.fl.FedAvg` aggregates securely (``secure_aggregation=``).

    Attributes:
        neighbours: None: SecAgg, every node masks with every other (O(n) per node).
            ``k``: SecAgg+, each node masks with ``k`` neighbours only (rounded up to even;
            O(k) per node); ``k >= n - 1`` is SecAgg.
        threshold: ``t``, how many of the nodes sharing a node's secrets (all ``n``, or its
            ``k + 1``-node neighbourhood) must remain to unmask; a strict majority of them
            by default. None also defers to ``FedAvgConfig.secagg_threshold``.
    """

    neighbours: int | None = None
    threshold: int | None = None

    def __post_init__(self) -> None:
        if self.neighbours is not None and self.neighbours < 2:
            raise ValueError(f"SecAggConfig: neighbours must be None or >= 2, got {self.neighbours}")


@dataclass
class SecureSum:
    """What a secure sum reveals.

    Attributes:
        tensors: the weighted sum of each update entry (float64, the entries' shapes).
        total_weight: the sum of the surviving nodes' weights (their example counts).
        survivors: the nodes whose updates are in the sum.
        dropped: node id -> why it was left out.
    """

    tensors: list[torch.Tensor]
    total_weight: float
    survivors: list[str]
    dropped: dict[str, str] = field(default_factory=dict)


def _call(worker: Worker, op: str, args: list[Any]) -> Future[Any]:
    """Run the node command ``op`` and fetch (and free) its one result, without waiting."""
    rid = new_id()
    worker.submit(Kind.CMD, op, args, {}, [rid])
    _, fut = worker.submit(Kind.GET, rid, True, want_value=True)
    assert fut is not None
    return fut


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class SecureAggregation:
    """One secure sum over ``workers``, step by step (``secure_sum`` runs them all).

    A node whose command fails or misses the deadline of a step is dropped; the sum
    survives as long as ``threshold`` nodes remain. :meth:`drop` leaves a node out by
    hand (tests use it to play a node that vanished between two steps).

    Args:
        workers: the participants; their order gives their Shamir indices 1..n.
        threshold: ``t``, with ``m/2 < t <= m`` for the ``m`` nodes sharing one node's
            secrets (``n``, or ``k + 1`` with ``neighbours=k``); up to ``m - t`` of them may drop out.
        neighbours: ``k`` for SecAgg+ (each node's peers are its graph neighbours); None: SecAgg.
        timeout: seconds each step waits for the nodes.
        round_id: the round's name on the nodes (default: random).
    """

    def __init__(
        self,
        workers: Sequence[Worker],
        threshold: int | None = None,
        *,
        neighbours: int | None = None,
        timeout: float = 60.0,
        round_id: str | None = None,
        round_number: int = 0,
    ) -> None:
        n = len(workers)
        if not 2 <= n <= MAX_PARTICIPANTS:
            raise ValueError(f"secure aggregation needs 2..{MAX_PARTICIPANTS} nodes, got {n}")
        if len({w.id for w in workers}) != n:
            raise ValueError("secure aggregation: worker ids must be unique")
        k = neighbours if neighbours is not None and neighbours < n - 1 else None
        if neighbours is not None and neighbours < 2:
            raise ValueError(f"secure aggregation: neighbours must be >= 2, got {neighbours}")
        m = neighbourhood_size(n, k)
        t = default_threshold(m) if threshold is None else threshold
        if not m // 2 < t <= m:
            raise ValueError(f"secure aggregation: the threshold must satisfy m/2 < t <= m for the m={m} nodes "
                             f"sharing a node's secrets, got t={t} (n={n}, neighbours={neighbours})")
        self.workers = list(workers)
        self.n, self.t, self.k = n, t, k
        self.timeout = timeout
        self.round_id = round_id or secrets.token_hex(8)
        self.peers = graph(self.round_id, n, k)  # index -> closed neighbourhood
        self.round_number = round_number
        self.index = {w.id: i + 1 for i, w in enumerate(self.workers)}
        self.alive: dict[str, Worker] = {w.id: w for w in self.workers}
        self.dropped: dict[str, str] = {}
        self.public: dict[int, bytes] = {}  # U1
        self.ciphertexts: dict[int, torch.Tensor] = {}  # U2: sender -> rows for the indices in share_order[sender]
        self.share_order: dict[int, list[int]] = {}
        self.masked: dict[int, torch.Tensor] = {}  # U3: what the coordinator received from each node
        self.shapes: list[tuple[int, ...]] = []
        self.senders: dict[int, list[int]] = {}  # node -> the peers it was told masked with it

    # -- bookkeeping --------------------------------------------------------------------

    def drop(self, worker_id: str, reason: str) -> None:
        """Leave ``worker_id`` out from now on."""
        if self.alive.pop(worker_id, None) is not None:
            self.dropped[worker_id] = reason
            log.warning("secure aggregation %s: dropped node %r: %s", self.round_id, worker_id, reason)

    def _run(self, calls: Mapping[str, Future[Any]]) -> dict[str, Any]:
        results, failures = wait_all({k: [f] for k, f in calls.items()}, Deadline(self.timeout))
        for wid, exc in failures.items():
            self.drop(wid, _why(exc))
        return {k: v[0] for k, v in results.items()}

    def _enough(self, step: str) -> None:
        if len(self.alive) < self.t:
            self.forget()
            reasons = "; ".join(f"{k}: {v}" for k, v in self.dropped.items())
            raise RoundFailedError(
                f"secure aggregation failed at {step}: {len(self.alive)} of {self.n} nodes remain, "
                f"the threshold is {self.t}; the sum cannot be unmasked and nothing was revealed ({reasons})",
                round=self.round_number,
                answered=list(self.alive),
                min_nodes=self.t,
                dropped=self.dropped,
            )

    def forget(self) -> None:
        """Tell the remaining nodes to discard the round's keys (best effort)."""
        for w in self.alive.values():
            try:
                w.submit(Kind.CMD, "fedws.secagg.forget", [self.round_id], {}, [])
            except Exception:  # a link that is gone has nothing left to forget
                pass

    # -- the steps ----------------------------------------------------------------------

    def advertise_keys(self) -> None:
        """Step 0: every node makes its key pairs and publishes the public halves."""
        got = self._run({
            wid: _call(w, "fedws.secagg.keys", [self.round_id, self.index[wid], self.n, self.t]
                       + ([] if self.k is None else [self.k]))
            for wid, w in self.alive.items()
        })
        for wid, pub in got.items():
            if not (isinstance(pub, torch.Tensor) and pub.dtype == torch.uint8 and pub.numel() == KEY_BYTES):
                self.drop(wid, "sent a malformed public key")
            else:
                self.public[self.index[wid]] = bytes(pub.numpy().tobytes())
        self._enough("advertise_keys")

    def share_keys(self) -> None:
        """Step 1: relay each node its peers' public keys; it returns its encrypted shares for them."""
        alive = {self.index[wid] for wid in self.alive}
        calls = {}
        for wid, w in self.alive.items():
            me = self.index[wid]
            order = sorted(alive & self.peers[me])
            self.share_order[me] = order
            keys = torch.frombuffer(bytearray(b"".join(self.public[i] for i in order)), dtype=torch.uint8)
            calls[wid] = _call(w, "fedws.secagg.share", [self.round_id, order, keys.reshape(len(order), KEY_BYTES)])
        got = self._run(calls)
        for wid, rows in got.items():
            self.ciphertexts[self.index[wid]] = rows
        self._enough("share_keys")

    def collect_masked(
        self,
        updates_by_node: Mapping[str, Sequence[PointerTensor]],
        weights: Mapping[str, float] | None = None,
        dp: tuple[float, float, Sequence[torch.Tensor] | None] | None = None,
    ) -> None:
        """Step 2: hand each node the shares addressed to it; receive its masked update.

        ``dp = (clip, noise_multiplier, reference)``: each node clips its update minus
        ``reference`` and noises it before masking (:mod:`fedws.node.secagg`).
        """
        calls: dict[str, Future[Any]] = {}
        alive = {self.index[wid] for wid in self.alive if self.index[wid] in self.ciphertexts}
        dp_arg = None if dp is None else [dp[0], dp[1], None if dp[2] is None else list(dp[2])]
        for wid, w in list(self.alive.items()):
            ptrs = list(updates_by_node[wid])
            shapes = [self._shape(p, w) for p in ptrs]
            if not self.shapes:
                self.shapes = shapes
            elif shapes != self.shapes:
                raise ValueError(f"secure aggregation: node {wid!r}'s update has shapes {shapes}, expected {self.shapes}")
            me = self.index[wid]
            if me not in self.ciphertexts:
                continue
            others = sorted(v for v in alive & self.peers[me] if v != me and me in self.share_order[v])
            self.senders[me] = others
            rows = torch.stack([self.ciphertexts[v][self.share_order[v].index(me)] for v in others]) if others \
                else torch.zeros(0, CIPHER_BYTES, dtype=torch.uint8)
            weight = 1.0 if weights is None else float(weights[wid])
            refs = [ObjRef(p.id_at_location) for p in ptrs]
            args: list[Any] = [self.round_id, others, rows, refs, weight]
            calls[wid] = _call(w, "fedws.secagg.mask", args if dp_arg is None else [*args, dp_arg])
        length = sum(math.prod(shape) for shape in self.shapes) + 1
        for wid, y in self._run(calls).items():
            if isinstance(y, torch.Tensor) and y.dtype == torch.int64 and tuple(y.shape) == (length,):
                self.masked[self.index[wid]] = y
            else:
                self.drop(wid, "sent a malformed masked update")
        self._enough("collect_masked")

    @staticmethod
    def _shape(p: PointerTensor, w: Worker) -> tuple[int, ...]:
        if not isinstance(p, PointerTensor) or p.location is not w:
            raise ValueError(f"secure aggregation: the update of node {w.id!r} must be pointers to tensors on it")
        sig = p.signature
        if sig is None:
            raise ValueError("secure aggregation: an update pointer's shape is unknown")
        return tuple(sig.shape)

    def unmask(self) -> SecureSum:
        """Step 3: collect the shares that remove the masks of the sum, and decode it."""
        survivors = sorted(self.masked)
        gone = sorted({v for u in survivors for v in self.senders[u]} - set(survivors))
        by_index = {i: w for w, i in self.index.items()}
        answering = {by_index[i]: self.alive[by_index[i]] for i in survivors if by_index[i] in self.alive}
        if len(answering) < self.t:
            self._enough("unmask")
        split: dict[str, list[int]] = {}
        calls = {}
        for wid, w in answering.items():
            me = self.index[wid]
            mine = sorted([me, *self.senders[me]])
            split[wid] = [v for v in mine if v in self.masked] + [v for v in mine if v not in self.masked]
            calls[wid] = _call(w, "fedws.secagg.reveal", [self.round_id, [v for v in mine if v in self.masked],
                                                          [v for v in mine if v not in self.masked]])
        got = self._run(calls)
        if len(got) < self.t:
            self._enough("unmask")
            raise RoundFailedError(f"secure aggregation: only {len(got)} nodes revealed, the threshold is {self.t}",
                                   round=self.round_number)
        points: dict[int, list[tuple[int, int]]] = {v: [] for v in survivors + gone}
        for wid, rows in got.items():
            order = split[wid]
            if not (isinstance(rows, torch.Tensor) and rows.dtype == torch.uint8
                    and tuple(rows.shape) == (len(order), SHARE_BYTES)):
                continue  # a malformed answer is no answer
            x = self.index[wid]
            for k, v in enumerate(order):
                points[v].append((x, int.from_bytes(rows[k].numpy().tobytes(), "big")))
        short = [by_index[v] for v, pts in points.items() if len(pts) < self.t]
        if short:
            self.forget()
            raise RoundFailedError(
                f"secure aggregation: too few shares came back to unmask nodes {short} (the threshold is "
                f"{self.t}); nothing was revealed", round=self.round_number, dropped=dict(self.dropped))
        length = self.masked[survivors[0]].numel()
        total = torch.zeros(length, dtype=torch.int64)
        for u in survivors:
            total.add_(self.masked[u])
            b = shamir_combine(points[u], self.t)
            total.sub_(prg(self_seed(self.round_id, b), length))
        for v in gone:
            s_sk = shamir_combine(points[v], self.t)
            for u in survivors:
                if v not in self.senders[u]:
                    continue
                m = prg(pair_seed(self.round_id, s_sk, self.public[u][32:], u, v), length)
                if u < v:
                    total.sub_(m)
                else:
                    total.add_(m)
        values = decode_fixed(total)
        tensors, at = [], 0
        for shape in self.shapes:
            size = math.prod(shape)
            tensors.append(values[at:at + size].reshape(shape))
            at += size
        names = [by_index[u] for u in survivors]
        return SecureSum(tensors, float(values[-1]), names, dict(self.dropped))


def secure_sum(
    updates_by_node: Mapping[Worker, Sequence[PointerTensor]],
    threshold: int | None = None,
    *,
    weights: Mapping[Worker, float] | None = None,
    neighbours: int | None = None,
    dp: tuple[float, float, Sequence[torch.Tensor] | None] | None = None,
    timeout: float = 60.0,
    round_number: int = 0,
) -> SecureSum:
    """The sum over nodes of ``weight * update``, computed so the coordinator learns only it.

    Args:
        updates_by_node: each node's update: pointers to tensors on that node (same shapes
            on every node). They are masked where they are; only masked vectors travel.
        threshold: ``t`` (default: a strict majority); the sum survives ``n - t`` dropouts.
        weights: each node's weight (e.g. its example count; default 1). The sum of the
            survivors' weights comes back in :attr:`SecureSum.total_weight`.
        neighbours: ``k``: SecAgg+, each node masks with ``k`` graph neighbours only.
        dp: ``(clip, noise_multiplier, reference)``: each node clips ``update - reference``
            to ``clip`` and adds ``N(0, (noise_multiplier * clip)^2)`` before masking (then
            weights it); see :mod:`fedws.fl.dp` for how FedAvg sets the noise.
        timeout: seconds each of the four steps waits for the nodes.

    Raises:
        RoundFailedError: fewer than ``threshold`` nodes remained; nothing was revealed.
    """
    workers = list(updates_by_node)
    agg = SecureAggregation(workers, threshold, neighbours=neighbours, timeout=timeout, round_number=round_number)
    agg.advertise_keys()
    agg.share_keys()
    agg.collect_masked(
        {w.id: updates_by_node[w] for w in workers},
        None if weights is None else {w.id: float(weights[w]) for w in workers},
        dp,
    )
    return agg.unmask()
