"""The one exception tree of fedws.

Every error fedws raises derives from :class:`FedwsError`, so ``except fedws.FedwsError``
catches them all. Errors that mirror a builtin family also derive from that builtin,
so code written against ``ConnectionError`` or ``TimeoutError`` keeps working::

    FedwsError
    ├── ProtocolError                 bytes that are not a valid fedws frame
    │   ├── DecodeError               (malformed frame, tensor header/bytes mismatch)
    │   └── EncodeError               (value that cannot travel: sparse tensor, lambda ...)
    ├── PointerError                  misuse of a pointer, caught before anything is sent
    │   └── LocationError             mixing a pointer with a local tensor or another worker
    ├── RemoteError                   a command failed on a node (carries remote type/message)
    │   ├── ObjectNotFoundError       the node does not hold that object (any more)
    │   ├── OpNotAllowedError         the op is not in the allowlist (also raised locally)
    │   ├── DependencyError           the command used the result of a failed command
    │   ├── StoreFullError            the node's store cap would be exceeded
    │   │   └── MemoryBudgetError     a command/reply would exceed the node's memory budget
    │   ├── LimitExceededError        a request or reply exceeds a node's size limit
    │   ├── PlanError                 a step of a remote plan failed (names op and position)
    │   └── PermissionDeniedError     the node's policy refused it (another's object, private data)
    │       └── PrivacyBudgetExceededError  a DP release would exceed the principal's budget
    ├── FedwsConnectionError          also a builtin ConnectionError
    │   ├── ConnectionLostError       the link dropped while commands were pending
    │   └── AuthenticationError       the node refused the token
    ├── FedwsTimeoutError             also a builtin TimeoutError
    ├── WrongThreadError              a blocking call made from the IO thread
    ├── RoundFailedError              a federated round had too few answers (fedws.fl)
    └── SMPCError                     secure computation misused or not supported (fedws.smpc)

Errors that happen on a node carry ``worker`` (the node id) and ``obj_id`` (the object the
command was about) so a message always says where and what.
"""

from __future__ import annotations

__all__ = [
    "FedwsError",
    "ProtocolError",
    "DecodeError",
    "EncodeError",
    "PointerError",
    "LocationError",
    "RemoteError",
    "ObjectNotFoundError",
    "OpNotAllowedError",
    "DependencyError",
    "StoreFullError",
    "MemoryBudgetError",
    "LimitExceededError",
    "PlanError",
    "PermissionDeniedError",
    "PrivacyBudgetExceededError",
    "FedwsConnectionError",
    "ConnectionLostError",
    "AuthenticationError",
    "FedwsTimeoutError",
    "WrongThreadError",
    "RoundFailedError",
    "SMPCError",
]


class FedwsError(Exception):
    """Root of every fedws error."""


class ProtocolError(FedwsError):
    """Bytes on the wire do not follow the fedws protocol."""


class DecodeError(ProtocolError):
    """A frame or value could not be decoded; nothing from it was executed."""


class EncodeError(ProtocolError):
    """A value cannot be put on the wire (unsupported type or tensor layout)."""


class PointerError(FedwsError):
    """A pointer was used in a way that cannot work; raised locally, nothing was sent."""


class LocationError(PointerError):
    """An operation mixes data that lives in different places."""


class RemoteError(FedwsError):
    """A command failed on a node.

    Attributes:
        worker: id of the node that ran the command.
        obj_id: id of the object the command was about (or None).
        remote_type: name of the exception class raised on the node.
        remote_message: its message.
        remote_traceback: kept for compatibility; always None for errors from the wire
            (nodes keep their tracebacks in their own log).
        op: the op name, when the failure happened in an op.
    """

    def __init__(
        self,
        message: str,
        *,
        worker: str | None = None,
        obj_id: int | None = None,
        remote_type: str | None = None,
        remote_message: str | None = None,
        remote_traceback: str | None = None,
        op: str | None = None,
    ) -> None:
        super().__init__(message)
        self.worker = worker
        self.obj_id = obj_id
        self.remote_type = remote_type or type(self).__name__
        self.remote_message = remote_message if remote_message is not None else message
        self.remote_traceback = remote_traceback
        self.op = op


class ObjectNotFoundError(RemoteError, KeyError):
    """The node holds no object under that id (deleted, gotten, or never sent)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class OpNotAllowedError(RemoteError):
    """The op is not in the allowlist; it was not run."""


class DependencyError(RemoteError):
    """The command used the result of an earlier command that failed."""


class StoreFullError(RemoteError):
    """Storing the object would exceed the node's ``max_store_mb``."""


class MemoryBudgetError(StoreFullError):
    """The command (or reply) would take the node over its memory budget; it was not run.

    Checked *before* anything is allocated, from the size the output would have; nothing
    the node held was lost.
    """


class LimitExceededError(RemoteError):
    """A request or its reply exceeds one of the node's size limits (too many objects to
    list, too many ids); nothing was changed."""


class PlanError(RemoteError):
    """A step of a plan failed; the message names the op and its position."""


class PermissionDeniedError(RemoteError):
    """The node's policy refused the request: the object belongs to another session or
    principal, it is data the node serves (read-only), or it is private and no release
    rule the node's operator configured lets it leave. Nothing was changed."""


class PrivacyBudgetExceededError(PermissionDeniedError):
    """A differentially private release would take the principal past its privacy budget."""


class FedwsConnectionError(FedwsError, ConnectionError):
    """A node could not be reached."""


class ConnectionLostError(FedwsConnectionError):
    """The link to a node dropped; commands that were pending failed with this."""


class AuthenticationError(FedwsConnectionError):
    """The node refused the connection's token."""


class FedwsTimeoutError(FedwsError, TimeoutError):
    """A wait exceeded its timeout. The command may still complete on the node."""


class WrongThreadError(FedwsError, RuntimeError):
    """A blocking call was made from the fedws IO thread, where it would deadlock."""


class RoundFailedError(FedwsError):
    """A federated round could not complete.

    Attributes:
        round: the round number (1-based).
        answered: ids of the nodes whose update arrived.
        min_nodes: how many were needed.
        dropped: node id -> why it was left out.
    """

    def __init__(
        self,
        message: str,
        *,
        round: int,
        answered: list[str] | None = None,
        min_nodes: int = 1,
        dropped: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.round = round
        self.answered = list(answered or [])
        self.min_nodes = min_nodes
        self.dropped = dict(dropped or {})


class SMPCError(FedwsError):
    """Secure computation refused: parties that could reconstruct alone, shares of different
    parties mixed, a float shared without ``fix_precision()``, an op with no sound protocol."""
