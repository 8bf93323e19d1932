"""Node side of secure aggregation: pairwise masks, self-masks and Shamir-shared keys.

The protocol of Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning" (CCS 2017), for an honest-but-curious coordinator. Every secret is made
and kept here, on the node; the coordinator only relays public keys and ciphertexts and
receives masked vectors, which are uniform over the ring until they are summed.

The node commands, in protocol order (``rid`` is the coordinator's name for the round;
state is kept per caller session and round, never in the object store, so no ``get`` can
reach it):

1. ``fedws.secagg.keys(rid, index, n, t, k=None)``: two fresh X25519 key pairs — ``c`` to
   encrypt shares for peers, ``s`` to agree pairwise mask seeds. Returns the two public keys
   (a 64-byte uint8 tensor). ``index`` (1..n) is this node's Shamir x-coordinate. With
   ``k`` (SecAgg+, Bell et al. CCS 2020) the node's peers are only its neighbours on the
   round's graph (:func:`neighbourhood`, which the node computes itself from ``rid``, so
   the coordinator cannot hand it a neighbourhood of its choosing), and ``t`` is the
   threshold within its closed neighbourhood; without ``k`` every node is a peer.
2. ``fedws.secagg.share(rid, indices, public_keys)``: the peers that advertised keys (at
   least ``t``). Draws the self-mask seed ``b``, Shamir-shares ``b`` and the ``s`` private
   key over GF(2^521 - 1) with threshold ``t``, and encrypts each peer's pair of shares to
   it (AES-GCM under a key agreed with the peer's ``c`` key). Returns one ciphertext row
   per entry of ``indices`` (its own row zero).
3. ``fedws.secagg.mask(rid, senders, ciphertexts, update, weight, dp=None)``: decrypts the shares
   the peers in ``senders`` made for it (at least ``t - 1`` peers), encodes
   ``weight * update`` (the stored tensors, by reference, then ``weight`` itself) in fixed
   point into Z/2^64 and adds the self-mask ``PRG(b)`` and ``±PRG(s_uv)`` for every
   sender ``v`` (``+`` when this node's index is smaller). Once per round: a second masked
   vector with the same masks would give away the difference of the two inputs.
   ``dp = [clip, noise_multiplier, reference]``: before encoding, the update minus
   ``reference`` (inline tensors: the model the node was sent) is clipped to L2 norm
   ``clip`` and gets Gaussian noise of std ``noise_multiplier * clip`` from the node's
   generator (:func:`fedws.node.policy.clip_and_noise`); the noised update is never stored,
   only its masked encoding leaves. See "Differential privacy" below.
4. ``fedws.secagg.reveal(rid, survivors, dropped)``: the shares the coordinator needs to
   unmask the sum: of ``b`` for each survivor, of the ``s`` key for each dropout. Once per
   round, only for a partition of the senders with at least ``t`` survivors, and never
   both shares of one node: with both, the coordinator could unmask that node alone.

Masks are ChaCha20 keystreams keyed by HKDF-SHA256 outputs (seeds bound to the round
id), never torch's generator; keys come from :mod:`secrets` via ``cryptography``. Every
size is checked before anything is allocated, and on a private node the caller's
principal needs the ``secagg`` permission.

Differential privacy: secure aggregation does not widen what may leave a node, it hides
which node sent what. On a private node, masking an update derived from private data is
refused unless it is noised (``dp=``) under the node's DP release rule: the caller's
principal needs ``dp``, the noise multiplier is at least the rule's (the node trusts
neither the coordinator nor the other nodes to add the rest of the noise the sum carries),
and the masked vector is one release charged to the principal's budget. An update of
non-private values is noised as asked and charged nothing.

Fixed point: a value ``x`` (after weighting) is clipped to ``[-CLIP, CLIP]`` and encoded
as ``round(x * 2**FRAC_BITS)`` in int64 (two's complement, arithmetic wraps mod 2^64).
With ``CLIP = 2**31`` and at most :data:`MAX_PARTICIPANTS` = 2^10 nodes the true sum stays
below 2^57, so it decodes without wrapping; the precision is ``2**-16`` per value.
"""

from __future__ import annotations

import functools
import hashlib
import math
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .policy import clip_and_noise

__all__ = [
    "MAX_PARTICIPANTS", "MAX_ELEMENTS", "MAX_ROUNDS", "FRAC_BITS", "CLIP", "PRIME", "SHARE_BYTES",
    "KEY_BYTES", "CIPHER_BYTES", "encode_fixed", "decode_fixed", "prg", "pair_seed", "shamir_split",
    "shamir_combine", "graph", "ring_order", "neighbourhood", "neighbourhood_size", "node_ops",
]

MAX_PARTICIPANTS = 1024
"""Most nodes in one secure sum (2^10: keeps the fixed-point sum from wrapping)."""
MAX_ELEMENTS = 1 << 24
"""Most elements of one masked vector (128 MiB of int64)."""
MAX_ROUNDS = 8
"""Most unfinished rounds one caller session may hold on a node (each holds keys)."""
FRAC_BITS = 16
"""Fractional bits of the fixed-point encoding (precision 2^-16)."""
CLIP = float(2**31)
"""Largest magnitude a (weighted) value may have; larger ones are clipped."""
PRIME = 2**521 - 1
"""The Shamir field: a Mersenne prime above every 32-byte secret."""
SHARE_BYTES = 66
KEY_BYTES = 64
"""Two raw X25519 public keys: ``c`` then ``s``."""
_PLAIN_BYTES = 4 + 2 * SHARE_BYTES
CIPHER_BYTES = 12 + _PLAIN_BYTES + 16
"""A nonce, the sender and recipient index, two shares, the GCM tag."""
_MAX_RID = 64


def neighbourhood_size(n: int, k: int | None) -> int:
    """How many nodes (itself included) share a node's secrets: ``n`` for SecAgg, else
    ``k`` rounded up to even, plus one, at most ``n`` (the graph is a ring of ``k/2`` each side)."""
    if k is None:
        return n
    return min(n, 2 * ((k + 1) // 2) + 1)


def graph(rid: str, n: int, k: int | None) -> dict[int, frozenset[int]]:
    """Every node's closed neighbourhood (itself included) on round ``rid``'s graph.

    SecAgg+'s graph: the nodes 1..n in a random order on a ring (ordered by SHA-256 of the
    round id and the index, so every node derives the same graph and the coordinator only
    picks the round id), each joined to the ``ceil(k/2)`` nearest on either side: a
    ``2 * ceil(k/2)``-regular graph. ``k=None`` or ``k >= n - 1``: everyone (SecAgg).
    """
    size = neighbourhood_size(n, k)
    if size >= n:
        everyone = frozenset(range(1, n + 1))
        return {i: everyone for i in everyone}
    ring = ring_order(rid, n)
    half = (size - 1) // 2
    return {ring[at]: frozenset(ring[(at + d) % n] for d in range(-half, half + 1)) for at in range(n)}


def ring_order(rid: str, n: int) -> list[int]:
    """The indices 1..n in round ``rid``'s ring order (SecAgg+'s graph)."""
    return sorted(range(1, n + 1), key=lambda i: hashlib.sha256(f"fedws secagg graph|{rid}|{i}".encode()).digest())


def neighbourhood(rid: str, n: int, k: int | None, index: int) -> frozenset[int]:
    """The closed neighbourhood of ``index`` on round ``rid``'s graph (:func:`graph`)."""
    return graph(rid, n, k)[index]


@functools.cache
def _crypto() -> Any:
    """The ``cryptography`` primitives, imported on first use (extra ``secagg``)."""
    try:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import x25519
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    except ImportError:  # pragma: no cover - the extra is missing
        raise ImportError("secure aggregation needs the 'cryptography' package: pip install 'fedws[secagg]'") from None
    return hashes, x25519, Cipher, algorithms, AESGCM, HKDF


# -- primitives (shared with the coordinator's unmasking, fedws.fl.secagg) ------------------


def encode_fixed(x: torch.Tensor) -> torch.Tensor:
    """Float values to the ring: clip to ``[-CLIP, CLIP]``, scale by ``2**FRAC_BITS``, round."""
    x = x.detach().to(torch.float64).clamp(-CLIP, CLIP)
    return torch.round(x * (1 << FRAC_BITS)).to(torch.int64)


def decode_fixed(v: torch.Tensor) -> torch.Tensor:
    """Ring elements (a sum that did not wrap) back to float64."""
    return v.to(torch.float64) / (1 << FRAC_BITS)


def prg(seed: bytes, n: int) -> torch.Tensor:
    """``n`` int64 values uniform over Z/2^64: the ChaCha20 keystream of ``seed`` (32 bytes)."""
    _, _, Cipher, algorithms, _, _ = _crypto()
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    enc = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    stream = enc.update(bytes(8 * n))
    return torch.frombuffer(bytearray(stream), dtype=torch.int64)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    hashes, _, _, _, _, HKDF = _crypto()
    return bytes(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret))


def pair_seed(rid: str, private: Any, public_raw: bytes, u: int, v: int) -> bytes:
    """The mask seed of the pair ``{u, v}``: HKDF of their X25519 agreement, bound to the round.

    ``private``: an ``X25519PrivateKey`` or its 32 raw bytes (a key rebuilt from shares).
    """
    _, x25519, _, _, _, _ = _crypto()
    if isinstance(private, bytes):
        private = x25519.X25519PrivateKey.from_private_bytes(private)
    shared = private.exchange(
        x25519.X25519PublicKey.from_public_bytes(public_raw)
    )
    lo, hi = min(u, v), max(u, v)
    return _hkdf(shared, f"fedws secagg mask|{rid}|{lo}|{hi}".encode())


def self_seed(rid: str, b: bytes) -> bytes:
    return _hkdf(b, f"fedws secagg self|{rid}".encode())


def shamir_split(secret: bytes, xs: Sequence[int], t: int) -> list[int]:
    """Shares ``f(x)`` of a random degree ``t - 1`` polynomial with ``f(0) = secret``."""
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    out = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        out.append(y)
    return out


def shamir_combine(points: Sequence[tuple[int, int]], t: int) -> bytes:
    """The secret (32 bytes) from at least ``t`` shares ``(x, y)`` (Lagrange at 0)."""
    if len(points) < t:
        raise ValueError(f"secagg: {len(points)} shares, the threshold is {t}")
    pts = list(points)[:t]
    secret = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << 256:
        raise ValueError("secagg: the shares do not reconstruct a 32-byte secret")
    return secret.to_bytes(32, "big")


def _to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def _from_bytes(b: bytes) -> int:
    y = int.from_bytes(b, "big")
    if y >= PRIME:
        raise ValueError("secagg: a share is not a field element")
    return y


# -- the node's state for one round ---------------------------------------------------


@dataclass
class _Round:
    index: int
    n: int
    t: int
    peers: frozenset[int]  # the closed neighbourhood: who shares with and masks against this node
    c_key: Any  # X25519PrivateKey objects: parsing raw bytes again costs more than agreeing
    s_key: Any
    s_sk: bytes  # the raw mask key, to share
    enc_keys: dict[int, bytes] = field(default_factory=dict)  # peer -> AES-GCM key
    public: dict[int, bytes] = field(default_factory=dict)  # U1: index -> c_pk || s_pk
    own_shares: tuple[int, int] | None = None  # this node's shares of its own s_sk and b
    b: bytes | None = None
    received: dict[int, tuple[int, int]] = field(default_factory=dict)  # U2: index -> (s share, b share)
    step: str = "keys"


def _rid(rid: Any) -> str:
    if type(rid) is not str or not 1 <= len(rid) <= _MAX_RID or not rid.isprintable():
        raise ValueError(f"secagg: the round id must be a printable str of 1..{_MAX_RID} characters")
    return rid


def _index(i: Any, n: int, what: str) -> int:
    if type(i) is not int or not 1 <= i <= n:
        raise ValueError(f"secagg: {what} must be an int in [1, {n}], got {i!r}")
    return i


def _indices(value: Any, n: int, what: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or len(value) > n:
        raise ValueError(f"secagg: {what} must be a list of at most {n} indices")
    out = [_index(i, n, what) for i in value]
    if len(set(out)) != len(out):
        raise ValueError(f"secagg: {what} repeats an index")
    return out


def _rows(value: Any, k: int, width: int, what: str) -> torch.Tensor:
    if (type(value) is not torch.Tensor or value.dtype != torch.uint8 or value.device.type != "cpu"
            or tuple(value.shape) != (k, width)):
        raise ValueError(f"secagg: {what} must be a [{k}, {width}] uint8 tensor")
    return value.contiguous()


def _dp_args(dp: Any, update: list[torch.Tensor]) -> tuple[float, float, list[torch.Tensor] | None] | None:
    """``dp = [clip, noise_multiplier, reference]`` checked: numbers finite, the reference
    (or None) one floating-point tensor of each update entry's shape."""
    if dp is None:
        return None
    if not isinstance(dp, (list, tuple)) or len(dp) != 3:
        raise ValueError("secagg: dp must be [clip, noise_multiplier, reference]")
    clip, z, ref = dp
    if type(clip) not in (int, float) or not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"secagg: the dp clip must be a finite number > 0, got {clip!r}")
    if type(z) not in (int, float) or not (math.isfinite(z) and z >= 0):
        raise ValueError(f"secagg: the dp noise multiplier must be a finite number >= 0, got {z!r}")
    if ref is not None and (
        not isinstance(ref, (list, tuple)) or len(ref) != len(update)
        or not all(type(r) is torch.Tensor and r.dtype.is_floating_point and r.device.type == "cpu"
                   and r.shape == u.shape for r, u in zip(ref, update))
    ):
        raise ValueError("secagg: the dp reference must hold one floating-point tensor of the same shape per update entry")
    if not all(u.dtype.is_floating_point for u in update):
        raise ValueError("secagg: a noised update must be floating-point tensors")
    return float(clip), float(z), None if ref is None else list(ref)


def node_ops(node: Any) -> dict[str, Callable[..., Any]]:
    """The ``fedws.secagg.*`` commands of ``node`` (a :class:`~fedws.node.Node`, untyped so
    this module does not import it back), with their state and permission check."""
    rounds: dict[tuple[str, str, str], _Round] = {}
    lock = threading.Lock()

    def caller_key(rid: Any) -> tuple[str, str, str]:
        caller = node._frame.caller
        if node.enforce:
            node._require(caller, "secagg")
        return caller.principal, caller.session, _rid(rid)

    def get(rid: Any, step: str) -> tuple[tuple[str, str, str], _Round]:
        key = caller_key(rid)
        with lock:
            st = rounds.get(key)
        if st is None:
            raise ValueError(f"secagg: no round {key[2]!r} on this node for this session (call keys first)")
        if st.step != step:
            raise ValueError(f"secagg: round {key[2]!r} is at step {st.step!r}, not {step!r}: each step runs once")
        return key, st

    def keys(rid: Any, index: Any, n: Any, t: Any, k: Any = None) -> torch.Tensor:
        key = caller_key(rid)
        if type(n) is not int or not 2 <= n <= MAX_PARTICIPANTS:
            raise ValueError(f"secagg: n must be an int in [2, {MAX_PARTICIPANTS}], got {n!r}")
        if k is not None and (type(k) is not int or not 2 <= k < n):
            raise ValueError(f"secagg: k (neighbours) must be None or an int in [2, n), got {k!r}")
        size = neighbourhood_size(n, k)
        if type(t) is not int or not size // 2 < t <= size:
            raise ValueError(f"secagg: the threshold must be an int with m/2 < t <= m for the m={size} nodes "
                             f"sharing a node's secrets, got {t!r} (n={n}, k={k})")
        index = _index(index, n, "index")
        _, x25519, _, _, _, _ = _crypto()
        from cryptography.hazmat.primitives import serialization as ser

        raw = (ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
        c, s = x25519.X25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
        with lock:
            mine = [k for k in rounds if k[:2] == key[:2]]
            if key in rounds:
                raise ValueError(f"secagg: round {key[2]!r} already exists on this node")
            if len(mine) >= MAX_ROUNDS:
                raise ValueError(f"secagg: this session already has {MAX_ROUNDS} unfinished rounds (forget one)")
            rounds[key] = st = _Round(index, n, t, neighbourhood(key[2], n, k, index), c, s, s.private_bytes(*raw))
        pub = c.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw) + s.public_key().public_bytes(
            ser.Encoding.Raw, ser.PublicFormat.Raw
        )
        st.public[index] = pub
        return torch.frombuffer(bytearray(pub), dtype=torch.uint8)

    def share(rid: Any, indices: Any, public_keys: Any) -> torch.Tensor:
        key, st = get(rid, "keys")
        idx = _indices(indices, st.n, "indices")
        if st.index not in idx or len(idx) < st.t or not set(idx) <= st.peers:
            raise ValueError(f"secagg: need at least t={st.t} advertised keys of this node's neighbourhood, "
                             "including its own")
        rows = _rows(public_keys, len(idx), KEY_BYTES, "public_keys")
        pubs = {i: bytes(rows[k].numpy().tobytes()) for k, i in enumerate(idx)}
        if pubs[st.index] != st.public[st.index]:
            raise ValueError("secagg: the relayed key of this node is not its own")
        if len(set(pubs.values())) != len(pubs):
            raise ValueError("secagg: two nodes advertised the same key")
        _, _, _, _, AESGCM, _ = _crypto()
        b = secrets.token_bytes(32)
        s_shares = shamir_split(st.s_sk, idx, st.t)
        b_shares = shamir_split(b, idx, st.t)
        out = torch.zeros(len(idx), CIPHER_BYTES, dtype=torch.uint8)
        for k, v in enumerate(idx):
            if v == st.index:
                continue
            ek = st.enc_keys[v] = pair_key(rid, st.c_key, pubs[v][:32], st.index, v)
            nonce = secrets.token_bytes(12)
            plain = st.index.to_bytes(2, "big") + v.to_bytes(2, "big") + _to_bytes(s_shares[k]) + _to_bytes(b_shares[k])
            ct = nonce + AESGCM(ek).encrypt(nonce, plain, rid.encode())
            out[k] = torch.frombuffer(bytearray(ct), dtype=torch.uint8)
        me = idx.index(st.index)
        st.public, st.b, st.own_shares, st.step = pubs, b, (s_shares[me], b_shares[me]), "share"
        st.s_sk = b""  # shared now; the key object masks
        return out

    def pair_key(rid: str, c_key: Any, c_pk: bytes, u: int, v: int) -> bytes:
        _, x25519, _, _, _, _ = _crypto()
        shared = c_key.exchange(x25519.X25519PublicKey.from_public_bytes(c_pk))
        return _hkdf(shared, f"fedws secagg enc|{rid}|{min(u, v)}|{max(u, v)}".encode())

    def mask(rid: Any, senders: Any, ciphertexts: Any, update: Any, weight: Any, dp: Any = None) -> torch.Tensor:
        key, st = get(rid, "share")
        idx = _indices(senders, st.n, "senders")
        if st.index in idx or any(v not in st.public for v in idx) or len(idx) + 1 < st.t:
            raise ValueError(f"secagg: senders must be at least t-1={st.t - 1} other nodes that advertised keys")
        rows = _rows(ciphertexts, len(idx), CIPHER_BYTES, "ciphertexts")
        if not isinstance(update, (list, tuple)) or not 1 <= len(update) <= 4096 or not all(
            type(x) is torch.Tensor and not x.is_complex() and x.dtype != torch.bool and x.device.type == "cpu"
            for x in update
        ):
            raise ValueError("secagg: the update must be a list of 1..4096 real CPU tensors (stored objects)")
        if type(weight) not in (int, float) or not 0 <= weight <= CLIP:
            raise ValueError("secagg: the weight must be a number in [0, 2**31]")
        length = sum(x.numel() for x in update) + 1
        if length > MAX_ELEMENTS:
            raise ValueError(f"secagg: at most {MAX_ELEMENTS} elements, got {length}")
        noise = _dp_args(dp, list(update))
        node.budget.check(8 * length * 4, node.store.nbytes, "fedws.secagg.mask", op="fedws.secagg.mask")
        release = release_rule(noise)
        _, _, _, _, AESGCM, _ = _crypto()
        received: dict[int, tuple[int, int]] = {}
        for k, v in enumerate(idx):
            ct = rows[k].numpy().tobytes()
            ek = st.enc_keys[v]
            try:
                plain = AESGCM(ek).decrypt(ct[:12], ct[12:], key[2].encode())
            except Exception:
                raise ValueError(f"secagg: the shares from node {v} do not decrypt (tampered or misrouted)") from None
            if plain[:4] != v.to_bytes(2, "big") + st.index.to_bytes(2, "big"):
                raise ValueError(f"secagg: the shares from node {v} name the wrong pair")
            received[v] = (_from_bytes(plain[4:4 + SHARE_BYTES]), _from_bytes(plain[4 + SHARE_BYTES:]))
        assert st.b is not None and st.own_shares is not None
        if release is not None:
            release = charge(release)  # before the step moves: a refused charge leaves nothing masked
        st.step = "masked"  # from here on, never mask again (even if what follows fails)
        st.received = {**received, st.index: st.own_shares}
        values = list(update)
        if noise is not None:
            z = noise[1] if release is None else release["noise_multiplier"]
            values = clip_and_noise([t.detach().to(torch.float64) for t in update], noise[0], z, noise[2])
        x = torch.cat([t.detach().reshape(-1).to(torch.float64) * float(weight) for t in values]
                      + [torch.tensor([float(weight)], dtype=torch.float64)])
        y = encode_fixed(x)
        y.add_(prg(self_seed(key[2], st.b), length))
        for v in idx:
            m = prg(pair_seed(key[2], st.s_key, st.public[v][32:], st.index, v), length)
            if st.index < v:
                y.add_(m)
            else:
                y.sub_(m)
        if release is not None:
            node._frame.dp_released = True  # the masked vector is the release: stored as not private
            if node.audit.enabled:
                node.audit.released(node._frame.caller, -1, 8 * length, "dp-secagg", **release)
        return y

    def release_rule(noise: tuple[float, float, list[torch.Tensor] | None] | None) -> dict[str, Any] | None:
        """What a private update's masked release needs (checked before any work): a DP
        rule, the ``dp`` permission, and noise; None for non-private values."""
        state = node._frame
        if not (node.enforce and state.tainted):
            return None
        rule = node.policy.dp
        if rule is None:
            raise node._deny(f"worker {node.id!r} has no differentially private release rule: its private "
                             "values cannot leave through secure aggregation", op="fedws.secagg.mask")
        if noise is None:
            raise node._deny(f"worker {node.id!r} refuses an unnoised masked release of private values: "
                             "secure aggregation hides who sent what, not the sum; pass dp=[clip, "
                             "noise_multiplier, reference] (FedAvg(dp=...))", op="fedws.secagg.mask")
        node._require(state.caller, "dp")
        return {"noise_multiplier": max(noise[1], rule.noise_multiplier), "delta": rule.delta}

    def charge(release: dict[str, Any]) -> dict[str, Any]:
        eps = node.accountant.charge(node._frame.caller.principal, worker=node.id)
        return {**release, "epsilon": round(eps, 6)}

    def reveal(rid: Any, survivors: Any, dropped: Any) -> torch.Tensor:
        key, st = get(rid, "masked")
        alive = _indices(survivors, st.n, "survivors")
        gone = _indices(dropped, st.n, "dropped")
        if set(alive) & set(gone):
            raise ValueError("secagg: refused: a node cannot be both a survivor and a dropout "
                             "(its self-mask and its mask key together would unmask it alone)")
        if st.index not in alive:
            raise ValueError("secagg: refused: this node is answering, so it is not a dropout")
        if set(alive) | set(gone) != set(st.received):
            raise ValueError("secagg: refused: survivors and dropouts must be exactly the nodes that sent shares")
        if len(alive) < st.t:
            raise ValueError(f"secagg: refused: {len(alive)} survivors, fewer than the threshold t={st.t}")
        out = torch.zeros(len(alive) + len(gone), SHARE_BYTES, dtype=torch.uint8)
        for k, v in enumerate(alive + gone):
            y = st.received[v][1] if v in alive else st.received[v][0]
            out[k] = torch.frombuffer(bytearray(_to_bytes(y)), dtype=torch.uint8)
        with lock:
            rounds.pop(key, None)  # answered once; the keys and shares are gone
        return out

    def forget(rid: Any) -> None:
        key = caller_key(rid)
        with lock:
            rounds.pop(key, None)

    return {
        "fedws.secagg.keys": keys,
        "fedws.secagg.share": share,
        "fedws.secagg.mask": mask,
        "fedws.secagg.reveal": reveal,
        "fedws.secagg.forget": forget,
    }
