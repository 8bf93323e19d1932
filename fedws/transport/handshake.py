"""The WebSocket handshake both sides agree on: who the node is, and the bearer token.

Client and server each import this module and not each other.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = [
    "NODE_ID_HEADER",
    "auth_headers",
    "token_matches",
    "PEER_HEADER",
    "CHALLENGE_HEADER",
    "PROOF_HEADER",
    "new_challenge",
    "peer_proof",
    "proof_matches",
]

NODE_ID_HEADER = "X-Fedws-Node"
"""Response header in which a node names itself; a server without it is not a fedws node."""


def auth_headers(token: str | None) -> dict[str, str] | None:
    """The request headers that present ``token`` (None: no token, no header)."""
    return {"Authorization": f"Bearer {token}"} if token else None


def token_matches(authorization: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header value presents ``token`` (constant time).

    A node without a token accepts every connection.
    """
    if token is None:
        return True
    return hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode())


# -- node-to-node: the node answering proves it is the peer the caller listed ------------
#
# A node linking to a listed peer sends its own id (``X-Fedws-Peer``) and a fresh random
# challenge; a peer that shares a secret with it for that link answers with
# HMAC-SHA256(secret, "fedws-peer-proof|<its id>|<caller id>|<challenge>") in
# ``X-Fedws-Proof``. Whoever else sits at the address cannot answer, so the caller never
# sends it commands or takes its replies. (The bearer credential goes out with the request,
# before the proof comes back: over ``ws://`` an impostor can still read it, which is why
# peers across machines use ``wss://`` with the peer's certificate pinned.)

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
