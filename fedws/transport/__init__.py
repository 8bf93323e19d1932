"""Moving frames, and nothing else: the Link interface and its in-process and WebSocket
implementations, the socket server and the handshake. Imports only ``fedws.protocol``.

The mock link for tests of the layers above is :class:`fedws.testing.MockLink`.
"""

from .inproc import InprocLink, lookup_node, register_node
from .link import Endpoint, FrameHandler, Link
from .server import FrameServer
from .websocket import WebsocketLink

__all__ = [
    "Link",
    "Endpoint",
    "FrameHandler",
    "InprocLink",
    "WebsocketLink",
    "FrameServer",
    "register_node",
    "lookup_node",
]
