"""The node's audit log: who connected, which plan ran, what left, what was refused.

One JSON object per line on the ``fedws.audit`` logger; the node process attaches a
rotating file handler (:func:`open_audit_log`) when the config names ``audit_log``. Records
name principals, sessions, object ids, plan digests, byte counts and reasons — never the
data itself (no tensor values, no argument values).

Example line::

    {"t": "2025-01-01T12:00:00.000+00:00", "event": "release", "node": "alice",
     "principal": "lab-a", "session": "3f2a9c1d", "obj_id": 123, "bytes": 4096,
     "rule": "approved-plan"}
"""

from __future__ import annotations

import json
import logging
import logging.handlers
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .policy import Caller

__all__ = ["Audit", "open_audit_log", "AUDIT_LOGGER"]

AUDIT_LOGGER = "fedws.audit"

_log = logging.getLogger(AUDIT_LOGGER)
_log.propagate = False  # the audit trail goes to its own file, not the node's stderr


class Audit:
    """Writes audit records for one node (a no-op unless ``fedws.audit`` has a handler)."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id

    @property
    def enabled(self) -> bool:
        return _log.isEnabledFor(logging.INFO) and bool(_log.handlers)

    def record(self, event: str, caller: Caller | None, **fields: Any) -> None:
        """One line: ``event``, who, and ``fields`` (ids, digests, sizes, reasons only)."""
        if not self.enabled:
            return
        line: dict[str, Any] = {
            "t": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "event": event,
            "node": self.node_id,
        }
        if caller is not None:
            line["principal"] = caller.principal
            line["session"] = caller.session[:8]
            if caller.address:
                line["address"] = caller.address
        line.update(fields)
        _log.info(json.dumps(line, default=str), extra={"fedws_node": self.node_id})

    def connected(self, caller: Caller) -> None:
        self.record("connect", caller)

    def refused(self, caller: Caller | None, request: str, reason: str, obj_id: int | None = None) -> None:
        self.record("refuse", caller, request=request, obj_id=obj_id, reason=reason)

    def released(self, caller: Caller | None, obj_id: int, nbytes: int, rule: str, **more: Any) -> None:
        self.record("release", caller, obj_id=obj_id, bytes=nbytes, rule=rule, **more)


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


def open_audit_log(
    path: str | Path, *, max_bytes: int = 10 * 2**20, backups: int = 5, node: str | None = None
) -> logging.Handler:
    """Send the audit records of this process to ``path`` (rotated at ``max_bytes``); only
    those of node ``node`` when given (several nodes of one process keep their own files).

    Returns the handler (remove it from ``logging.getLogger("fedws.audit")`` to stop).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    handler.setFormatter(_Json())
    if node is not None:
        handler.addFilter(lambda record: getattr(record, "fedws_node", None) == node)
    _log.addHandler(handler)
    _log.setLevel(logging.INFO)
    return handler
