"""fedws: remote tensors, pointers and plans for federated learning, over WebSockets.

Example:
    >>> import torch, fedws as sy
    >>> hook = sy.TorchHook(torch)
    >>> bob = sy.VirtualWorker(hook, id="bob")
    >>> x = torch.tensor([1, 2, 3]).send(bob)
    >>> (x + x).get()
    tensor([2, 4, 6])
"""

from __future__ import annotations

from typing import Any

from . import optim as optim
from .client.federation import Federation
from .client.websocket_worker import WebsocketClientWorker
from .client.worker import Worker
from .connecting import connect, connect_async
from .exceptions import (
    AuthenticationError,
    ConnectionLostError,
    DecodeError,
    DependencyError,
    EncodeError,
    FedwsConnectionError,
    FedwsError,
    FedwsTimeoutError,
    LimitExceededError,
    LocationError,
    MemoryBudgetError,
    ObjectNotFoundError,
    OpNotAllowedError,
    PermissionDeniedError,
    PlanError,
    PointerError,
    PrivacyBudgetExceededError,
    ProtocolError,
    RemoteError,
    RoundFailedError,
    StoreFullError,
    WrongThreadError,
)
from .hook import TorchHook
from .plans import MultiPointerPlan, Plan, PointerPlan, State, func2plan
from .pointers import MultiPointerTensor, PointerParameter, PointerTensor
from .version import __version__ as __version__
from .virtual import VirtualWorker

__all__ = [
    "TorchHook",
    "Federation",
    "VirtualWorker",
    "Worker",
    "WebsocketClientWorker",
    "connect",
    "connect_async",
    "PointerTensor",
    "PointerParameter",
    "MultiPointerTensor",
    "func2plan",
    "Plan",
    "PointerPlan",
    "MultiPointerPlan",
    "State",
    "local_worker",
    "FedwsError",
    "ProtocolError",
    "DecodeError",
    "EncodeError",
    "PointerError",
    "LocationError",
    "RemoteError",
    "ObjectNotFoundError",
    "OpNotAllowedError",
    "DependencyError",
    "StoreFullError",
    "MemoryBudgetError",
    "LimitExceededError",
    "PlanError",
    "PermissionDeniedError",
    "PrivacyBudgetExceededError",
    "FedwsConnectionError",
    "ConnectionLostError",
    "AuthenticationError",
    "FedwsTimeoutError",
    "WrongThreadError",
    "RoundFailedError",
    "optim",
]


def __getattr__(name: str) -> Any:
    if name == "local_worker":  # the latest hook's worker "me" (the default federation's), as in the seed
        from .hook import current_federation, default_federation

        federation = current_federation() or default_federation()
        return federation.local_worker
    raise AttributeError(f"module 'fedws' has no attribute {name!r}")
