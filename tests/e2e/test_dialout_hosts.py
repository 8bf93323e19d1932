"""Hosts of many dial-out nodes: ``fedws worker --nodes N --connect URL`` and ``[[node]]``
tables with ``--connect``. Two host processes of five nodes each dial one coordinator
(``sy.serve`` on 127.0.0.1:0) and run a FedAvg round; each node sees only its own data;
tokens are checked per node id; an id already connected is refused; a host's many
connections from one address are not mistaken for an attack, an attacker's still are.

Every node is private (the default).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fedws as sy
from fedws.fl import FedAvg, FedAvgConfig, training_plan_digest
from fedws.launch import NodeProcess, start_node
from fedws.transport.fair_pool import FairPool
from fedws.transport.guard import FailureLimiter, PendingHandshakes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FEATURES, CLASSES = 8, 3
SHARED = "token-of-host-b"
FL = FedAvgConfig(rounds=1, local_epochs=1, batch_size=16, lr=0.1, min_nodes=10, data_tags=("#train",))
A_IDS = [f"a{i}" for i in range(5)]  # [[node]] tables, a token each
B_IDS = [f"b-{i}" for i in range(5)]  # --nodes 5 --id-prefix b- with one token file


def own_token(node_id: str) -> str:
    return f"token-of-{node_id}"


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.ReLU(), nn.Linear(8, CLASSES))


def data_lines(tmp: Path, name: str, seed: int, table: str) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, FEATURES, generator=g), torch.randint(0, CLASSES, (32,), generator=g)
    save_file({"x": x, "y": y}, str(tmp / f"{name}.safetensors"))
    lines = []
    for key, tag in (("x", "#x"), ("y", "#y")):
        lines += [f"[[{table}data]]", f'file = "{name}.safetensors"', f'key = "{key}"',
                  f'tags = ["#train", "{tag}", "#of-{name}"]']
    return lines


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[sy.NodeListener, list[NodeProcess]]]:
    tmp = tmp_path_factory.mktemp("dialhosts")
    digest = training_plan_digest(make_model(), FL, x_like=((FEATURES,), torch.float32), y_like=((), torch.int64))
    lines: list[str] = []
    for i, node_id in enumerate(A_IDS):  # host a: per-node tokens in its [[node]] tables
        lines += ["[[node]]", f'id = "{node_id}"', f'token = "{own_token(node_id)}"']
        lines += data_lines(tmp, node_id, i, "node.")
        lines += ["[node.release]", f'approved_plans = ["{digest}"]']
    host_a = tmp / "host-a.toml"
    host_a.write_text("\n".join(lines) + "\n")
    host_b = tmp / "host-b.toml"  # host b: --nodes 5, the same data file for each, one token
    host_b.write_text("\n".join(['id = "b"', *data_lines(tmp, "b", 99, ""), "[release]",
                                 f'approved_plans = ["{digest}"]']) + "\n")
    (tmp / "b.token").write_text(SHARED + "\n")
    listener = sy.serve("127.0.0.1", 0, token=SHARED, tokens={n: own_token(n) for n in A_IDS},
                        hook=sy.TorchHook(torch, federation=sy.Federation()), timeout=30.0)
    assert listener.url is not None
    started: list[NodeProcess] = []
    try:
        with ThreadPoolExecutor(2) as pool:  # both import torch at once
            futures = [
                pool.submit(start_node, host_a, connect=listener.url, extra_args=["--threads", "1"]),
                pool.submit(start_node, host_b, connect=listener.url, extra_args=[
                    "--threads", "1", "--nodes", "5", "--id-prefix", "b-", "--token-file", str(tmp / "b.token")]),
            ]
        started += [f.result() for f in futures if f.exception() is None]
        failed = [f.exception() for f in futures if f.exception() is not None]
        if failed:
            raise failed[0]  # type: ignore[misc]
        yield listener, started
    finally:
        for p in started:
            p.stop()
        listener.close()


def test_two_hosts_of_five_dial_out_nodes_run_a_fedavg_round(hosts: tuple[sy.NodeListener, list[NodeProcess]]) -> None:
    listener, procs = hosts
    workers = listener.wait_for_nodes(10, timeout=30)
    assert [w.id for w in workers] == sorted(A_IDS + B_IDS)
    assert all(w.address == f"dialout://{w.id}" for w in workers)
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    rounds = FedAvg(model, workers, FL, progress=False).fit()
    assert sorted(rounds[0].nodes) == sorted(A_IDS + B_IDS)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    for p in procs:
        assert p.process.poll() is None  # both hosts still up


def test_each_node_sees_only_its_own_data(hosts: tuple[sy.NodeListener, list[NodeProcess]]) -> None:
    listener, _ = hosts
    by_id = {w.id: w for w in listener.wait_for_nodes(10, timeout=30)}
    for node_id in A_IDS:  # neighbours in one process: only their own tag answers
        tags = {t for r in by_id[node_id].search("#train") for t in r.tags if t.startswith("#of-")}
        assert tags == {f"#of-{node_id}"}
    theirs = torch.tensor([7.0, 8.0]).tag("#only-a1").send(by_id["a1"])
    assert by_id["a0"].search("#only-a1") == [] and by_id["b-0"].search("#only-a1") == []
    assert theirs.get().tolist() == [7.0, 8.0]
    b_ids = {t for w in (by_id[i] for i in B_IDS) for r in w.search("#x") for t in r.tags if t.startswith("#of-")}
    assert b_ids == {"#of-b"}  # --nodes N: each node its own copy of the host's data


def _dial(url: str, node_id: str, token: str) -> BaseException | None:
    """One in-process node dialing ``url`` once; the error it ends with (None: accepted)."""
    from fedws.node_config import NodeConfig
    from fedws.node_process import NodeServer

    server = NodeServer(NodeConfig(id=node_id, token=token))

    async def once() -> BaseException | None:
        dialer = server.dial_out(url, token)
        try:
            ws, _, _ = await dialer.connect_once()
        except Exception as exc:
            return exc
        await ws.close()
        return None

    return asyncio.run(once())


def test_wrong_tokens_and_taken_ids_are_refused(hosts: tuple[sy.NodeListener, list[NodeProcess]]) -> None:
    listener, _ = hosts
    url = listener.url
    assert url is not None
    listener.wait_for_nodes(10, timeout=30)
    assert isinstance(_dial(url, "a0", SHARED), sy.AuthenticationError)  # a0 has its own token
    assert isinstance(_dial(url, "mallory", "guess"), sy.AuthenticationError)
    taken = _dial(url, "b-3", SHARED)  # right token, but b-3 is connected: refused, not evicted
    assert isinstance(taken, sy.FedwsConnectionError) and "connected already" in str(taken)
    assert listener.nodes["b-3"].connected and listener.nodes["b-3"].ping() is not None
    assert _dial(url, "b-new", SHARED) is None  # a fresh id with the shared token is accepted


def test_guards_tell_a_host_from_an_attacker() -> None:
    now = [0.0]
    limiter = FailureLimiter(max_failures=10, window=10.0, cooldown=30.0, clock=lambda: now[0])
    assert all(limiter.blocked_for("127.0.0.1") == 0 for _ in range(1000))  # right tokens never count
    for _ in range(9):
        assert not limiter.failed("127.0.0.1").blocked
    assert limiter.failed("127.0.0.1").blocked and limiter.blocked_for("127.0.0.1") > 0  # a guesser is stopped
    pending = PendingHandshakes(64)
    in_flight = 0
    for _ in range(4 * 250):  # four hosts x 250 nodes, each host with at most 16 handshakes in flight
        assert pending.begin("10.0.0.1")
        in_flight += 1
        if in_flight == 4 * 16:
            for _ in range(in_flight):
                pending.end("10.0.0.1")
            in_flight = 0
    assert pending.refused == 0
    assert sum(pending.begin("10.0.0.2") for _ in range(500)) == 64  # a flood is capped


def test_the_fair_pool_keeps_each_nodes_order_and_lets_others_through() -> None:
    pool = FairPool(2)
    gate = threading.Event()
    done: list[str] = []
    lock = threading.Lock()

    def job(tag: str) -> str:
        if tag == "busy-0":
            gate.wait(5)
        with lock:
            done.append(tag)
        return tag

    busy = [pool.submit("busy", job, f"busy-{i}") for i in range(50)]
    quiet = [pool.submit(f"quiet{i}", job, f"quiet{i}") for i in range(20)]
    assert [f.result(5) for f in quiet] == [f"quiet{i}" for i in range(20)]  # while busy-0 still blocks
    gate.set()
    assert [f.result(5) for f in busy] == [f"busy-{i}" for i in range(50)]
    assert [t for t in done if t.startswith("busy")] == [f"busy-{i}" for i in range(50)]
    assert pool.threads <= 2
    pool.shutdown()
    deadline = time.monotonic() + 5
    while pool.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.pending() == 0
