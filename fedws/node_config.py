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

A node opens links to other nodes (``move``, ``remote_get``, pointer chains) only to the
peers listed here, and presents to each the credential listed for it — never its own::

    peer_timeout = 10                   # seconds to connect to / wait on a peer
    [[peers]]
    id = "bob"
    url = "ws://127.0.0.1:8778"         # wss:// + cafile across machines
    token_env = "FEDWS_TOKEN_FOR_BOB"   # or token_file = "secrets/bob.token" (or token = "...")
    secret_env = "FEDWS_SECRET_BOB"     # optional: bob must prove it shares this secret
    cafile = "certs/bob.pem"            # optional: the certificate bob's wss:// must present

``open_peers = true`` (development only, or ``fedws worker --insecure-dev``) lets a
coordinator name any address; the node then presents no credential there.

The security sections (see the README's "Security model")::

    policy = "private"              # default; "open" is the development mode (no checks)
    audit_log = "run/alice-audit.jsonl"
    session_grace_s = 300           # a session's objects are freed this long after it ended,
                                    # unless it reconnects first or the owner made them durable
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

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from .node.policy import MODES, PERMISSIONS, DPRule
from .transport.handshake import token_digest

__all__ = ["NodeConfig", "DataEntry", "PeerEntry", "TokenEntry", "load_config", "load_configs", "load_tensor", "same_url"]


@dataclass
class DataEntry:
    """One tensor a node serves, with the tags ``search`` finds it by."""

    file: Path
    key: str | None = None
    tags: list[str] = field(default_factory=list)
    description: str | None = None


@dataclass
class PeerEntry:
    """A node this node may link to, and what it presents there.

    Attributes:
        id: the peer's node id; the peer must name itself so in the handshake.
        url: where it listens (``ws://`` or ``wss://``).
        token, token_env, token_file: the credential the peer issued to this node (one of
            them; the file is relative to the config). None of them: present nothing.
        secret_env, secret_file: a secret both nodes' operators configured for this link;
            the peer must prove it holds it (an HMAC over a fresh challenge).
        cafile: the certificate (or CA) a ``wss://`` peer must present.
    """

    id: str
    url: str
    token: str | None = None
    token_env: str | None = None
    token_file: Path | None = None
    secret_env: str | None = None
    secret_file: Path | None = None
    cafile: Path | None = None

    def credential(self) -> str | None:
        """The token to present to this peer.

        Raises:
            ValueError: the variable is unset or the file unreadable.
        """
        return _secret_value(self.id, "token", self.token, self.token_env, self.token_file)

    def secret(self) -> bytes | None:
        """The secret the peer must prove it shares (None: no proof asked)."""
        value = _secret_value(self.id, "secret", None, self.secret_env, self.secret_file)
        return value.encode() if value is not None else None


def _secret_value(peer: str, what: str, inline: str | None, env: str | None, file: Path | None) -> str | None:
    if sum(x is not None for x in (inline, env, file)) > 1:
        raise ValueError(f"peer {peer!r}: give one of {what}, {what}_env, {what}_file")
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise ValueError(f"peer {peer!r}: environment variable {env} is not set")
        return value
    if file is not None:
        return read_secret_file(file, f"peer {peer!r}: {what}_file")
    return inline


def read_secret_file(file: Path, what: str) -> str:
    """The stripped text of a token or secret file; ``what`` names it in the error.

    Raises:
        ValueError: the file cannot be read, or is empty.
    """
    try:
        value = file.read_text().strip()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {file}: {exc.strerror or exc}") from None
    if not value:
        raise ValueError(f"{what}: {file} is empty")
    return value


def same_url(a: str, b: str) -> bool:
    """Whether two WebSocket URLs name the same place (case of host, default ports, a
    trailing slash do not matter)."""

    def norm(url: str) -> tuple[str, str, int | None, str]:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port is None:
            port = 443 if parts.scheme == "wss" else 80
        return parts.scheme.lower(), (parts.hostname or ""), port, parts.path.rstrip("/")

    return norm(a) == norm(b)


_PEER_KEYS = {"id", "url", "token", "token_env", "token_file", "secret_env", "secret_file", "cafile"}


@dataclass
class TokenEntry:
    """One credential: the principal it names, the sha256 (hex) of the token, and what the
    operator lets that principal do (``may``; None: everything, see ``policy.PERMISSIONS``)."""

    principal: str
    sha256: str
    may: frozenset[str] | None = None


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
    peers: list[PeerEntry] = field(default_factory=list)
    peer_timeout: float = 10.0
    open_peers: bool = False
    policy: str = "private"
    tokens: list[TokenEntry] = field(default_factory=list)
    approved_plans: list[str] = field(default_factory=list)
    dp: DPRule | None = None
    audit_log: str | None = None
    session_grace_s: float = 300.0

    @property
    def url(self) -> str:
        scheme = "wss" if self.certfile else "ws"
        return f"{scheme}://{self.host}:{self.port}"


_KEYS = {
    "id", "host", "port", "token", "certfile", "keyfile", "max_frame_mb", "max_store_mb",
    "max_memory_mb", "threads", "data", "peers", "peer_timeout", "open_peers", "policy", "tokens", "release",
    "audit_log", "session_grace_s",
}
_DP_KEYS = {"max_norm", "noise_multiplier", "epsilon", "delta", "always"}


def _tokens(path: Path, raw: Any) -> list[TokenEntry]:
    out = []
    if not isinstance(raw, list):
        raise ValueError(f"node config {path}: 'tokens' must be an array of tables ([[tokens]])")
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or set(t) - {"principal", "sha256", "token_file", "may"}:
            raise ValueError(f"node config {path}: tokens entry {i} takes principal, sha256 or token_file, may")
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
            digest = token_digest(read_secret_file(f, f"node config {path}: token_file of {principal!r}"))
        may = t.get("may")
        if may is not None:
            if not isinstance(may, list) or not all(isinstance(m, str) for m in may) or set(may) - PERMISSIONS:
                raise ValueError(
                    f"node config {path}: tokens entry {i} ({principal}): may lists permissions of "
                    f"{sorted(PERMISSIONS)}"
                )
            may = frozenset(may)
        out.append(TokenEntry(principal, digest, may))
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
        raise ValueError(f"node config {path} does not exist (see workers/*.toml for examples)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"node config {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"node config {path} is not valid TOML: {exc}") from None
    if "node" in raw:
        raise ValueError(f"node config {path} has [[node]] tables: start it with `fedws worker --config` "
                         "(load_configs reads them)")
    return _parse(path, raw)


HOST_KEYS = frozenset({"host", "port", "certfile", "keyfile", "max_frame_mb", "threads"})
"""Keys of the process, not of one node: top level only in a config with ``[[node]]`` tables."""
MAX_NODE_TABLES = 10_000


def load_configs(path: str | Path) -> list[NodeConfig]:
    """The nodes of a config: one per ``[[node]]`` table, or the file's one node.

    In a config with ``[[node]]`` tables the top-level keys are every node's defaults and
    the socket's settings (:data:`HOST_KEYS`); a table sets its node's own ``id``, tokens,
    policy, data, peers, audit log... (a list in a table replaces the default list)::

        port = 8777
        policy = "private"
        [[node]]
        id = "alice"
        [[node.tokens]]
        principal = "lab-a"
        sha256 = "<hex sha256 of lab-a's token>"
        [[node]]
        id = "bob"

    Raises:
        ValueError: as :func:`load_config`, naming the path and the table.
    """
    path = Path(path)
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return [load_config(path)]  # the same errors, worded once
    tables = raw.pop("node", None)
    if tables is None:
        return [_parse(path, raw)]
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ValueError(f"node config {path}: 'node' must be an array of tables ([[node]])")
    if len(tables) > MAX_NODE_TABLES:
        raise ValueError(f"node config {path}: more than {MAX_NODE_TABLES} [[node]] tables")
    out = []
    for i, table in enumerate(tables):
        host_keys = sorted(set(table) & HOST_KEYS)
        if host_keys:
            raise ValueError(f"node config {path}: [[node]] {i} sets {host_keys}: they belong at the top level")
        if "id" not in table:
            raise ValueError(f"node config {path}: [[node]] {i} has no 'id'")
        out.append(_parse(path, {**raw, **table}))
    return out


def _parse(path: Path, raw: dict[str, Any]) -> NodeConfig:
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
    peers = [_peer_entry(path, i, p) for i, p in enumerate(raw.pop("peers", []))]
    if len({p.id for p in peers}) != len(peers):
        raise ValueError(f"node config {path}: a peer id is listed twice")
    tokens = _tokens(path, raw.pop("tokens", []))
    plans, dp = _release(path, raw.pop("release", {}))
    grace = raw.get("session_grace_s", 300.0)
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace < float("inf"):
        raise ValueError(f"node config {path}: session_grace_s must be a number of seconds >= 0")
    if raw.get("policy", "private") not in MODES:
        raise ValueError(f"node config {path}: policy must be one of {list(MODES)}")
    audit = raw.pop("audit_log", None)
    if audit is not None:
        a = Path(audit)
        audit = str(a if a.is_absolute() else path.parent / a)
    return NodeConfig(
        **raw, data=entries, peers=peers, tokens=tokens, approved_plans=plans, dp=dp, audit_log=audit
    )


def _peer_entry(path: Path, i: int, raw: Any) -> PeerEntry:
    if not isinstance(raw, dict):
        raise ValueError(f"node config {path}: peers entry {i} is not a table")
    unknown = set(raw) - _PEER_KEYS
    if unknown:
        raise ValueError(f"node config {path}: peers entry {i}: unknown keys {sorted(unknown)}")
    if not isinstance(raw.get("id"), str) or not isinstance(raw.get("url"), str):
        raise ValueError(f"node config {path}: peers entry {i} needs 'id' and 'url' strings")
    parts = urlsplit(raw["url"])
    if parts.scheme not in ("ws", "wss", "dialout") or not parts.hostname:  # dialout://ID: via the relay
        raise ValueError(f"node config {path}: peer {raw['id']!r}: url must be ws://host:port or wss://host:port")

    def rel(key: str) -> Path | None:
        if raw.get(key) is None:
            return None
        f = Path(raw[key])
        return f if f.is_absolute() else path.parent / f

    entry = PeerEntry(
        id=raw["id"],
        url=raw["url"],
        token=raw.get("token"),
        token_env=raw.get("token_env"),
        token_file=rel("token_file"),
        secret_env=raw.get("secret_env"),
        secret_file=rel("secret_file"),
        cafile=rel("cafile"),
    )
    try:  # a missing credential is an error at start, not at the first move
        entry.credential()
        entry.secret()
    except ValueError as exc:
        raise ValueError(f"node config {path}: {exc}") from None
    return entry


def load_tensor(entry: DataEntry) -> torch.Tensor:
    """Load one data entry; only .safetensors and .npy are accepted."""
    suffix = entry.file.suffix.lower()
    if not entry.file.exists():
        raise ValueError(
            f"data file {entry.file} does not exist: for the example federation in workers/ run "
            "`make workers` (or `python examples/prepare_data.py`); otherwise fix 'file' in the config"
        )
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
