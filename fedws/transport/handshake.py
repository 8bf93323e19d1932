"""The WebSocket handshake both sides agree on: who the node is, and the bearer token.

Client and server each import this module and not each other.
"""

from __future__ import annotations

import hmac

__all__ = ["NODE_ID_HEADER", "auth_headers", "token_matches"]

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
