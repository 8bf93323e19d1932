"""Node to node between dial-out nodes, through the coordinator's relay.

Two real ``fedws worker --connect`` processes (private by default) list each other under
``[[peers]]`` (``url = "dialout://ID"``) with the token the other issued them. The
coordinator forwards their link without decoding it: no tensor of theirs is ever decoded
here (spied on), and it cannot stand in for either node without their token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import fedws as sy
from fedws.client.listener import DialedWorker
from fedws.launch import NodeProcess, start_node
from fedws.protocol.messages import Kind
from fedws.transport.accept import AcceptedLink
from fedws.transport.io_thread import wait

DIAL = "relay-dial-token"
PEER = {("alice", "bob"): "alice-to-bob-token", ("bob", "alice"): "bob-to-alice-token"}
MARK = 1234.5678  # a value no coordinator request carries

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(tmp: Path, me: str, other: str, *, carol: bool = False) -> Path:
    issued = hashlib.sha256(PEER[(other, me)].encode()).hexdigest()  # the token I issued to the other
    lines = [f'id = "{me}"', "[[tokens]]", f'principal = "{other}"', f'sha256 = "{issued}"',
             "[[peers]]", f'id = "{other}"', f'url = "dialout://{other}"', f'token = "{PEER[(me, other)]}"']
    if carol:
        lines += ["[[peers]]", 'id = "carol"', 'url = "dialout://carol"', 'token = "never-used"']
    path = tmp / f"{me}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[sy.NodeListener, DialedWorker, DialedWorker]]:
    tmp = tmp_path_factory.mktemp("relay")
    (tmp / "dial").write_text(DIAL + "\n")
    listener = sy.serve("127.0.0.1", 0, token=DIAL, hook=sy.TorchHook(torch, federation=sy.Federation()), timeout=30.0)
    assert listener.url is not None
    nodes: list[NodeProcess] = []
    try:
        for me, other in (("alice", "bob"), ("bob", "alice")):
            nodes.append(start_node(config(tmp, me, other, carol=me == "alice"), connect=listener.url,
                                    extra_args=["--threads", "1", "--token-file", str(tmp / "dial")]))
        alice, bob = listener.wait_for_nodes(2, timeout=30)
        alice.add_worker(bob)
        bob.add_worker(alice)
        yield listener, alice, bob
    finally:
        for n in nodes:
            n.stop()
        listener.close()


class Spy:
    """Records every reply the coordinator decodes from a node, then hands it on."""

    def __init__(self, endpoint: Any, seen: list[bytes]) -> None:
        self.endpoint, self.seen = endpoint, seen

    def take_frame(self) -> Any:
        return self.endpoint.take_frame()

    def receive(self, reply: Any) -> None:
        self.seen.append(bytes(reply))
        self.endpoint.receive(reply)

    def link_lost(self, error: Any) -> None:
        self.endpoint.link_lost(error)


def spy(worker: DialedWorker, seen: list[bytes]) -> None:
    worker.link.endpoint = Spy(worker.link.endpoint, seen)


def test_move_and_remote_get_go_node_to_node_and_the_coordinator_never_decodes_the_tensor(
    pair: tuple[sy.NodeListener, DialedWorker, DialedWorker],
) -> None:
    listener, alice, bob = pair
    value = torch.full((4096,), MARK)
    mark = value[:16].numpy().tobytes()
    x = value.send(alice)
    alice.ping()
    seen: list[bytes] = []
    spy(alice, seen)
    spy(bob, seen)
    before = listener.relay.forwarded_bytes
    moved = x.move(bob)
    assert moved.location is bob
    doubled = moved * 2  # runs on bob, on the data alice sent it
    bob.ping()
    assert listener.relay.forwarded_bytes - before >= value.numel() * 4  # it went through the relay
    assert not any(mark in reply for reply in seen)  # ...and was never decoded here
    assert seen  # the spy saw the replies
    for w in (alice, bob):
        w.link.endpoint = w.link.endpoint.endpoint  # type: ignore[attr-defined]
    assert torch.equal(doubled.get(), value * 2)

    y = torch.full((8,), 3.0).send(bob).send(alice)  # a pointer on alice to data on bob
    assert torch.equal(y.remote_get().get(), torch.full((8,), 3.0))


def test_a_peer_without_the_token_is_refused(pair: tuple[sy.NodeListener, DialedWorker, DialedWorker]) -> None:
    listener, alice, bob = pair
    # The coordinator (holding only the dial token) cannot open bob's link as alice: run the
    # relayed handshake with the wrong token from this process, through the real router.
    from fedws.transport.relay import ChannelClosed, RelayMux, _handshake

    got: list[Any] = []

    async def attempt() -> None:
        mux = RelayMux("alice", open_session=lambda *a: (None, None), close_session=None,  # type: ignore[arg-type,return-value]
                       listed_secret=lambda p: None, digests=[])

        class Loopback:
            async def send(self, data: Any) -> None:
                await listener.relay.handle("alice", data if isinstance(data, bytes) else b"".join(data))

        mux.attach(Loopback(), None)  # type: ignore[arg-type]
        mux._next = 10_001  # channel ids the real alice does not use
        original = listener.relay.send_to

        async def send_to(node: str, data: Any) -> bool:
            if node == "alice":  # what the router sends "alice" comes to our mux
                await mux.receive(data if isinstance(data, bytes) else b"".join(data))
                return True
            return await original(node, data)

        listener.relay.send_to = send_to  # type: ignore[method-assign]
        try:
            chan = await mux.open("bob")
            await _handshake(chan, "alice", DIAL, None, "0" * 32)
        except ChannelClosed as exc:
            got.append(exc)
        finally:
            listener.relay.send_to = original  # type: ignore[method-assign]

    listener.io.run(attempt(), 30.0, "relay attempt")
    assert got and "could not prove a token" in str(got[0])
    assert torch.equal(torch.ones(2).send(bob).get(), torch.ones(2))  # bob carries on


def test_a_peer_that_is_not_connected_fails_that_request_alone(
    pair: tuple[sy.NodeListener, DialedWorker, DialedWorker],
) -> None:
    _listener, alice, bob = pair
    seq, _ = alice.submit(Kind.ADD_PEER, "carol", "dialout://carol")  # listed by alice, never dialed in
    with pytest.raises(sy.RemoteError, match="'carol' is not connected"):
        wait(alice.ack_future(seq), 30.0, "add carol")
    ghost = DialedWorker(sy.Federation(), "mallory", link=lambda ep: AcceptedLink(ep, "mallory"))
    with pytest.raises(sy.OpNotAllowedError):  # not listed by alice: refused before any relaying
        alice.add_worker(ghost)
    assert torch.equal(torch.ones(3).send(alice).move(bob).get(), torch.ones(3))
