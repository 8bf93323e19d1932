"""The WebSocket transport against real node processes on 127.0.0.1: failures a user must
get clear answers to, the async API, concurrency between coordinators, and node-to-node."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import msgpack
import pytest
import torch
from websockets.asyncio.client import connect as raw_connect
from websockets.exceptions import ConnectionClosed

import fedws as sy
from fedws.launch import NodeProcess, start_node
from fedws.protocol import codec
from fedws.protocol.ids import new_id
from fedws.protocol.messages import Kind


@pytest.fixture
def node() -> Iterator[NodeProcess]:
    """A node of this test's own (tests here kill or overload nodes)."""
    n = start_node(id="solo", port=0)
    yield n
    n.stop()


@pytest.fixture
def token_node() -> Iterator[NodeProcess]:
    n = start_node(id="guarded", port=0, extra_args=["--token", "s3cret"])
    yield n
    n.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nothing_listening_names_the_url(hook: sy.TorchHook) -> None:
    url = f"ws://127.0.0.1:{_free_port()}"
    with pytest.raises(sy.FedwsConnectionError, match=url) as info:
        sy.connect(url, hook=hook, connect_timeout=5)
    assert isinstance(info.value, ConnectionError)


def test_token_required_and_checked(hook: sy.TorchHook, token_node: NodeProcess) -> None:
    with pytest.raises(sy.AuthenticationError, match="token"):
        sy.connect(token_node.url, hook=hook)
    with pytest.raises(sy.AuthenticationError):
        sy.connect(token_node.url, token="wrong", hook=hook)
    with sy.connect(token_node.url, token="s3cret", hook=hook) as w:
        assert torch.ones(2).send(w).get().tolist() == [1.0, 1.0]


def test_wrong_id_is_refused(hook: sy.TorchHook, node: NodeProcess) -> None:
    host, port = node.url.removeprefix("ws://").split(":")
    with pytest.raises(sy.FedwsConnectionError, match="'solo', not 'alice'"):
        sy.WebsocketClientWorker(hook, host=host, port=int(port), id="alice")
    w = sy.WebsocketClientWorker(hook, host=host, port=int(port), id="solo")
    assert w.id == "solo" and hook.workers["solo"] is w
    w.close()


def test_node_death_fails_pending_futures_and_reconnect_fails_cleanly(hook: sy.TorchHook) -> None:
    n = start_node(id="doomed", port=0)
    try:
        w = sy.connect(n.url, hook=hook)
        x = torch.randn(600, 600).send(w)
        results = [x.mm(x) for _ in range(30)]  # enough work to still be pending
        n.stop(timeout=5)
        with pytest.raises(sy.ConnectionLostError, match="doomed"):
            results[-1].get(timeout=10)
        with pytest.raises(sy.ConnectionLostError):
            (x + 1).wait(timeout=10)  # the link is known to be gone: no hang
        with pytest.raises(sy.FedwsConnectionError):
            w.reconnect()
    finally:
        n.stop()


def test_link_drop_then_reconnect_finds_surviving_state(hook: sy.TorchHook, node: NodeProcess) -> None:
    w = sy.connect(node.url, hook=hook)
    kept = torch.arange(4).tag("#kept").send(w)
    kept.wait()
    ws = w.link._ws
    assert ws is not None
    w.link.io.loop.call_soon_threadsafe(ws.transport.abort)  # the network drops the link
    with pytest.raises(sy.ConnectionLostError):
        w.ping(timeout=10)
    w.reconnect()
    found = w.search("#kept")
    assert len(found) == 1 and found[0].get().tolist() == [0, 1, 2, 3]
    w.close()


def test_timeouts_per_client_and_per_call(hook: sy.TorchHook, node: NodeProcess) -> None:
    w = sy.connect(node.url, hook=hook, timeout=30)
    x = torch.randn(800, 800).send(w)
    y = x
    for _ in range(40):
        y = y.mm(x)
    with pytest.raises(sy.FedwsTimeoutError):
        y.get(timeout=0.001)
    assert isinstance(y.wait(timeout=60), sy.PointerTensor)  # it still completes
    w.close()


def test_blocking_call_from_io_thread_is_refused(hook: sy.TorchHook, node: NodeProcess) -> None:
    w = sy.connect(node.url, hook=hook)
    x = torch.ones(3).send(w)

    async def misuse() -> object:
        return (x + 1).get()

    with pytest.raises(sy.WrongThreadError, match="IO thread"):
        w.link.io.submit(misuse()).result(10)
    w.close()


async def test_async_api(hook: sy.TorchHook, node: NodeProcess) -> None:
    async with await sy.connect_async(node.url, hook=hook) as w:
        x = torch.tensor([1.0, 2.0]).send(w)
        y = x * 3
        assert (await y) is y
        assert (await y.get_async()).tolist() == [3.0, 6.0]
        bad = x.mm(x)  # 1-D mm: fails on the node
        with pytest.raises(sy.RemoteError, match="RuntimeError"):
            await bad
        with pytest.raises(sy.RemoteError):
            await bad.get_async()
        dependent = bad + 1
        with pytest.raises(sy.DependencyError):
            await dependent.get_async()
        assert len(await w.search_async("nothing-has-this-tag")) == 0


def test_commands_are_batched_into_frames(hook: sy.TorchHook, node: NodeProcess) -> None:
    w = sy.connect(node.url, hook=hook)
    x = torch.zeros(1).send(w)
    frames_before = w.session.frames_taken
    for _ in range(2000):
        x = x + 1
    assert x.get().item() == 2000
    frames = w.session.frames_taken - frames_before
    assert frames < 1000, f"{frames} frames for 2000 commands: no batching"
    w.close()


def test_long_work_does_not_block_other_coordinators(hook: sy.TorchHook, node: NodeProcess) -> None:
    busy = sy.connect(node.url, hook=hook)
    other = sy.connect(node.url, hook=sy.TorchHook(torch))
    x = torch.randn(1000, 1000).send(busy)
    y = x
    for _ in range(60):
        y = y.mm(x) / 1000
    fut = y.future()
    other.ping(timeout=30)  # answered while the busy connection's thread computes
    assert not fut.done(), "the long computation finished before the other ping: make it longer"
    assert y.wait(timeout=120) is y
    busy.close()
    other.close()


async def test_malformed_frames_get_error_replies_and_node_keeps_serving(hook: sy.TorchHook, node: NodeProcess) -> None:
    async with raw_connect(node.url, compression=None) as raw:
        await raw.send(b"\x00\x01garbage")
        watermark, values, errors = codec.decode(await raw.recv())
        assert errors and errors[0][1]["code"] == "DecodeError"
        # a valid blob whose request names an op outside the allowlist
        bad_op = codec.encode_bytes([int(Kind.CMD), 7, "torch.save", [], {}, [1]])
        watermark, values, errors = codec.decode(await raw.send(bad_op) or await raw.recv())
        assert watermark == 7 and errors[0][1]["code"] == "OpNotAllowedError"
        # a tensor whose header does not match its bytes
        good = codec.encode([int(Kind.STORE), 8, 5, torch.ones(4), [], None])
        env = msgpack.unpackb(bytes(good[1]), strict_map_key=False, ext_hook=lambda c, d: msgpack.ExtType(c, d))
        assert env[3].code == codec.EXT_TENSOR
        await raw.send(bytes(good[0]) + bytes(good[1]) + bytes(good[2])[:-4])
        watermark, values, errors = codec.decode(await raw.recv())
        assert errors and "DecodeError" == errors[0][1]["code"]
        await raw.send("text is not a fedws frame")
        with pytest.raises(ConnectionClosed):
            await raw.recv()
        assert raw.close_code == 1003
    w = sy.connect(node.url, hook=hook)
    assert torch.ones(1).send(w).get().item() == 1.0
    w.close()


def test_oversized_frame_closes_that_connection_only(hook: sy.TorchHook) -> None:
    n = start_node(id="small", port=0, extra_args=["--max-frame-mb", "1"])
    try:
        bystander = sy.connect(n.url, hook=hook)
        sender = sy.connect(n.url, hook=sy.TorchHook(torch))
        big = torch.zeros(2**19)  # 2 MiB > 1 MiB cap
        oid = new_id()  # a raw STORE: Worker.store would stream it in chunks under the node's limit
        with pytest.raises(sy.ConnectionLostError, match="1009"):
            sender.submit(Kind.STORE, oid, big, [], None)
            sender.request(Kind.GET, oid, False, timeout=10)
        assert torch.ones(2).send(bystander).get().tolist() == [1.0, 1.0]
        bystander.close()
    finally:
        n.stop()


def test_store_cap_refuses_without_losing_anything(hook: sy.TorchHook) -> None:
    n = start_node(id="capped", port=0, extra_args=["--max-store-mb", "1"])
    try:
        w = sy.connect(n.url, hook=hook)
        small = torch.ones(1000).send(w)
        too_big = torch.zeros(2**19).send(w)
        with pytest.raises(sy.StoreFullError, match="capped"):
            too_big.get()
        assert small.get().sum().item() == 1000.0
        w.close()
    finally:
        n.stop()


def test_node_to_node_move_does_not_pass_through_coordinator(make_worker, transport: str) -> None:
    if transport != "websocket":
        pytest.skip("about the network path")
    bob, alice = make_worker("bob"), make_worker("alice")
    bob.add_worker(alice)
    alice.add_worker(bob)
    payload = torch.randn(2**16)
    x = payload.send(bob)
    x.wait()
    received_before = _bytes_received(alice)
    moved = x.move(alice)
    moved.wait()
    assert _bytes_received(alice) - received_before < 4096  # acks only, not 256 KiB of data
    assert torch.equal(moved.get(), payload)


def _bytes_received(worker: sy.Worker) -> int:
    return worker.session.bytes_received


def test_tls_node_serves_wss(tmp_path, hook: sy.TorchHook) -> None:
    import shutil
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    import subprocess

    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    n = start_node(id="tls", port=0, extra_args=["--certfile", str(cert), "--keyfile", str(key)])
    try:
        assert n.url.startswith("wss://")
        ctx = ssl.create_default_context(cafile=str(cert))
        with sy.connect(n.url, hook=hook, ssl=ctx) as w:
            assert (torch.arange(3).send(w) * 2).get().tolist() == [0, 2, 4]
        with pytest.raises(sy.FedwsConnectionError):  # an untrusted certificate is refused
            sy.connect(n.url, hook=hook, connect_timeout=5)
    finally:
        n.stop()


def test_send_then_move_at_once_never_races(make_worker, transport: str) -> None:
    """alice fetches from bob over her own link, which could overtake our store to bob."""
    bob, alice = make_worker("bob"), make_worker("alice")
    bob.add_worker(alice)
    alice.add_worker(bob)
    for i in range(40):
        moved = torch.tensor([i, i + 1]).send(bob).move(alice)
        assert moved.get().tolist() == [i, i + 1]


def test_connect_alone_is_enough_to_start(node: NodeProcess) -> None:
    """A fresh interpreter: no TorchHook made by hand, connect() makes it."""
    import subprocess
    import sys

    script = (
        "import torch, fedws as sy\n"
        f"with sy.connect({node.url!r}) as w:\n"
        "    print((torch.ones(2).send(w) * 3).get().tolist(), sy.local_worker.id)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[3.0, 3.0] me"
