"""Worker-node configuration: a TOML file naming the node and the data it serves.

Data is loaded only from safe formats — ``.safetensors`` (via the safetensors package) and
``.npy`` (numpy with ``allow_pickle=False``) — so a config can never make a node run code::

    id = "alice"
    host = "127.0.0.1"
    port = 8777
    max_store_mb = 1024
    max_memory_mb = 2048                # budget: held + one command's output (see fedws.node.limits)
    [[data]]
    file = "data/alice_x.safetensors"   # relative to this file
    key = "x"                           # tensor name inside a .safetensors file
    tags = ["#digits", "#x"]
    description = "digits images, shard 1 of 3"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["NodeConfig", "DataEntry", "load_config", "load_tensor"]


@dataclass
class DataEntry:
    """One tensor a node serves, with the tags ``search`` finds it by."""

    file: Path
    key: str | None = None
    tags: list[str] = field(default_factory=list)
    description: str | None = None


@dataclass
class NodeConfig:
    """Everything needed to start one node. CLI options override these."""

    id: str
    host: str = "127.0.0.1"
    port: int = 8777
    token: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    max_frame_mb: float = 1024.0
    max_store_mb: float | None = None
    max_memory_mb: float | None = None
    threads: int | None = None
    data: list[DataEntry] = field(default_factory=list)

    @property
    def url(self) -> str:
        scheme = "wss" if self.certfile else "ws"
        return f"{scheme}://{self.host}:{self.port}"


_KEYS = {
    "id", "host", "port", "token", "certfile", "keyfile", "max_frame_mb", "max_store_mb",
    "max_memory_mb", "threads", "data",
}


def load_config(path: str | Path) -> NodeConfig:
    """Read a node config; unknown keys and missing files are errors, named with the path."""
    path = Path(path)
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"node config {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"node config {path} is not valid TOML: {exc}") from None
    unknown = set(raw) - _KEYS
    if unknown:
        raise ValueError(f"node config {path}: unknown keys {sorted(unknown)}")
    if "id" not in raw:
        raise ValueError(f"node config {path}: 'id' is required")
    entries = []
    for i, d in enumerate(raw.pop("data", [])):
        if "file" not in d:
            raise ValueError(f"node config {path}: data entry {i} has no 'file'")
        f = Path(d["file"])
        entries.append(
            DataEntry(
                file=f if f.is_absolute() else path.parent / f,
                key=d.get("key"),
                tags=list(d.get("tags", [])),
                description=d.get("description"),
            )
        )
    return NodeConfig(**raw, data=entries)


def load_tensor(entry: DataEntry) -> torch.Tensor:
    """Load one data entry; only .safetensors and .npy are accepted."""
    suffix = entry.file.suffix.lower()
    if not entry.file.exists():
        raise ValueError(f"data file {entry.file} does not exist")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(entry.file))
        if entry.key is None:
            if len(tensors) != 1:
                raise ValueError(f"{entry.file} holds {sorted(tensors)}; say which with 'key'")
            return next(iter(tensors.values()))
        if entry.key not in tensors:
            raise ValueError(f"{entry.file} has no tensor {entry.key!r} (has {sorted(tensors)})")
        return tensors[entry.key]
    if suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(entry.file, allow_pickle=False))
    raise ValueError(f"{entry.file}: only .safetensors and .npy data files are loaded (safe formats)")
