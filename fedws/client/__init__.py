"""The coordinator side: worker handles (Session + Link) and the federation they join.

Names are loaded on first use (PEP 562): :mod:`fedws.client.status` stays importable
without torch, for ``fedws status``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .federation import Federation
    from .session import Session
    from .websocket_worker import WebsocketClientWorker
    from .worker import Worker

__all__ = ["Federation", "Session", "WebsocketClientWorker", "Worker"]

_MODULES = {"Federation": "federation", "Session": "session", "WebsocketClientWorker": "websocket_worker",
            "Worker": "worker"}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'fedws.client' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
