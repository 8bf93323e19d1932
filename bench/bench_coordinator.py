"""The coordinator's one-time and per-op costs: FedAvg round 1, and pipelined ops.

1. FedAvg round 1 (one-time): 3 fresh ``fedws worker`` processes, a 10-16-2 MLP, 64
   examples per node, batch 32, one local epoch. Round 1 traces the training plan, sends
   it and runs the first ops on every node; the later rounds only run it. Printed: round
   1, the median later round (the baseline from this same run) and the one-time extra.
   Run first in a fresh interpreter, so nothing before it warmed torch up.
2. 10k pipelined dependent ops (``y = y + 1`` on a pointer, then one ``get``): ops/s and
   the coordinator caller thread's CPU per op (what bounds pipelining on the caller's
   side), vs ``rpc_async`` pipelined from this same run.

Goals (issue 12): round 1 at most 0.15 s more than a later round; >= 100k ops/s.
Run: ``python bench/bench_coordinator.py`` (``--quick``: fewer ops and rounds).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import baselines  # noqa: E402

import fedws as sy  # noqa: E402
from fedws.fl import FedAvg, FedAvgConfig  # noqa: E402
from fedws.launch import start_node  # noqa: E402


def fedavg_rounds(rounds: int) -> tuple[float, float, bool]:
    """(round 1 s, median later round s, torch._dynamo imported) on 3 fresh nodes."""
    nodes = [start_node(id=f"n{i}", port=0, extra_args=["--threads", "1"]) for i in range(3)]
    try:
        hook = sy.TorchHook(torch, federation=sy.Federation())
        workers = [sy.connect(n.url, hook=hook, timeout=300) for n in nodes]
        g = torch.Generator().manual_seed(0)
        data = []  # held: dropping a pointer deletes its data on the node
        for w in workers:
            x, y = torch.randn(64, 10, generator=g), torch.randint(0, 2, (64,), generator=g)
            data += [x.tag("#train", "#x").send(w), y.tag("#train", "#y").send(w)]  # type: ignore[attr-defined]
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 2))
        trainer = FedAvg(model, workers, FedAvgConfig(rounds=rounds, batch_size=32, round_timeout=600.0), progress=False)
        times = []
        for r in range(1, rounds + 1):
            t0 = time.perf_counter()
            trainer.run_round(r)
            times.append(time.perf_counter() - t0)
        for w in workers:
            w.close()
        return times[0], statistics.median(times[1:]), "torch._dynamo" in sys.modules
    finally:
        for n in nodes:
            n.stop()


def pipelined(n: int) -> tuple[float, float, float]:
    """(ops/s issuing, ops/s including the final get, caller CPU us per op)."""
    node = start_node(id="pipe", port=0, extra_args=["--threads", "1"])
    try:
        w = sy.connect(node.url, hook=sy.TorchHook(torch, federation=sy.Federation()), timeout=300)
        y = torch.ones(1).send(w)  # type: ignore[attr-defined]
        for _ in range(200):
            y = y + 1
        y.get()
        y = torch.ones(1).send(w)  # type: ignore[attr-defined]
        t, c = time.perf_counter(), time.thread_time()
        for _ in range(n):
            y = y + 1
        t1, c1 = time.perf_counter(), time.thread_time()
        final = y.get()
        t2 = time.perf_counter()
        assert final.item() == n + 1
        w.close()
        return n / (t1 - t), n / (t2 - t), (c1 - c) / n * 1e6
    finally:
        node.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer ops and rounds (CI smoke run)")
    args = ap.parse_args()
    logging.getLogger("fedws").setLevel(logging.ERROR)
    n_pipe = 2000 if args.quick else 10_000
    rounds = 3 if args.quick else 6

    r1, steady, dynamo = fedavg_rounds(rounds)
    issue, with_get, cpu = pipelined(n_pipe)
    rpc = baselines.rpc_measure("pipeline", n_pipe)

    print("fedws coordinator: first round and per-op cost")
    extra = r1 - steady
    print(
        f"  FedAvg round 1 (one-time)              fedws {r1:8.3f} s   later round (same run) {steady:8.3f} s   "
        f"ratio {r1 / steady:6.1f}   one-time extra {extra:6.3f} s   goal <= 0.15 s extra: "
        f"{'met' if extra <= 0.15 else 'NOT met'}   (torch._dynamo imported: {dynamo})"
    )
    print(
        f"  {n_pipe // 1000}k pipelined dependent ops             fedws {with_get:8.0f} ops/s   rpc_async {rpc:8.0f} ops/s   "
        f"ratio {with_get / rpc:6.2f}   goal >= 100k ops/s: {'met' if with_get >= 100_000 else 'NOT met'}   "
        f"(issuing alone {issue:.0f} ops/s; caller CPU {cpu:.1f} us/op, i.e. at most {1e6 / cpu:.0f} ops/s)"
    )


if __name__ == "__main__":
    main()
