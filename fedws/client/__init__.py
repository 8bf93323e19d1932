"""The coordinator side: worker handles (Session + Link), the federation and the IO thread."""

from .federation import Federation
from .io_thread import IOThread
from .session import Session
from .websocket_worker import WebsocketClientWorker
from .worker import Worker

__all__ = ["Federation", "IOThread", "Session", "WebsocketClientWorker", "Worker"]
