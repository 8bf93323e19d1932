"""Search as PySyft 0.2 had it, on both transports, and what a node bounds and hides.

A query is terms; an object matches when every term is one of its tags, its id, or a piece
of its description. ``search("#a", "#b")`` and ``search(["#a", "#b"])`` are one query.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import fedws as sy
from fedws.client.worker import search_terms
from fedws.node import Node
from fedws.node.policy import Policy
from fedws.protocol.codec import decode, encode_bytes
from fedws.protocol.messages import (
    MAX_DESCRIPTION_CHARS,
    MAX_SEARCH_TERM_CHARS,
    MAX_SEARCH_TERMS,
    MAX_TAGS,
    Kind,
)


@pytest.fixture
def bob(make_worker):
    bob = make_worker("bob")
    kept = [
        torch.tensor([1, 2]).tag("#fun", "#boston", "#housing").describe("The input datapoints to the boston housing"),
        torch.tensor([3, 4]).tag("#fun", "#boston", "#housing").describe("The targets of the boston housing"),
        torch.tensor([5, 6]).tag("#fun", "#mnist").describe("The images in the MNIST training dataset."),
    ]
    bob.kept = [t.send(bob) for t in kept]
    return bob


def test_list_and_varargs_are_the_same_query_and_all_terms_must_match(bob) -> None:
    as_list = bob.search(["#boston", "#housing"])
    as_args = bob.search("#boston", "#housing")
    assert len(as_list) == len(as_args) == 2
    assert {p.id_at_location for p in as_list} == {p.id_at_location for p in as_args}
    assert len(bob.search("#fun")) == 3
    assert bob.search("#boston", "#mnist") == []  # AND, not OR
    assert bob.search(["#fun"], "#mnist")[0].tags == {"#fun", "#mnist"}


def test_results_carry_tags_and_description(bob) -> None:
    (found,) = bob.search("#mnist")
    assert found.tags == {"#fun", "#mnist"}
    assert found.description == "The images in the MNIST training dataset."
    assert isinstance(found, sy.PointerTensor) and found.location is bob


def test_descriptions_and_ids_are_searchable(bob) -> None:
    (targets,) = bob.search("targets")  # a word of the description
    assert targets.description.startswith("The targets")
    assert len(bob.search("boston housing")) == 2  # any piece of the text
    assert len(bob.search("boston", "#mnist")) == 0
    obj_id = bob.kept[2].id_at_location
    (by_id,) = bob.search(obj_id)  # an id, as int or text
    assert by_id.id_at_location == obj_id and bob.search(str(obj_id))[0].id_at_location == obj_id


def test_an_empty_query_finds_everything(bob) -> None:
    assert len(bob.search()) == 3


async def test_search_async(bob) -> None:
    found = await bob.search_async(["#boston"], "#housing")
    assert len(found) == 2 and all(p.tags >= {"#boston", "#housing"} for p in found)


def test_request_search_names_the_location(bob, hook) -> None:
    me = hook.local_worker
    assert len(me.request_search(["#boston", "#housing"], location=bob)) == 2


def test_oversized_queries_are_refused_here_and_by_the_node(bob) -> None:
    too_many = [f"#t{i}" for i in range(MAX_SEARCH_TERMS + 1)]
    too_long = "x" * (MAX_SEARCH_TERM_CHARS + 1)
    with pytest.raises(ValueError, match="at most 32 terms"):
        bob.search(*too_many)
    with pytest.raises(ValueError, match="at most 256 characters"):
        bob.search(too_long)
    # A coordinator that skips the client check meets the node's.
    with pytest.raises(sy.RemoteError, match="at most 32") as err:
        bob.request(Kind.SEARCH, too_many)
    assert err.value.remote_type == "DecodeError"
    with pytest.raises(sy.RemoteError, match="longer than 256"):
        bob.request(Kind.SEARCH, [too_long])
    assert len(bob.search(*["#fun"] * 100)) == 3  # duplicates collapse before they travel


def test_node_refuses_oversized_tags_and_descriptions(bob) -> None:
    big = torch.ones(1).describe("d" * (MAX_DESCRIPTION_CHARS + 1)).send(bob)
    with pytest.raises(sy.RemoteError, match="description of 16385 characters"):
        big.get()
    many = torch.ones(1).tag(*[f"#{i}" for i in range(MAX_TAGS + 1)]).send(bob)
    with pytest.raises(sy.RemoteError, match="257 tags"):
        many.get()
    # Neither was stored: what the node holds under their ids is the failure of the store.
    assert len(bob.search("#fun")) == 3 and bob.search("#0") == []


def test_search_terms_accept_pysyft_query_forms() -> None:
    assert search_terms(("#a", "#b")) == ["#a", "#b"]
    assert search_terms((["#a", "#b"],)) == ["#a", "#b"]
    assert search_terms((("#a",), 7, "#a")) == ["#a", "7"]
    for bad in (None, 1.5, True, b"#a", [object()]):
        with pytest.raises(TypeError):
            search_terms((bad,))


# -- a private node: a caller searches only what it may see ---------------------------------


class _Caller:
    def __init__(self, node: Node, principal: str, session: str) -> None:
        self.node, self.caller, self.seq = node, node.caller(principal, session, "127.0.0.1:1"), 0

    def send(self, kind: Kind, *fields: Any) -> tuple[list[Any], list[Any]]:
        self.seq += 1
        frame = encode_bytes([int(kind), self.seq, *fields])
        _, values, errors = decode(b"".join(self.node.handle(frame, self.caller)))
        return [v for _, v in values], errors

    def search(self, *terms: str) -> list[int]:
        values, errors = self.send(Kind.SEARCH, list(terms))
        assert errors == [], errors
        return [d[0] for d in values[0]]


def test_private_node_searches_only_what_the_caller_may_see() -> None:
    node = Node("alice", policy=Policy("private"))
    node.serve(1000, torch.ones(2), ["#train"], "patient features, ward 7")
    victim, attacker = _Caller(node, "lab-a", "a" * 32), _Caller(node, "lab-b", "b" * 32)
    _, errors = victim.send(Kind.STORE, 1, torch.ones(1), ["#secret", "#train"], "lab-a's candidate drug X-17")
    assert errors == []
    assert victim.search("#secret") == [1] and victim.search("X-17") == [1] and victim.search("1") == [1]
    # Another session finds nothing of it: not by tag, description text or id.
    assert attacker.search("#secret") == []
    assert attacker.search("X-17") == []
    assert attacker.search("1") == []
    # Data the node serves is found by everyone, by tag and by description.
    assert attacker.search("#train") == [1000] and attacker.search("ward 7") == [1000]
    assert sorted(victim.search("#train")) == [1, 1000]


def test_open_node_finds_by_description_too() -> None:
    node = Node("alice")
    node.serve(5, torch.ones(1), ["#x"], "served to the tutorials")
    a = _Caller(node, "lab-a", "a" * 32)
    assert a.search("tutorials", "#x") == [5] and a.search("tutorials", "#y") == []


def test_a_malformed_query_is_an_error_reply_not_a_crash() -> None:
    a = _Caller(Node("alice"), "lab-a", "a" * 32)
    for bad in ([1, 2], "#a", ["x" * 300], [f"#{i}" for i in range(40)]):
        values, errors = a.send(Kind.SEARCH, bad)
        assert values == [] and errors[0][1]["type"] == "DecodeError"
    assert a.send(Kind.PING)[0] == ["pong"]  # the node still answers




def test_private_node_process_searches_only_what_each_coordinator_may_see(tmp_path) -> None:
    """A real ``fedws worker`` in its default (private) mode, two coordinators on one token."""
    from safetensors.torch import save_file

    from fedws.launch import start_node

    save_file({"x": torch.ones(4, 2)}, str(tmp_path / "alice.safetensors"))
    config = tmp_path / "alice.toml"
    config.write_text('id = "alice"\nport = 0\n[[data]]\nfile = "alice.safetensors"\nkey = "x"\n'
                      'tags = ["#train", "#x"]\ndescription = "patient features, ward 7"\n')
    node = start_node(config, extra_args=["--threads", "1", "--token", "s3cret"])
    try:
        def connect() -> sy.Worker:
            return sy.connect(node.url, "s3cret", hook=sy.TorchHook(torch, federation=sy.Federation()), timeout=30.0)

        with connect() as victim, connect() as attacker:
            mine = torch.tensor([1.0]).tag("#secret", "#train").describe("candidate drug X-17").send(victim)
            assert [p.id_at_location for p in victim.search("#secret")] == [mine.id_at_location]
            assert len(victim.search("#train")) == 2
            for query in (["#secret"], ["X-17"], [mine.id_at_location], ["candidate", "#train"]):
                assert attacker.search(*query) == [], query
            (served,) = attacker.search("#train")
            assert served.tags == {"#train", "#x"} and served.description == "patient features, ward 7"
            assert attacker.search("ward 7")[0].id_at_location == served.id_at_location
            grid = sy.PrivateGridNetwork(attacker)
            assert [p.id_at_location for p in grid.search("#train")["alice"]] == [served.id_at_location]
    finally:
        node.stop()
