"""Shared fixtures. ``make_worker`` is parametrized over transports: every test that uses
it runs against in-process VirtualWorkers and against real worker nodes (subprocesses on
127.0.0.1, started once per test session, emptied before each test)."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import pytest
import torch

import fedws as sy
from fedws.launch import NodeProcess, start_node

TRANSPORTS = ["virtual", "websocket"]


class NodePool:
    """Worker-node processes by id, started on first use and stopped at session end."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeProcess] = {}

    def url(self, worker_id: str) -> str:
        node = self.nodes.get(worker_id)
        if node is None or (node.process is not None and node.process.poll() is not None):
            # --insecure-dev: the pool's nodes link to each other with add_worker, like the
            # tutorials; tests/e2e/test_network_attacks.py covers listed peers.
            node = self.nodes[worker_id] = start_node(
                id=worker_id, port=0, extra_args=["--threads", "1", "--insecure-dev"]
            )
        return node.url

    def stop_all(self) -> None:
        # Signal every node first, then wait: they shut down side by side, not one by one.
        for node in self.nodes.values():
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes.values():
            node.stop()
        self.nodes.clear()


@pytest.fixture(scope="session", autouse=True)
def _frozen_gc() -> Iterator[None]:
    """Move torch's import-time objects out of the collector's way: gc.collect() (run in
    teardowns and store counts so dropped pointers are freed) then takes ms, not 0.2 s."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the test: tiny models' OpenMP threads only contend with each
    other (and with the node processes) on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def node_pool() -> Iterator[NodePool]:
    pool = NodePool()
    yield pool
    pool.stop_all()


@pytest.fixture
def hook() -> sy.TorchHook:
    """A hook over a federation of its own, so no test sees another test's workers."""
    return sy.TorchHook(torch, federation=sy.Federation())


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_worker(
    hook: sy.TorchHook, transport: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., sy.Worker]]:
    """``make_worker("bob")`` -> an empty worker of the current transport, in ``hook``."""
    opened: list[sy.WebsocketClientWorker] = []

    def make(worker_id: str, **kwargs: object) -> sy.Worker:
        if transport == "virtual":
            return sy.VirtualWorker(hook, id=worker_id, **kwargs)
        pool: NodePool = request.getfixturevalue("node_pool")
        worker = sy.connect(pool.url(worker_id), hook=hook, timeout=30.0)
        opened.append(worker)
        worker.clear_objects_remote()
        return worker

    yield make
    gc.collect()
    for w in opened:
        w.close()


def stored_count(worker: sy.Worker) -> int:
    """How many objects a worker holds, on any transport (pending deletes applied)."""
    gc.collect()
    return worker.objects_count_remote()
