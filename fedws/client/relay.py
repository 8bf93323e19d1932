"""A node's handle on a peer it reaches through the coordinator (both dial out).

The node process builds one per relayed ``ADD_PEER``; pointers to that peer then go over a
:class:`~fedws.transport.relay.RelayLink` on the node's own dial-out connection. Trust
model and bounds: :mod:`fedws.transport.relay`.
"""

from __future__ import annotations

from typing import Any

from ..transport.link import Endpoint
from ..transport.relay import RelayLink, RelayMux
from .worker import Worker

__all__ = ["RelayPeer"]


class RelayPeer(Worker):
    """A peer node reached through the coordinator's relay (``address``: ``dialout://ID``).

    Connects on construction (the handshake proves ``token`` without sending it).

    Raises:
        FedwsConnectionError: the coordinator could not reach the peer, or the peer refused.
        AuthenticationError: the peer could not prove it holds the link's token (or secret).
    """

    link: RelayLink

    def __init__(self, hook: Any, mux: RelayMux, me: str, peer_id: str, *, token: str,
                 secret: bytes | None = None, timeout: float | None = 30.0, max_frame_mb: float = 1024.0) -> None:
        def link(endpoint: Endpoint) -> RelayLink:
            return RelayLink(endpoint, mux, me, peer_id, token=token, secret=secret, max_frame_mb=max_frame_mb)

        super().__init__(hook, peer_id, link=link, timeout=timeout)
        self.link.connect(timeout)
