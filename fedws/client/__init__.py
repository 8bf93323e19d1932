"""The coordinator side: worker handles, the session bookkeeping and the IO thread."""

from .io_thread import IOThread
from .session import Session
from .worker import VirtualWorker, Worker

__all__ = ["IOThread", "Session", "VirtualWorker", "Worker"]
