"""The Session with no I/O: bytes out of ``take_frame``, replies fed in as bytes built with
the codec, futures resolved or failed. No loop, no socket, no node."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedws.client.session import COPY_LIMIT, Session
from fedws.exceptions import ConnectionLostError, PointerError, ProtocolError, RemoteError
from fedws.protocol import codec
from fedws.protocol.codec import PointerRef
from fedws.protocol.errors import error_to_wire
from fedws.protocol.messages import FRAME_ERROR_SEQ, Kind


def requests_of(frame: list[bytes | memoryview]) -> list[list[Any]]:
    return [codec.decode(blob) for blob in codec.iter_blobs(b"".join(frame))]


def reply(watermark: int, values: list[Any] = (), errors: list[Any] = ()) -> bytes:  # type: ignore[assignment]
    return codec.encode_bytes([watermark, list(values), list(errors)])


def wire_error(message: str = "boom") -> dict[str, Any]:
    return error_to_wire(ValueError(message), worker="bob")


def test_requests_queued_together_leave_as_one_frame_in_order() -> None:
    s = Session("bob")
    assert s.take_frame() is None
    s1, fut1, borrowed = s.submit(Kind.STORE, 5, torch.ones(2), [], None)
    s2, fut2, _ = s.submit(Kind.GET, 5, False, want_value=True)
    assert (s1, s2) == (1, 2) and fut1 is None and fut2 is not None and not borrowed
    frame = s.take_frame()
    assert frame is not None and s.take_frame() is None
    msgs = requests_of(frame)
    assert [m[:2] for m in msgs] == [[Kind.STORE, 1], [Kind.GET, 2]]
    assert torch.equal(msgs[0][3], torch.ones(2))
    assert (s.frames_taken, s.messages_sent, s.pending, s.last_seq) == (1, 2, 2, 2)


def test_a_large_tensor_is_borrowed_not_copied() -> None:
    s = Session("bob")
    big = torch.zeros(COPY_LIMIT // 4 + 1)
    _, _, borrowed = s.submit(Kind.STORE, 1, big, [], None)
    assert borrowed
    frame = s.take_frame()
    assert frame is not None and any(isinstance(c, memoryview) for c in frame)


def test_values_resolve_their_futures_and_the_watermark_acks_the_rest() -> None:
    s = Session("bob")
    cmd, _, _ = s.submit(Kind.CMD, "torch.add", [], {}, [9])
    get, fut, _ = s.submit(Kind.GET, 9, False, want_value=True)
    assert fut is not None
    ack = s.ack_future(cmd)
    s.take_frame()
    assert not ack.done() and not fut.done()
    s.receive(reply(get, [[get, torch.tensor([3.0])]]), None)
    assert ack.result(0) is None and fut.result(0).tolist() == [3.0]
    assert s.acked == get and s.pending == 0
    assert s.ack_future(cmd).result(0) is None  # already acknowledged: done at once


def test_errors_fail_their_request_and_are_remembered() -> None:
    s = Session("bob")
    bad, _, _ = s.submit(Kind.CMD, "torch.mm", [], {}, [1])
    ok, _, _ = s.submit(Kind.PING)
    waiting_bad, waiting_ok = s.ack_future(bad), s.ack_future(ok)
    s.take_frame()
    s.receive(reply(ok, errors=[[bad, wire_error(), [1]]]), None)
    with pytest.raises(RemoteError, match="boom"):
        waiting_bad.result(0)
    assert waiting_ok.result(0) is None
    err = s.error_of(bad)
    assert isinstance(err, RemoteError) and err is not s.error_of(bad)  # a fresh one each time
    assert s.error_of(ok) is None
    with pytest.raises(RemoteError):
        s.ack_future(bad).result(0)


def test_a_request_answered_by_no_value_fails_clearly() -> None:
    s = Session("bob")
    seq, fut, _ = s.submit(Kind.GET, 1, False, want_value=True)
    s.take_frame()
    s.receive(reply(seq), None)
    assert fut is not None
    with pytest.raises(ProtocolError, match="without answering"):
        fut.result(0)


def test_a_frame_error_fails_whatever_waits() -> None:
    s = Session("bob")
    _, fut, _ = s.submit(Kind.SEARCH, [], want_value=True)
    s.take_frame()
    s.receive(reply(0, errors=[[FRAME_ERROR_SEQ, wire_error("garbled"), []]]), None)
    assert fut is not None
    with pytest.raises(RemoteError, match="garbled"):
        fut.result(0)


def test_deletes_share_a_message_and_precede_what_observes_the_store() -> None:
    s = Session("bob")
    s.queue_delete(11)
    s.queue_delete(12)
    s.submit(Kind.CMD, "torch.add", [], {}, [3])  # may overtake the deletes
    s.submit(Kind.INFO, "count", want_value=True)  # must see them
    frame = s.take_frame()
    assert frame is not None
    kinds = [(m[0], m[2] if m[0] == Kind.DELETE else None) for m in requests_of(frame)]
    assert kinds == [(Kind.CMD, None), (Kind.DELETE, [11, 12]), (Kind.INFO, None)]
    s.queue_delete(13)
    assert s.has_outgoing()
    frame = s.take_frame()
    assert frame is not None and requests_of(frame)[0][0] == Kind.DELETE


def test_fail_all_fails_every_pending_call_at_once_and_refuses_new_ones() -> None:
    s = Session("bob")
    seqs = [s.submit(Kind.PING)[0] for _ in range(3)]
    _, value, _ = s.submit(Kind.INFO, "count", want_value=True)
    acks = [s.ack_future(q) for q in seqs]
    s.take_frame()
    s.fail_all(ConnectionLostError("gone"))
    assert value is not None
    for fut in [*acks, value]:
        with pytest.raises(ConnectionLostError, match="gone"):
            fut.result(0)
    with pytest.raises(ConnectionLostError):
        s.submit(Kind.PING)
    with pytest.raises(ConnectionLostError):
        s.ack_future(seqs[0] + 100).result(0)
    s.reset()  # after a reconnect
    seq, fut, _ = s.submit(Kind.PING, want_value=True)
    s.take_frame()
    s.receive(reply(seq, [[seq, "pong"]]), None)
    assert fut is not None and fut.result(0) == "pong"


def _ref(location: str) -> PointerRef:
    return PointerRef(location, None, 7, 8, (2,), "float32", False)


def test_pointers_in_replies_go_through_the_factory_one_value_at_a_time() -> None:
    s = Session("alice")
    g1, f1, _ = s.submit(Kind.GET, 1, False, want_value=True)
    g2, f2, _ = s.submit(Kind.GET, 2, False, want_value=True)
    ack = s.ack_future(g2)
    s.take_frame()

    def factory(ref: PointerRef) -> Any:
        if ref.location == "bob":
            raise PointerError("worker 'me' does not know worker 'bob'")
        return ("live", ref.location)

    s.receive(reply(g2, [[g1, [_ref("bob")]], [g2, {"p": _ref("carol")}]]), factory)
    assert f1 is not None and f2 is not None
    with pytest.raises(PointerError, match="does not know worker 'bob'"):
        f1.result(0)
    assert f2.result(0) == {"p": ("live", "carol")}
    assert ack.result(0) is None  # the request ran on the node; only its value was unusable


def test_an_unreadable_reply_fails_the_requests_of_its_frame_only() -> None:
    s = Session("bob")
    a, fa, _ = s.submit(Kind.GET, 1, False, want_value=True)
    b = s.submit(Kind.PING)[0]
    ack_b = s.ack_future(b)
    s.take_frame()  # frame 1: a, b
    c, fc, _ = s.submit(Kind.GET, 2, False, want_value=True)
    s.take_frame()  # frame 2: c
    s.receive(b"\x00\x01 not a reply", None)  # answers frame 1
    assert fa is not None and fc is not None
    for fut in (fa, ack_b):
        with pytest.raises(ProtocolError, match=f"requests {a}..{b}"):
            fut.result(0)
    assert not fc.done()
    s.receive(reply(c, [[c, 42]]), None)  # frame 2's reply still works
    assert fc.result(0) == 42
    seq, fut, _ = s.submit(Kind.PING, want_value=True)  # and the session goes on
    s.take_frame()
    s.receive(reply(seq, [[seq, "pong"]]), None)
    assert fut is not None and fut.result(0) == "pong"


def test_an_unsolicited_unreadable_reply_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="malformed reply"):
        Session("bob").receive(b"junk", None)


def test_requests_a_lost_link_took_never_report_success_even_asked_later() -> None:
    """kill -9 of a node used to make later ``wait()`` succeed for commands never run."""
    s = Session("bob")
    done = s.submit(Kind.PING)[0]
    s.take_frame()
    s.receive(reply(done), None)
    lost = [s.submit(Kind.PING)[0] for _ in range(3)]
    s.take_frame()
    s.fail_all(ConnectionLostError("gone"))
    assert s.ack_future(done).result(0) is None  # acknowledged before the loss: fine
    for seq in lost:  # asked after the loss
        with pytest.raises(ConnectionLostError, match="gone"):
            s.ack_future(seq).result(0)
    s.reset()  # a reconnect: seqs go on, the lost ones stay lost
    seq, fut, _ = s.submit(Kind.PING, want_value=True)
    assert seq > lost[-1]
    s.take_frame()
    s.receive(reply(seq, [[seq, "pong"]]), None)
    assert fut is not None and fut.result(0) == "pong"
    assert s.ack_future(seq).result(0) is None
    for q in lost:
        with pytest.raises(ConnectionLostError, match="gone"):
            s.ack_future(q).result(0)
