"""The WebSocket handshake both sides agree on: who the node is, who the caller is.

Client and server each import this module and not each other. A client presents a bearer
token (``Authorization``) and a session key (``X-Fedws-Session``: random, kept across the
reconnects of one handle, so the node gives it back its objects). A node maps the token to
the principal it names (:class:`Credentials`, hashed at rest, compared in constant time).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable

__all__ = [
    "NODE_ID_HEADER",
    "SESSION_HEADER",
    "DEFAULT_PRINCIPAL",
    "auth_headers",
    "token_matches",
    "token_digest",
    "new_session_key",
    "session_key",
    "Credentials",
    "PEER_HEADER",
    "MAX_FRAME_HEADER",
    "COMPRESS_HEADER",
    "CHALLENGE_HEADER",
    "PROOF_HEADER",
    "new_challenge",
    "peer_proof",
    "proof_matches",
]

NODE_ID_HEADER = "X-Fedws-Node"
"""Response header in which a node names itself; a server without it is not a fedws node."""

SESSION_HEADER = "X-Fedws-Session"
"""Request header carrying the client's session key (32 hex digits)."""

DEFAULT_PRINCIPAL = "default"
"""The principal of the single ``--token`` / ``FEDWS_TOKEN`` (and of a node without tokens)."""

_SESSION_KEY = re.compile(r"[0-9a-f]{32}")


def auth_headers(token: str | None, session: str | None = None) -> dict[str, str] | None:
    """The request headers that present ``token`` and ``session`` (None: neither)."""
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if session:
        headers[SESSION_HEADER] = session
    return headers or None


def token_matches(authorization: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header value presents ``token`` (constant time).

    A node without a token accepts every connection.
    """
    if token is None:
        return True
    return hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode())


def token_digest(token: str) -> str:
    """The hex sha256 of a token: what a node config keeps instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_session_key() -> str:
    """A fresh random session key (128 bits)."""
    return secrets.token_hex(16)


def session_key(header: str | None) -> str | None:
    """The session key a client presented, if well formed."""
    if header is not None and _SESSION_KEY.fullmatch(header):
        return header
    return None


class Credentials:
    """The tokens a node accepts, each naming a principal; kept as sha256 digests.

    ``principal_for`` hashes the presented token once and compares it with every digest
    in constant time (all of them, whatever matched), so neither the token nor which
    principal it belongs to shows in the timing.

    Args:
        digests: ``(principal, hex sha256 of the token)`` pairs.
        open: accept a connection without a token, as principal ``"default"`` (a node
            with no token configured).
    """

    def __init__(self, digests: Iterable[tuple[str, str]] = (), *, open: bool = False) -> None:
        self._digests = [(p, bytes.fromhex(d)) for p, d in digests]
        for p, d in self._digests:
            if len(d) != 32:
                raise ValueError(f"token of principal {p!r}: sha256 must be 64 hex digits")
        self.open = open and not self._digests

    @classmethod
    def single(cls, token: str | None) -> Credentials:
        """One token (principal ``"default"``); None: no token, every client accepted."""
        if token is None:
            return cls(open=True)
        return cls([(DEFAULT_PRINCIPAL, token_digest(token))])

    def __len__(self) -> int:
        return len(self._digests)

    def principals(self) -> list[str]:
        return sorted({p for p, _ in self._digests})

    def principal_for(self, authorization: str | None) -> str | None:
        """The principal whose token ``authorization`` (``Bearer <token>``) presents, or None."""
        if self.open:
            return DEFAULT_PRINCIPAL
        text = authorization or ""
        token = text[7:] if text.startswith("Bearer ") else ""
        presented = hashlib.sha256(token.encode()).digest()
        found: str | None = None
        for principal, digest in self._digests:
            if hmac.compare_digest(presented, digest) and token and found is None:
                found = principal
        return found


# -- node-to-node: the node answering proves it is the peer the caller listed ------------
#
# A node linking to a listed peer sends its own id (``X-Fedws-Peer``) and a fresh random
# challenge; a peer that shares a secret with it for that link answers with
# HMAC-SHA256(secret, "fedws-peer-proof|<its id>|<caller id>|<challenge>") in
# ``X-Fedws-Proof``. Whoever else sits at the address cannot answer, so the caller never
# sends it commands or takes its replies. (The bearer credential goes out with the request,
# before the proof comes back: over ``ws://`` an impostor can still read it, which is why
# peers across machines use ``wss://`` with the peer's certificate pinned.)

COMPRESS_HEADER = "X-Fedws-Compress"
"""Request: the compression the coordinator offers (``zstd``); response: the one agreed."""
MAX_FRAME_HEADER = "X-Fedws-Max-Frame"
"""Response header: the largest frame (bytes) the node reads; larger tensors go in chunks."""
PEER_HEADER = "X-Fedws-Peer"
"""Request header: the id of the node that opens a node-to-node link."""
CHALLENGE_HEADER = "X-Fedws-Challenge"
"""Request header: a random challenge the peer answers in ``PROOF_HEADER``."""
PROOF_HEADER = "X-Fedws-Proof"
"""Response header: the peer's answer to the challenge."""


def new_challenge() -> str:
    """A fresh random challenge (128 bits, hex)."""
    return secrets.token_hex(16)


def peer_proof(secret: bytes, node_id: str, caller_id: str, challenge: str) -> str:
    """What node ``node_id`` answers ``caller_id``'s challenge with, given their shared secret."""
    message = f"fedws-peer-proof|{node_id}|{caller_id}|{challenge}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def proof_matches(proof: str | None, secret: bytes, node_id: str, caller_id: str, challenge: str) -> bool:
    """Whether ``proof`` answers the challenge for ``node_id`` (constant time)."""
    expected = peer_proof(secret, node_id, caller_id, challenge)
    return hmac.compare_digest((proof or "").encode(), expected.encode())
