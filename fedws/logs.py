"""Logging set-up for the ``fedws`` command: readable lines by default, JSON for machines.

A node logs one line per connection, plan run, release under a rule (a caller's own results:
DEBUG) and refusal, and one when it stops
(loggers ``fedws.node`` and ``fedws.server``). The audit log (``audit_log`` in a node config)
is a separate file with its own format, written whatever the log level.

``--log-level`` takes a level (``INFO``) or ``logger=LEVEL`` pairs (``fedws.node=DEBUG``),
repeatable; a logger's level applies to everything under it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["configure", "JsonFormatter", "TEXT_FORMAT"]

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else was passed as ``extra`` and goes into JSON.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def _level(name: str) -> int:
    value = logging.getLevelName(name.strip().upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {name!r} (use DEBUG, INFO, WARNING or ERROR)")
    return value


def configure(
    specs: Sequence[str] = (), *, fmt: str = "text", default: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """Send ``fedws.*`` logs to ``stream`` (stderr) as ``fmt`` (``"text"`` or ``"json"``).

    Raises:
        ValueError: an unknown level or format (one line, says what is accepted).
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r} (use text or json)")
    levels: dict[str, int] = {"fedws": default}
    for spec in specs:
        for part in spec.split(","):
            name, sep, word = part.rpartition("=")
            if not sep:
                levels["fedws"] = _level(word)
            elif not name.strip():
                raise ValueError(f"--log-level {part!r}: give LEVEL or logger=LEVEL")
            else:
                levels[name.strip()] = _level(word)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger("fedws")
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.propagate = False
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)
