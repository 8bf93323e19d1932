"""``fedws status``: a table of the nodes of a federation, read without torch.

A monitoring command must start in a blink and run where torch is not installed (a
container's healthcheck), so this module speaks the small part of the wire protocol it needs
itself: one ``INFO "status"`` request in a blob of plain msgpack (no tensor, no ext type),
and a reply of plain values. ``tests/ops/test_status.py`` checks these bytes against
:mod:`fedws.protocol.codec` and :mod:`fedws.protocol.messages`, so the two cannot drift.
"""

from __future__ import annotations

import json
import os
import ssl
import struct
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from .client.status import NodeStatus

__all__ = ["NodeReport", "query", "query_all", "urls_from_configs", "format_table", "to_json", "read_token"]

# The protocol constants this client needs (pinned against the real ones by the tests).
_HEAD = struct.Struct("<IIQ")  # fedws.protocol.codec: env_len | pad | buf_len
_KIND_INFO = 6  # fedws.protocol.messages.Kind.INFO
_NODE_ID_HEADER = "X-Fedws-Node"  # fedws.transport.handshake.NODE_ID_HEADER
_MAX_REPLY = 1 << 20  # a status map is a few hundred bytes


@dataclass
class NodeReport:
    """One node as ``fedws status`` saw it: its status, or why it could not be read."""

    url: str
    status: NodeStatus | None = None
    latency_s: float | None = None
    error: str | None = None

    @property
    def up(self) -> bool:
        return self.status is not None


def _request_blob() -> bytes:
    env: bytes = msgpack.packb([_KIND_INFO, 1, "status"], use_bin_type=True)
    return _HEAD.pack(len(env), 0, 0) + env


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("the node answered with a value that is not plain data")


def _parse_reply(frame: bytes) -> Any:
    """The value of the one request, or raise with the node's error."""
    if len(frame) < _HEAD.size:
        raise ValueError("the node's reply is too short")
    env_len, _pad, buf_len = _HEAD.unpack_from(frame, 0)
    if buf_len or _HEAD.size + env_len != len(frame):
        raise ValueError("the node's reply is not a plain status answer")
    watermark, values, errors = msgpack.unpackb(
        frame[_HEAD.size:], ext_hook=_no_ext, raw=False, strict_map_key=False
    )
    for _seq, err, *_ in errors:
        if isinstance(err, dict):
            raise ValueError(f"{err.get('type', 'error')}: {err.get('message', '')}")
        raise ValueError(str(err)[:200])
    for seq, value in values:
        if seq == 1:
            return value
    raise ValueError("the node did not answer the status request (an older fedws?)")


def _tls(url: str, cafile: str | None) -> ssl.SSLContext | None:
    if not url.startswith("wss://"):
        return None
    return ssl.create_default_context(cafile=cafile)


def query(url: str, token: str | None = None, *, timeout: float = 5.0, cafile: str | None = None) -> NodeReport:
    """Ask one node for its status; never raises (a node that is down is a row, not an error)."""
    from websockets.exceptions import InvalidStatus, WebSocketException
    from websockets.sync.client import connect

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with connect(
            url, additional_headers=headers, open_timeout=timeout, close_timeout=1,
            max_size=_MAX_REPLY, ssl=_tls(url, cafile), compression=None,
        ) as ws:
            if ws.response is None or ws.response.headers.get(_NODE_ID_HEADER) is None:
                return NodeReport(url, error="not a fedws node")
            start = time.perf_counter()
            ws.send(_request_blob())
            reply = ws.recv(timeout=timeout)
            latency = time.perf_counter() - start
            if isinstance(reply, str):
                return NodeReport(url, error="not a fedws node")
            status = NodeStatus.from_wire(_parse_reply(reply), url=url)
            return NodeReport(url, status, latency)
    except InvalidStatus as exc:
        code = exc.response.status_code
        why = "wrong or missing token (give --token-file or $FEDWS_TOKEN)" if code == 401 else f"HTTP {code}"
        return NodeReport(url, error=why)
    except TimeoutError:
        return NodeReport(url, error=f"no answer within {timeout:g} s")
    except (OSError, WebSocketException, ValueError, msgpack.UnpackException) as exc:
        return NodeReport(url, error=_reason(exc))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the node running?)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)[:200] or type(exc).__name__


def query_all(urls: Sequence[str], token: str | None = None, *, timeout: float = 5.0,
              cafile: str | None = None) -> list[NodeReport]:
    """Every node's report, asked in parallel (one thread each), in the order given."""
    from concurrent.futures import ThreadPoolExecutor

    if not urls:
        return []
    with ThreadPoolExecutor(min(len(urls), 16)) as pool:
        return list(pool.map(lambda u: query(u, token, timeout=timeout, cafile=cafile), urls))


def urls_from_configs(path: Path) -> tuple[list[str], str | None]:
    """The URLs of the node configs in ``path`` (a directory of ``*.toml``, or one file),
    and a token one of them names inline (the operator's own file), if any.

    Raises:
        ValueError: no config there, or one that is not TOML (one line, what to fix).
    """
    files = sorted(path.glob("*.toml")) if path.is_dir() else [path]
    if not path.exists():
        raise ValueError(f"{path} does not exist (give the directory of your node configs, e.g. workers/)")
    urls, token = [], None
    for f in files:
        try:
            cfg = tomllib.loads(f.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{f}: not a readable TOML file ({exc})") from None
        if "id" not in cfg:
            continue  # not a node config
        host = str(cfg.get("host", "127.0.0.1"))
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        scheme = "wss" if cfg.get("certfile") else "ws"
        urls.append(f"{scheme}://{host}:{int(cfg.get('port', 8777))}")
        if token is None and isinstance(cfg.get("token"), str):
            token = cfg["token"]
    if not urls:
        raise ValueError(f"no node config (a TOML file with an id) in {path}")
    return urls, token


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}M"


def _duration(s: float) -> str:
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _opt(v: int | None) -> str:
    return "-" if v is None else str(v)


_COLUMNS = ("NODE", "URL", "STATE", "LATENCY", "VERSION", "PRINCIPALS", "OBJECTS", "BYTES", "MEMORY",
            "PLANS", "UPTIME")


def format_table(reports: Iterable[NodeReport]) -> str:
    """A fixed-width table, one row per node; a node that is down says why."""
    rows = [list(_COLUMNS)]
    notes = []
    for r in reports:
        s = r.status
        if s is None:
            rows.append(["?", r.url, "down", "-", "-", "-", "-", "-", "-", "-", "-"])
            notes.append(f"{r.url}: {r.error}")
            continue
        memory = "-" if s.memory_budget is None else f"{_mib(s.memory_used)}/{_mib(s.memory_budget)}"
        scope = "" if s.scope == "node" else " (own session)"
        rows.append([
            s.id, r.url, "up" + scope, f"{(r.latency_s or 0) * 1000:.1f}ms", s.version, _opt(s.principals),
            str(s.objects), _mib(s.bytes), memory, str(s.plans), _duration(s.uptime_s),
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + notes)


def to_json(reports: Iterable[NodeReport]) -> str:
    """One JSON object per node (``up``, ``latency_s``, ``error`` and the status fields)."""
    out = []
    for r in reports:
        item: dict[str, Any] = {"url": r.url, "up": r.up, "latency_s": r.latency_s, "error": r.error}
        if r.status is not None:
            item.update(r.status.as_dict())
        out.append(item)
    return json.dumps(out, indent=2)


def read_token(token_file: Path | None) -> str | None:
    """``--token-file`` (first line), else ``$FEDWS_TOKEN``.

    Raises:
        ValueError: the file cannot be read.
    """
    if token_file is not None:
        try:
            return token_file.read_text().strip() or None
        except OSError as exc:
            raise ValueError(f"cannot read token file {token_file}: {exc.strerror or exc}") from None
    return os.environ.get("FEDWS_TOKEN") or None
