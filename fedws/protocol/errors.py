"""Exceptions to wire dicts and back.

A node never sends a pickled exception, and never its traceback: it sends the error's
class name and message, and the client rebuilds one of fedws's own classes from a fixed
table (any other remote type becomes a plain :class:`RemoteError` that names it).

A coordinator is not trusted with the node's internals, so what goes on the wire is only
what the caller needs to understand its mistake. The traceback stays on the node (its log
keeps it: :func:`error_traceback` gives the text), file-system paths and memory addresses
are scrubbed from messages (``/usr/lib/python3/site-packages/torch/x.py`` becomes
``<path>``), a C++ backtrace torch appends is cut, and messages are bounded in length.
"""

from __future__ import annotations

import re
import traceback
from typing import Any

from ..exceptions import (
    DependencyError,
    FedwsError,
    LimitExceededError,
    MemoryBudgetError,
    ObjectNotFoundError,
    OpNotAllowedError,
    PermissionDeniedError,
    PlanError,
    PrivacyBudgetExceededError,
    RemoteError,
    StoreFullError,
)

__all__ = ["error_to_wire", "error_from_wire", "error_traceback", "scrub_message", "MAX_MESSAGE"]

_REMOTE_CLASSES: dict[str, type[RemoteError]] = {
    cls.__name__: cls
    for cls in (
        RemoteError,
        ObjectNotFoundError,
        OpNotAllowedError,
        DependencyError,
        StoreFullError,
        MemoryBudgetError,
        LimitExceededError,
        PlanError,
        PermissionDeniedError,
        PrivacyBudgetExceededError,
    )
}
# Node-side protocol errors reach the client as remote errors of the same name.
_REMOTE_CLASSES["DecodeError"] = RemoteError
# Characters of a message on the wire (a DependencyError chains its cause's message, so
# this also bounds how much a chain of failures can grow).
MAX_MESSAGE = 2000
_MAX_NAME = 200
_TB_LIMIT = 8000

# Matching is linear in the message (a message may quote what a peer sent): tokens are
# maximal runs without spaces or quotes, and each is tested on its own.
_TOKEN = re.compile(r"[^\s'\"<>|;,()\[\]{}]+")
_INSTALL_DIR = re.compile(r"site-packages|dist-packages|lib[/\\]python\d")
_SOURCE_FILE = re.compile(
    r"\.(?:pyc|pyx|pyi|py|so|pyd|dylib|dll|cpp|cc|cu|hpp|h|c)(?:\.\d+)*(?::\d+)*[:.]?$"
)
_CPP_BACKTRACE = re.compile(r"\n?Exception raised from ", re.S)
_FILE_LINE = re.compile(r'File "[^"\n]{0,1000}"')
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{8,}\b")


def _scrub_token(m: re.Match[str]) -> str:
    tok = m.group(0)
    if ("/" in tok or "\\" in tok) and (_INSTALL_DIR.search(tok) or _SOURCE_FILE.search(tok)):
        return "<path>"
    return tok


def scrub_message(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` without file-system paths, addresses or C++ backtraces, at most ``limit`` chars.

    A path is any token with a separator that goes through an install directory
    (site-packages, lib/python3.x) or names a source file or shared library (.py, .so,
    .cpp ...); URLs and plain file names in a message stay.
    """
    text = text[: 2 * limit]
    cut = _CPP_BACKTRACE.search(text)  # torch's C++ backtrace: frames, addresses, paths
    if cut is not None:
        text = text[: cut.start()]
    text = _FILE_LINE.sub('File "<path>"', text)
    text = _TOKEN.sub(_scrub_token, text)
    text = _ADDRESS.sub("0x?", text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def _name(value: Any, default: str | None) -> str | None:
    if value is None:
        return default
    return str(value)[:_MAX_NAME]


def error_traceback(exc: BaseException) -> str:
    """The traceback text of ``exc`` for the node's own log (never for the wire)."""
    return "".join(traceback.format_exception(exc))[-_TB_LIMIT:]


def error_to_wire(
    exc: BaseException, *, worker: str, obj_id: int | None = None, op: str | None = None
) -> dict[str, Any]:
    """Describe ``exc`` (raised on node ``worker``) as a msgpack-able dict.

    The dict carries the error's code, type and scrubbed message, and where it happened
    (worker, op, object): no traceback, no path. Log :func:`error_traceback` on the node
    to keep the rest.
    """
    # Fields may come from a hostile request (an op or id that is a tensor, a list ...):
    # never test their truth, keep only plain strings and ints.
    if isinstance(exc, RemoteError):  # re-sent (a dependency, a peer's answer): scrub again
        remote_type = exc.remote_type
        message = exc.remote_message
        code = type(exc).__name__
        if exc.worker is not None:
            worker = exc.worker
        if exc.obj_id is not None:
            obj_id = exc.obj_id
        if exc.op is not None:
            op = exc.op
    else:
        remote_type = type(exc).__name__
        message = str(exc)
        code = type(exc).__name__ if isinstance(exc, FedwsError) else "RemoteError"
    return {
        "code": code,
        "type": _name(remote_type, "Error"),
        "message": scrub_message(str(message)),
        "worker": _name(worker, None),
        "obj_id": obj_id if type(obj_id) is int else None,
        "op": _name(op, None),
    }


def error_from_wire(d: dict[str, Any]) -> RemoteError:
    """Rebuild the exception a node described; the message names worker, op and object.

    A traceback in the dict (older nodes sent one) is ignored: ``remote_traceback`` is None.
    """
    if not isinstance(d, dict):
        d = {"message": f"malformed error description: {d!r:.200}"}
    cls = _REMOTE_CLASSES.get(str(d.get("code")), RemoteError)
    worker, op = _name(d.get("worker"), None), _name(d.get("op"), None)
    obj_id = d.get("obj_id")
    if type(obj_id) is not int:
        obj_id = None
    remote_type = _name(d.get("type"), None) or "Error"
    message = scrub_message(str(d.get("message") or ""))
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
        remote_traceback=None,
        op=op,
    )
