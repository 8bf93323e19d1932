"""Typed request records: they check what arrives, give back the same wire fields, and a
malformed request fails alone — the rest of its frame still runs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedws.exceptions import DecodeError
from fedws.node import Failure, Node
from fedws.protocol.codec import ObjRef, decode, encode_bytes
from fedws.protocol.messages import (
    REQUESTS,
    AddPeer,
    Clear,
    Cmd,
    Delete,
    Get,
    Info,
    Kind,
    Ping,
    Request,
    RunPlan,
    Search,
    Store,
    StorePlan,
    parse_request,
    split_request,
)

RECORDS: list[Request] = [
    Cmd("torch.add", [ObjRef(1), 2], {}, [3]),
    Cmd("Tensor.add_", [ObjRef(1), 2], {"alpha": 2}, [], grad_enabled=False),
    Store(5, torch.ones(2), ["#a"], "a tensor"),
    Store(5, 7, [], None),
    Get(5, True),
    Delete([1, 2, 3]),
    Search(["#a", "#b"]),
    Info("count"),
    Info("meta", 5),
    Clear(),
    RunPlan(9, [ObjRef(1), 0.5], [10, 11]),
    AddPeer("alice", "ws://127.0.0.1:1"),
    AddPeer("alice", None),
    Ping(),
    StorePlan(9, {"v": 1}),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_records_round_trip_through_the_wire(record: Request) -> None:
    wire = record.to_wire(seq=42)
    assert wire[:2] == [int(record.KIND), 42]
    kind, seq, fields = split_request(decode(encode_bytes(wire)))
    assert (kind, seq) == (record.KIND, 42)
    back = parse_request(kind, fields)
    assert type(back) is type(record) and back.fields()[0:1] == record.fields()[0:1]
    assert encode_bytes(back.to_wire(42)) == encode_bytes(wire)


def test_records_are_the_bytes_coordinators_send_by_hand() -> None:
    # The grad flag travels only when it is off, as pointers send it.
    assert Cmd("torch.add", [1], {}, [2]).to_wire(7) == [int(Kind.CMD), 7, "torch.add", [1], {}, [2]]
    assert Cmd("torch.add", [1], {}, [2], False).fields()[-1] is False
    assert Store(1, 2, [], None).to_wire(3) == [int(Kind.STORE), 3, 1, 2, [], None]
    assert set(REQUESTS) == set(Kind)


def test_records_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Get(1, True).obj_id = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kind", "fields", "says"),
    [
        (Kind.CMD, ["torch.add", [], {}], "4 or 5 fields"),
        (Kind.CMD, [5, [], {}, []], "op must be a string"),
        (Kind.CMD, ["torch.add", "notalist", {}, []], "args must be a list"),
        (Kind.CMD, ["torch.add", [], 5, []], "kwargs must be a dict"),
        (Kind.CMD, ["torch.add", [], {1: 2}, []], "kwargs must be a dict"),
        (Kind.CMD, ["torch.add", [], {}, [True]], "result_ids must be a list of ints"),
        (Kind.CMD, ["torch.add", [], {}, (1,)], "result_ids must be a list of ints"),
        (Kind.CMD, ["torch.add", [], {}, [], 1], "grad_enabled must be a bool"),
        (Kind.STORE, [1], "4 fields"),
        (Kind.STORE, [True, 1, [], None], "obj_id must be an int"),
        (Kind.STORE, [1, 1, "#a", None], "tags must be a list of strings"),
        (Kind.STORE, [1, 1, [3], None], "tags must be a list of strings"),
        (Kind.STORE, [1, 1, [], 5], "description must be a string or None"),
        (Kind.GET, ["x", True], "obj_id must be an int"),
        (Kind.GET, [1, 1], "remove must be a bool"),
        (Kind.DELETE, [5], "ids must be a list of ints"),
        (Kind.DELETE, [[1, "2"]], "ids must be a list of ints"),
        (Kind.SEARCH, ["#a"], "tags must be a list of strings"),
        (Kind.INFO, ["secrets"], "what must be one of"),
        (Kind.INFO, [["count"]], "what must be one of"),
        (Kind.INFO, ["meta"], "'meta'"),
        (Kind.INFO, ["count", 5], "'meta'"),
        (Kind.INFO, ["meta", 1.5], "obj_id must be an int"),
        (Kind.CLEAR, [1], "0 fields"),
        (Kind.PING, [None], "0 fields"),
        (Kind.RUN_PLAN, [1, [], [2], 3], "3 fields"),
        (Kind.RUN_PLAN, [1, {}, [2]], "args must be a list"),
        (Kind.RUN_PLAN, [1, [], 2], "result_ids must be a list of ints"),
        (Kind.ADD_PEER, [5, None], "worker_id must be a string"),
        (Kind.ADD_PEER, ["alice", 5], "address must be a string or None"),
        (Kind.STORE_PLAN, ["p", {}], "plan_id must be an int"),
    ],
)
def test_parse_refuses_malformed_fields_naming_the_kind(kind: Kind, fields: list[Any], says: str) -> None:
    with pytest.raises(DecodeError) as info:
        parse_request(kind, fields)
    assert f"malformed {kind.name} request" in str(info.value) and says in str(info.value)


@pytest.mark.parametrize("msg", [[], "x", [1], [999, 1], [True, 1], [1, True], [1, "1"], [[1], 1]])
def test_split_request_refuses_a_bad_envelope(msg: Any) -> None:
    with pytest.raises(DecodeError, match="malformed"):
        split_request(msg)


def _run(node: Node, *requests: list[Any]) -> tuple[int, list[Any], list[Any]]:
    frame = b"".join(encode_bytes(r) for r in requests)
    watermark, values, errors = decode(b"".join(node.handle(frame)))
    return watermark, values, errors


def test_a_malformed_request_fails_alone_and_the_frame_runs_on() -> None:
    node = Node("bob")
    wm, values, errors = _run(
        node,
        [int(Kind.STORE), 1, 10, torch.tensor([1.0, 2.0]), [], None],
        [int(Kind.GET), 2, "ten", True],  # malformed: the id is a string
        [int(Kind.SEARCH), 3, "#a"],  # malformed: tags are not a list
        [int(Kind.CMD), 4, "torch.add", [ObjRef(10), 1], {}, [11]],
        [int(Kind.GET), 5, 11, False],
    )
    assert wm == 5
    assert [(e[0], e[1]["code"]) for e in errors] == [(2, "DecodeError"), (3, "DecodeError")]
    assert "malformed GET request" in errors[0][1]["message"] and errors[0][1]["worker"] == "bob"
    assert "malformed SEARCH request" in errors[1][1]["message"]
    assert values[0][0] == 5 and values[0][1].tolist() == [2.0, 3.0]


def test_a_malformed_command_still_fails_what_uses_its_results() -> None:
    node = Node("bob")
    _, _, errors = _run(
        node,
        [int(Kind.STORE), 1, 10, torch.ones(2), [], None],
        [int(Kind.CMD), 2, "torch.add", [ObjRef(10), 1], "notadict", [11]],
        [int(Kind.CMD), 3, "torch.mul", [ObjRef(11), 2], {}, [12]],
    )
    assert [e[0] for e in errors] == [2, 3]
    assert errors[0][1]["code"] == "DecodeError" and errors[0][1]["op"] == "torch.add"
    assert errors[0][2] == [11] and isinstance(node.store.get(11), Failure)
    assert errors[1][1]["code"] == "DependencyError" and "malformed CMD" in errors[1][1]["message"]


def test_a_refused_plan_leaves_its_error_under_its_id() -> None:
    node = Node("bob")
    _, _, errors = _run(
        node,
        [int(Kind.STORE_PLAN), 1, 9, {"v": 999}],
        [int(Kind.RUN_PLAN), 2, 9, [], [10]],
    )
    assert [e[0] for e in errors] == [1, 2]
    assert errors[0][1]["obj_id"] == 9 and errors[0][2] == [9]
    assert errors[1][1]["code"] == "DependencyError" and "not a fedws plan" in errors[1][1]["message"]
    assert isinstance(node.store.get(10), Failure)


def test_info_meta_of_a_missing_object_names_it() -> None:
    node = Node("bob")
    _, _, errors = _run(node, [int(Kind.INFO), 1, "meta", 77])
    assert errors[0][1]["code"] == "ObjectNotFoundError" and errors[0][1]["obj_id"] == 77
