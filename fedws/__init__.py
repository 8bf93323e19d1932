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

from typing import TYPE_CHECKING, Any

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
    SMPCError,
    StoreFullError,
    WrongThreadError,
)
from .version import __version__ as __version__

# Everything that needs torch is imported on first use (PEP 562), so ``fedws --help`` and
# ``fedws status`` start in a tenth of a second. A new export goes in both lists below.
if TYPE_CHECKING:
    from . import fl as fl
    from . import optim as optim
    from .client.federation import Federation
    from .client.listener import NodeListener
    from .client.websocket_worker import WebsocketClientWorker
    from .client.worker import Worker
    from .connecting import connect, connect_async, serve, serve_async
    from .datasets import BaseDataset, FederatedDataLoader, FederatedDataset
    from .fl.train_config import TrainConfig
    from .grid import PrivateGridNetwork
    from .hook import TorchHook
    from .plans import MultiPointerPlan, Plan, PointerPlan, PointerProtocol, Protocol, State, func2plan
    from .pointers import MultiPointerTensor, PointerParameter, PointerTensor
    from .sandbox import create_sandbox, make_hook
    from .smpc import AdditiveSharingTensor, FixedPrecisionTensor
    from .virtual import VirtualWorker

_LAZY = {
    "Federation": "client.federation",
    "WebsocketClientWorker": "client.websocket_worker",
    "Worker": "client.worker",
    "connect": "connecting",
    "connect_async": "connecting",
    "serve": "connecting",
    "serve_async": "connecting",
    "NodeListener": "client.listener",
    "TorchHook": "hook",
    "MultiPointerPlan": "plans",
    "Plan": "plans",
    "PointerPlan": "plans",
    "State": "plans",
    "func2plan": "plans",
    "MultiPointerTensor": "pointers",
    "PointerParameter": "pointers",
    "PointerTensor": "pointers",
    "VirtualWorker": "virtual",
    "Protocol": "plans",
    "PointerProtocol": "plans",
    "PrivateGridNetwork": "grid",
    "create_sandbox": "sandbox",
    "make_hook": "sandbox",
    "BaseDataset": "datasets",
    "FederatedDataset": "datasets",
    "FederatedDataLoader": "datasets",
    "AdditiveSharingTensor": "smpc",
    "FixedPrecisionTensor": "smpc",
    "TrainConfig": "fl.train_config",
}

__all__ = [
    "TorchHook",
    "Federation",
    "VirtualWorker",
    "Worker",
    "WebsocketClientWorker",
    "connect",
    "connect_async",
    "serve",
    "serve_async",
    "NodeListener",
    "PointerTensor",
    "PointerParameter",
    "MultiPointerTensor",
    "AdditiveSharingTensor",
    "FixedPrecisionTensor",
    "func2plan",
    "Plan",
    "PointerPlan",
    "MultiPointerPlan",
    "State",
    "Protocol",
    "PointerProtocol",
    "PrivateGridNetwork",
    "create_sandbox",
    "make_hook",
    "BaseDataset",
    "FederatedDataset",
    "FederatedDataLoader",
    "TrainConfig",
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
    "SMPCError",
    "optim",
    "fl",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        import importlib

        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    if name in ("hook", "optim", "fl"):  # modules: ``sy.optim.Optims``, PySyft's ``sy.hook.local_worker``
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name == "local_worker":  # the latest hook's worker "me" (the default federation's), as in the seed
        from .hook import current_federation, default_federation

        federation = current_federation() or default_federation()
        return federation.local_worker
    raise AttributeError(f"module 'fedws' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
