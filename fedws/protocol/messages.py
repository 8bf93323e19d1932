"""Message kinds and the shapes of requests and replies.

A request is a msgpack array ``[kind, seq, *fields]``; a frame carries one or more
requests, which a node runs in order. A node answers each frame with one reply::

    [watermark, values, errors]

``watermark`` is the highest seq the node has finished; ``values`` lists ``[seq, value]``
for requests that return something (get, search, info); ``errors`` lists
``[seq, error, result_ids]`` for requests that failed. A seq below the watermark with no
error entry succeeded: plain commands are acknowledged without a message of their own,
which is what lets thousands of pipelined commands cost one small reply.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["Kind", "FRAME_ERROR_SEQ"]


class Kind(IntEnum):
    """What a request asks a node to do. Fields follow ``[kind, seq]``."""

    CMD = 1  # op, args, kwargs, result_ids[, grad_enabled] — run an allowlisted op, store results
    STORE = 2  # id, obj, tags, description — store a value
    GET = 3  # id, remove — return a value (and remove it)
    DELETE = 4  # ids — forget objects; missing ids are ignored
    SEARCH = 5  # tags — ids and metadata of objects carrying all the tags
    INFO = 6  # what — "count" | "list" | "meta" (+ id)
    CLEAR = 7  # — forget every object
    RUN_PLAN = 8  # plan_id, args, result_ids — run a stored plan
    ADD_PEER = 9  # worker_id, address — tell the node where another node is
    PING = 10  # — round trip, nothing else
    STORE_PLAN = 11  # id, plan — check a plan against the allowlist and store it


# Seq used in an error entry that concerns the whole frame (it could not be decoded).
FRAME_ERROR_SEQ = -1
