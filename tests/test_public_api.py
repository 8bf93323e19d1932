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
    "WrongThreadError", "Federation", "connect", "connect_async",
    "Protocol", "PrivateGridNetwork", "create_sandbox",
    "serve", "serve_async", "NodeListener",
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


@pytest.mark.parametrize("module", ["fedws.pointers", "fedws.hook", "fedws.exceptions", "fedws.smpc"])
def test_core_modules_declare_all(module: str) -> None:
    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert hasattr(mod, name)


def test_top_level_names_are_the_public_names_of_their_modules() -> None:
    """Everything ``fedws`` exports is declared public (``__all__``) where it is defined, and
    everything it imports for users is in its ``__all__``: one list of public names."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(fedws.__file__).read_text())
    imported: dict[str, str] = {}
    # Eager imports, and the TYPE_CHECKING block naming what ``fedws.__getattr__`` loads lazily.
    body = [n for top in tree.body for n in (top.body if isinstance(top, ast.If) else [top])]
    submodules: set[str] = set()  # `from . import optim`: a module users reach as sy.optim
    for node in body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                imported[alias.asname or alias.name] = f"fedws.{node.module}"
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            submodules.update(alias.asname or alias.name for alias in node.names)
    imported.pop("__version__", None)  # an attribute, not an API name
    assert submodules <= set(fedws.__all__)
    exported = set(fedws.__all__) - {"local_worker"} - submodules
    assert exported == set(imported), (exported ^ set(imported))
    for name, module in imported.items():
        assert name in importlib.import_module(module).__all__, f"{module} does not declare {name} public"
    lazy = {n: f"fedws.{m}" for n, m in fedws._LAZY.items()}
    assert lazy == {n: m for n, m in imported.items() if m != "fedws.exceptions"}, "_LAZY and TYPE_CHECKING differ"
    exceptions = importlib.import_module("fedws.exceptions")
    assert set(exceptions.__all__) <= exported, "every error class is reachable as sy.<Name>"


def test_star_import_in_a_fresh_interpreter() -> None:
    import subprocess
    import sys

    code = "from fedws import *\nimport fedws\nmissing = [n for n in fedws.__all__ if n not in globals()]\nprint(missing)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "package", ["fedws.protocol", "fedws.node", "fedws.transport", "fedws.client", "fedws.pointers", "fedws.plans", "fedws.fl"]
)
def test_every_module_declares_all(package: str) -> None:
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{package}.{info.name}")
        assert hasattr(mod, "__all__"), mod.__name__
