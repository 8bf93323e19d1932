"""Moving frames: the WebSocket server for nodes and client for coordinators and peers.

The in-process transport is :class:`fedws.VirtualWorker` itself (it hands frames to a Node).
"""

from .client import WebsocketClientWorker, connect, connect_async
from .config import NodeConfig, load_config
from .server import NodeServer

__all__ = ["WebsocketClientWorker", "connect", "connect_async", "NodeServer", "NodeConfig", "load_config"]
