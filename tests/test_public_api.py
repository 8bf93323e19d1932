"""The package's public names, and ``__all__`` on every protocol/node module."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import fedws

CORE_NAMES = {
    "TorchHook", "VirtualWorker", "Worker", "PointerTensor", "PointerParameter",
    "MultiPointerTensor", "local_worker", "FedwsError", "ProtocolError", "DecodeError",
    "EncodeError", "PointerError", "LocationError", "RemoteError", "ObjectNotFoundError",
    "OpNotAllowedError", "DependencyError", "StoreFullError", "PlanError",
    "FedwsConnectionError", "ConnectionLostError", "AuthenticationError", "FedwsTimeoutError",
    "WrongThreadError",
}


def test_public_names() -> None:
    assert CORE_NAMES <= set(fedws.__all__)
    assert len(fedws.__all__) == len(set(fedws.__all__))
    for name in fedws.__all__:
        assert getattr(fedws, name, None) is not None or name == "local_worker", name


def test_every_error_is_a_fedws_error() -> None:
    for name in fedws.__all__:
        obj = getattr(fedws, name, None)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, fedws.FedwsError), name
    assert issubclass(fedws.FedwsConnectionError, ConnectionError)
    assert issubclass(fedws.FedwsTimeoutError, TimeoutError)
    assert issubclass(fedws.ObjectNotFoundError, KeyError)


@pytest.mark.parametrize("package", ["fedws.protocol", "fedws.node"])
def test_modules_declare_all(package: str) -> None:
    pkg = importlib.import_module(package)
    assert hasattr(pkg, "__all__")
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{package}.{info.name}")
        assert hasattr(mod, "__all__"), mod.__name__
        for name in mod.__all__:
            assert hasattr(mod, name), f"{mod.__name__}.{name}"


@pytest.mark.parametrize("module", ["fedws.pointers", "fedws.hook", "fedws.exceptions"])
def test_core_modules_declare_all(module: str) -> None:
    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert hasattr(mod, name)


def test_protocol_and_node_import_no_asyncio_or_websockets() -> None:
    import subprocess
    import sys

    # fedws/__init__ pulls the client in; import the sans-I/O layers by path instead
    code = ("import sys, importlib.util, types;"
            "sys.modules['fedws'] = types.ModuleType('fedws');"
            f"import fedws as f; f.__path__ = [__import__('os').path.dirname({fedws.__file__!r})];"
            "import fedws.protocol, fedws.node;"
            "print(','.join(m for m in ('websockets', 'asyncio') if m in sys.modules))"
            )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "websockets" not in out.stdout
