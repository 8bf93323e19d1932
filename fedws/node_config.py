"""Worker-node configuration: a TOML file naming the node and the data it serves.

Data is loaded only from safe formats — ``.safetensors`` (via the safetensors package) and
``.npy`` (numpy with ``allow_pickle=False``) — so a config can never make a node run code::

    id = "alice"
    host = "127.0.0.1"
    port = 8777
    max_store_mb = 1024
    [[data]]
    file = "data/alice_x.safetensors"   # relative to this file
    key = "x"                           # tensor name inside a .safetensors file
    tags = ["#digits", "#x"]
    description = "digits images, shard 1 of 3"

The security sections (see the README's "Security model")::

    policy = "private"              # default; "open" is the development mode (no checks)
    audit_log = "run/alice-audit.jsonl"
    [[tokens]]                      # each credential names a principal; hashed at rest
    principal = "lab-a"
    sha256 = "<hex sha256 of the token>"     # printf %s "$TOKEN" | sha256sum
    [[tokens]]
    principal = "lab-b"
    token_file = "secrets/lab-b.token"       # or the token in a file only the node reads
    [release]
    approved_plans = ["<hex plan digest>"]   # outputs of these plans may leave
    [release.dp]                             # optional: differentially private release
    max_norm = 1.0
    noise_multiplier = 1.1
    epsilon = 3.0
    delta = 1e-5
    always = false                           # true: every private release is DP
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .node.policy import MODES, DPRule
from .transport.handshake import token_digest

__all__ = ["NodeConfig", "DataEntry", "TokenEntry", "load_config", "load_tensor"]


@dataclass
class DataEntry:
    """One tensor a node serves, with the tags ``search`` finds it by."""

    file: Path
    key: str | None = None
    tags: list[str] = field(default_factory=list)
    description: str | None = None


@dataclass
class TokenEntry:
    """One credential: the principal it names and the sha256 (hex) of the token."""

    principal: str
    sha256: str


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
    threads: int | None = None
    data: list[DataEntry] = field(default_factory=list)
    policy: str = "private"
    tokens: list[TokenEntry] = field(default_factory=list)
    approved_plans: list[str] = field(default_factory=list)
    dp: DPRule | None = None
    audit_log: str | None = None

    @property
    def url(self) -> str:
        scheme = "wss" if self.certfile else "ws"
        return f"{scheme}://{self.host}:{self.port}"


_KEYS = {
    "id", "host", "port", "token", "certfile", "keyfile", "max_frame_mb", "max_store_mb",
    "threads", "data", "policy", "tokens", "release", "audit_log",
}
_DP_KEYS = {"max_norm", "noise_multiplier", "epsilon", "delta", "always"}


def _tokens(path: Path, raw: Any) -> list[TokenEntry]:
    out = []
    if not isinstance(raw, list):
        raise ValueError(f"node config {path}: 'tokens' must be an array of tables ([[tokens]])")
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or set(t) - {"principal", "sha256", "token_file"}:
            raise ValueError(f"node config {path}: tokens entry {i} takes principal, sha256 or token_file")
        principal = t.get("principal")
        if not isinstance(principal, str) or not principal:
            raise ValueError(f"node config {path}: tokens entry {i} has no 'principal'")
        if ("sha256" in t) == ("token_file" in t):
            raise ValueError(f"node config {path}: tokens entry {i} ({principal}): give sha256 or token_file")
        if "sha256" in t:
            digest = str(t["sha256"]).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"node config {path}: tokens entry {i} ({principal}): sha256 is 64 hex digits")
        else:
            f = Path(t["token_file"])
            f = f if f.is_absolute() else path.parent / f
            try:
                token = f.read_text().strip()
            except OSError as exc:
                raise ValueError(f"node config {path}: token_file of {principal!r}: {exc.strerror or exc}") from None
            if not token:
                raise ValueError(f"node config {path}: token_file of {principal!r} is empty")
            digest = token_digest(token)
        out.append(TokenEntry(principal, digest))
    return out


def _release(path: Path, raw: Any) -> tuple[list[str], DPRule | None]:
    if not isinstance(raw, dict) or set(raw) - {"approved_plans", "dp"}:
        raise ValueError(f"node config {path}: [release] takes approved_plans and [release.dp]")
    plans = raw.get("approved_plans", [])
    if not isinstance(plans, list) or not all(isinstance(h, str) and len(h) == 64 for h in plans):
        raise ValueError(f"node config {path}: release.approved_plans must list 64-hex-digit plan digests")
    dp = None
    if "dp" in raw:
        d = raw["dp"]
        if not isinstance(d, dict) or set(d) - _DP_KEYS:
            raise ValueError(f"node config {path}: [release.dp] takes {sorted(_DP_KEYS)}")
        try:
            dp = DPRule(**d)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"node config {path}: [release.dp]: {exc}") from None
    return [h.lower() for h in plans], dp


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
    tokens = _tokens(path, raw.pop("tokens", []))
    plans, dp = _release(path, raw.pop("release", {}))
    if raw.get("policy", "private") not in MODES:
        raise ValueError(f"node config {path}: policy must be one of {list(MODES)}")
    audit = raw.pop("audit_log", None)
    if audit is not None:
        a = Path(audit)
        audit = str(a if a.is_absolute() else path.parent / a)
    return NodeConfig(**raw, data=entries, tokens=tokens, approved_plans=plans, dp=dp, audit_log=audit)


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
