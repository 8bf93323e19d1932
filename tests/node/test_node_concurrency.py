"""Hammer one node from several threads and several connections at once.

A WebSocket node runs one handler thread per connection and answers bounded requests
(search, info, get, delete, ping) on its event-loop thread, all against one ``Node`` and
one ``ObjectStore``. These tests prove the store's concurrency contract holds: nothing
fails that a single caller would not see fail, and the byte count does not drift.
"""

from __future__ import annotations

import itertools
import os
import random
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import fedws as sy
from fedws.launch import start_node
from fedws.node import Failure, Node
from fedws.protocol.codec import ObjRef, decode, encode_bytes
from fedws.protocol.ids import new_id
from fedws.protocol.messages import Kind

# Errors a raced request may legitimately get: its object was deleted or cleared by
# another thread, it used the result of such a request, or the cap was reached.
EXPECTED = {"ObjectNotFoundError", "DependencyError", "StoreFullError"}
ROUNDS = 1500
IDS = list(range(1, 65))  # a small id space, so threads collide on purpose
PREFILL = 2000  # objects on the node before the coordinators start
LISTS = 30


@pytest.fixture(autouse=True)
def _switch_often() -> Iterator[None]:
    """Let the interpreter switch threads every few microseconds, so races show up at once."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def _storage_bytes(obj: Any) -> int:
    return obj.untyped_storage().nbytes() if isinstance(obj, torch.Tensor) else 0


class Caller:
    """One thread's view of the node: its own seqs, the replies it got, what went wrong."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.seq = itertools.count(1)
        self.unexpected: list[str] = []
        self.rng = random.Random(len(self.unexpected))

    def send(self, kind: Kind, *fields: Any) -> list[Any]:
        seq = next(self.seq)
        try:
            _, values, errors = decode(b"".join(self.node.handle(encode_bytes([int(kind), seq, *fields]))))
        except Exception as exc:  # the node itself must never raise
            self.unexpected.append(f"{kind.name}: handle raised {exc!r}")
            return []
        for err_seq, err, _ids in errors:
            if err["code"] not in EXPECTED or err_seq != seq:
                self.unexpected.append(f"{kind.name}: {err['code']} {err['type']}: {err['message']}")
        return values


def _hammer(node: Node, jobs: list[Callable[[Caller], None]]) -> list[str]:
    start = threading.Barrier(len(jobs))
    callers = [Caller(node) for _ in jobs]
    for i, c in enumerate(callers):
        c.rng.seed(i)

    def run(job: Callable[[Caller], None], caller: Caller) -> None:
        start.wait()
        try:
            job(caller)
        except Exception as exc:
            caller.unexpected.append(f"thread raised {exc!r}")

    threads = [threading.Thread(target=run, args=(j, c)) for j, c in zip(jobs, callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return [u for c in callers for u in c.unexpected]


def test_one_node_many_threads_no_unexpected_errors_and_no_byte_drift() -> None:
    node = Node("hammer", max_store_bytes=16 * 1024)

    def storer(c: Caller) -> None:
        for i in range(ROUNDS):
            t = torch.ones(c.rng.choice([4, 16, 64]))
            c.send(Kind.STORE, c.rng.choice(IDS), t, ["#h", f"#k{i % 3}"], f"store {i}")

    def searcher(c: Caller) -> None:
        for i in range(ROUNDS):
            c.send(Kind.SEARCH, ["#h"] if i % 2 else ["#h", "#k1"])

    def lister(c: Caller) -> None:
        for i in range(ROUNDS):
            c.send(Kind.INFO, ("list", "count", "nbytes")[i % 3])

    def deleter(c: Caller) -> None:
        for i in range(ROUNDS):
            if i % 97 == 0:
                c.send(Kind.CLEAR)
            elif i % 5 == 0:
                c.send(Kind.GET, c.rng.choice(IDS), True)
            else:
                c.send(Kind.DELETE, c.rng.sample(IDS, 3))

    def commander(c: Caller) -> None:
        for _ in range(ROUNDS):
            src, dst = c.rng.choice(IDS), c.rng.choice(IDS)
            c.send(Kind.CMD, "torch.add", [ObjRef(src), 1.0], {}, [dst])

    unexpected = _hammer(node, [storer, searcher, lister, deleter, commander])
    assert unexpected == [], unexpected[:10]

    store = node.store
    held = {k: v for k, v in store.objects.items() if type(v) is not Failure}
    assert store.nbytes == sum(_storage_bytes(v) for v in held.values())
    assert store.nbytes <= 16 * 1024
    assert set(store.tags) <= set(store.objects) and set(store.descriptions) <= set(store.objects)


def test_describing_skips_objects_deleted_meanwhile() -> None:
    node = Node("hammer")

    def storer(c: Caller) -> None:
        for i in range(ROUNDS):
            c.send(Kind.STORE, new_id(), torch.ones(2), ["#h"], None)
            if i % 50 == 49:
                c.send(Kind.CLEAR)

    def describer(c: Caller) -> None:
        for i in range(ROUNDS):
            c.send(Kind.INFO, "list") if i % 2 else c.send(Kind.SEARCH, ["#h"])

    assert _hammer(node, [storer, storer, describer, describer]) == []


def test_node_process_serves_three_coordinators_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The node process switches threads every few microseconds too (a sitecustomize on its
    # path), so a race between its connection threads shows up within a few requests.
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.setswitchinterval(1e-5)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    node = start_node(id="hammer", port=0, extra_args=["--threads", "1"])
    workers: list[Any] = []
    try:
        for _ in range(3):
            workers.append(sy.connect(node.url, hook=sy.TorchHook(torch, federation=sy.Federation())))
        storer_w, searcher_w, lister_w = workers
        for _ in range(PREFILL):
            storer_w.store(torch.ones(2), obj_id=new_id(), tags=["#h"], description="prefill")
        storer_w.ping()
        failures: list[str] = []
        start = threading.Barrier(3)
        done = threading.Event()  # the storer goes on until the others are through

        def storer() -> None:
            # Products and bursts of stores keep the node's thread for this connection busy
            # while the others search and list; each product also deletes the one before.
            x = torch.rand(128, 128).send(storer_w)
            start.wait()
            try:
                for i in range(5000):
                    if done.is_set():
                        break
                    y = x @ x
                    for _ in range(10):
                        storer_w.store(torch.ones(8), obj_id=new_id(), tags=["#h"], description="more")
                    if i % 20 == 19:
                        storer_w.ping()
                storer_w.ping()
                del y
            except Exception as exc:
                failures.append(f"store: {exc!r}")

        def searcher() -> None:
            start.wait()
            for i in range(LISTS):
                try:
                    found = searcher_w.search("#h" if i % 2 else "#mine")
                    del found
                except Exception as exc:
                    failures.append(f"search: {exc!r}")

        def lister() -> None:
            start.wait()
            for _ in range(LISTS):
                try:
                    mine = [torch.zeros(2).send(lister_w).tag("#mine") for _ in range(5)]
                    lister_w.list_objects_remote()
                    lister_w.objects_count_remote()
                    del mine  # dropping the pointers deletes the objects on the node
                except Exception as exc:
                    failures.append(f"list: {exc!r}")

        threads = [threading.Thread(target=f) for f in (storer, searcher, lister)]
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join(60)
        done.set()
        threads[0].join(60)
        assert not any(t.is_alive() for t in threads)
        assert failures == [], failures[:5]
    finally:
        for w in workers:
            w.close()
        node.stop()
