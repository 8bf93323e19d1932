"""Exceptions to wire dicts and back.

A node never sends a pickled exception: it sends its class name, message and a short
traceback. The client rebuilds one of fedws's own classes from a fixed table; any other
remote type becomes a plain :class:`RemoteError` that names it.
"""

from __future__ import annotations

import traceback
from typing import Any

from .. import exceptions as exc_mod
from ..exceptions import FedwsError, RemoteError

__all__ = ["error_to_wire", "error_from_wire"]

_REMOTE_CLASSES: dict[str, type[RemoteError]] = {
    cls.__name__: cls
    for cls in (
        exc_mod.RemoteError,
        exc_mod.ObjectNotFoundError,
        exc_mod.OpNotAllowedError,
        exc_mod.DependencyError,
        exc_mod.StoreFullError,
        exc_mod.PlanError,
    )
}
# Node-side protocol errors reach the client as remote errors of the same name.
_REMOTE_CLASSES["DecodeError"] = exc_mod.RemoteError
_TB_LIMIT = 2000


def error_to_wire(
    exc: BaseException, *, worker: str, obj_id: int | None = None, op: str | None = None
) -> dict[str, Any]:
    """Describe ``exc`` (raised on node ``worker``) as a msgpack-able dict."""
    if isinstance(exc, RemoteError):
        remote_type = exc.remote_type
        message = exc.remote_message
        tb = exc.remote_traceback
        code = type(exc).__name__
        worker = exc.worker or worker
        obj_id = exc.obj_id if exc.obj_id is not None else obj_id
        op = exc.op or op
    else:
        remote_type = type(exc).__name__
        message = str(exc)
        tb = "".join(traceback.format_exception(exc))[-_TB_LIMIT:]
        code = type(exc).__name__ if isinstance(exc, FedwsError) else "RemoteError"
    return {
        "code": code,
        "type": remote_type,
        "message": message,
        "worker": worker,
        "obj_id": obj_id,
        "op": op,
        "traceback": tb,
    }


def error_from_wire(d: dict[str, Any]) -> RemoteError:
    """Rebuild the exception a node described; the message names worker, op and object."""
    cls = _REMOTE_CLASSES.get(str(d.get("code")), RemoteError)
    worker, obj_id, op = d.get("worker"), d.get("obj_id"), d.get("op")
    remote_type, message = d.get("type") or "Error", d.get("message") or ""
    where = f"on worker {worker!r}"
    if op:
        where += f" in {op}"
    if obj_id is not None:
        where += f" (object {obj_id})"
    if cls is RemoteError:
        text = f"{remote_type} {where}: {message}"
    else:
        text = f"{message} [{where}]"
    return cls(
        text,
        worker=worker,
        obj_id=obj_id,
        remote_type=remote_type,
        remote_message=message,
        remote_traceback=d.get("traceback"),
        op=op,
    )
