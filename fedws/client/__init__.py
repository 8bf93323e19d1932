"""The coordinator side: worker handles (Session + Link) and the federation they join."""

from .federation import Federation
from .session import Session
from .websocket_worker import WebsocketClientWorker
from .worker import Worker

__all__ = ["Federation", "Session", "WebsocketClientWorker", "Worker"]
