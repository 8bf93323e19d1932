"""A FedAvg round with secure aggregation vs plain FedAvg, at 3, 10 and 50 nodes; SecAgg+ at 50.

Each node (a VirtualWorker: in process, no network, so this measures computation and
protocol messages, not bandwidth) holds 64 examples of a 784-64-10 MLP problem (~51k
parameters) and trains one local epoch. The plain round fetches every node's parameters
and averages them on the coordinator; the secure round masks them on the nodes (X25519,
Shamir shares, ChaCha20 masks; ``fedws.fl.secagg``) and unmasks only the sum. Both rounds
are measured in the same run; the ratio is secure / plain. A second column times the
aggregation alone (``secure_sum`` vs fetch + average of the same pointers). At 50 nodes a
third round runs SecAgg+ (``SecAggConfig(neighbours=8)``: each node agrees keys, shares and
masks with 8 neighbours instead of 49), its ratio also against plain.

Run: ``python bench/bench_secagg.py`` (``--quick``: one round, 3 and 6 nodes, a 784-16-10
model, SecAgg+ with 2 neighbours at 6: a smoke run of a few seconds). Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from torch import nn

import fedws as sy
from fedws.fl import FedAvg, FedAvgConfig
from fedws.fl.aggregate import fedavg
from fedws.fl.secagg import SecAggConfig, secure_sum

HIDDEN = 64


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


def federation(n: int) -> list[sy.Worker]:
    hook = sy.TorchHook(torch, federation=sy.Federation())
    g = torch.Generator().manual_seed(n)
    workers = []
    for i in range(n):
        x, y = torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)
        workers.append(sy.VirtualWorker(hook, id=f"node{i}", data=[x.tag("#train", "#x"), y.tag("#train", "#y")]))
    return workers


def round_seconds(workers: list[sy.Worker], secure: bool | SecAggConfig, rounds: int) -> float:
    cfg = FedAvgConfig(rounds=rounds + 1, batch_size=32, round_timeout=600.0)
    trainer = FedAvg(make_model(), workers, cfg, progress=False, secure_aggregation=secure)
    times = []
    for r in range(1, rounds + 2):
        t0 = time.perf_counter()
        trainer.run_round(r)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first round also finds the data and sends the plan


def aggregation_seconds(workers: list[sy.Worker], secure: bool, rounds: int) -> float:
    model = make_model()
    states = {}
    for w in workers:
        m = make_model()
        m.send(w)  # type: ignore[operator]  # installed by the hook
        states[w] = list(m.state_dict(keep_vars=True).values())
    keys = list(model.state_dict())
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        if secure:
            secure_sum(states, weights={w: 64 for w in workers}, timeout=600.0)
        else:
            fedavg([({k: p.copy().get() for k, p in zip(keys, ptrs)}, 64) for ptrs in states.values()])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    global HIDDEN
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round, 3 and 6 nodes, a small model (a smoke run)")
    args = ap.parse_args()
    logging.getLogger("fedws").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    rounds = 1 if args.quick else 3
    sizes = (3, 6) if args.quick else (3, 10, 50)
    plus_at, k = (6, 2) if args.quick else (50, 8)
    HIDDEN = 16 if args.quick else 64
    params = sum(p.numel() for p in make_model().parameters())
    print(f"secure aggregation vs plain FedAvg (VirtualWorkers, 784-{HIDDEN}-10 MLP, {params} parameters)")
    print(f"{'nodes':>5} | {'plain round':>11} | {'secure round':>12} | {'ratio':>6} | "
          f"{'plain agg':>9} | {'secure agg':>10} | {'ratio':>6}")
    for n in sizes:
        workers = federation(n)
        plain = round_seconds(workers, False, rounds)
        secure = round_seconds(workers, True, rounds)
        line = f"{n:>5} | {plain * 1e3:>9.0f}ms | {secure * 1e3:>10.0f}ms | {secure / plain:>5.2f}x"
        if not args.quick:
            plain_agg = aggregation_seconds(workers, False, rounds)
            secure_agg = aggregation_seconds(workers, True, rounds)
            line += f" | {plain_agg * 1e3:>7.0f}ms | {secure_agg * 1e3:>8.0f}ms | {secure_agg / plain_agg:>5.1f}x"
        print(line, flush=True)
        if n == plus_at:
            plus = round_seconds(workers, SecAggConfig(neighbours=k), rounds)
            print(f"{n:>5} | SecAgg+ (k={k}) round {plus * 1e3:.0f}ms: {plus / plain:.2f}x plain, "
                  f"{plus / secure:.2f}x SecAgg", flush=True)


if __name__ == "__main__":
    main()
