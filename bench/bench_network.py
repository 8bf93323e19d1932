"""fedws over WebSockets against the raw-websocket floor and torch.distributed.rpc.

1. Round trip of one small remote op + get, vs a raw echo of a frame of the same size and
   vs ``rpc_sync``.
2. Pipelined small ops per second (10,000 dependent ops, then one get), vs ``rpc_async``.
3. Sending and getting back a 64 MiB float32 tensor, vs the raw echo and ``rpc_sync``.

Everything prints as the fedws figure, the baseline from this same run, and the ratio.
Run: ``python bench/bench_network.py`` (``--quick`` for fewer repetitions).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import baselines  # noqa: E402

import fedws as sy  # noqa: E402
from fedws.launch import start_node  # noqa: E402
from fedws.protocol import codec  # noqa: E402
from fedws.protocol.messages import Kind  # noqa: E402


def row(label: str, ours: float, base: float, unit: str, base_label: str, higher_is_better: bool) -> None:
    ratio = ours / base if base else float("nan")
    better = "higher is better" if higher_is_better else "lower is better"
    print(f"  {label:<38} fedws {ours:>10.1f} {unit:<6} {base_label:<22} {base:>10.1f} {unit:<6} ratio {ratio:5.2f}  ({better})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (CI smoke run)")
    args = ap.parse_args()
    n_rt = 200 if args.quick else 2000
    n_pipe = 2000 if args.quick else 10_000
    mib = 16 if args.quick else 64
    reps = 2 if args.quick else 5
    nbytes = mib << 20

    print(f"fedws network benchmarks ({torch.get_num_threads()} torch threads, {mib} MiB transfer)")
    hook = sy.TorchHook(torch)
    node = start_node(id="bench", port=0, extra_args=["--threads", "1"])
    try:
        w = sy.connect(node.url, hook=hook, timeout=300)
        # 1. round trip
        x = torch.ones(1).send(w)
        for _ in range(50):
            (x + 1).get()
        times = []
        for _ in range(n_rt):
            t = time.perf_counter()
            (x + 1).get()
            times.append(time.perf_counter() - t)
        ours_rt = statistics.median(times) * 1e6
        frame = len(codec.encode_bytes([int(Kind.CMD), 1, "Tensor.__add__", [codec.ObjRef(1), 1], {}, [1]]))
        frame += len(codec.encode_bytes([int(Kind.GET), 2, 1, True]))

        # 2. pipelined
        y = torch.ones(1).send(w)
        for _ in range(200):
            y = y + 1
        y.get()
        y = torch.ones(1).send(w)
        t = time.perf_counter()
        for _ in range(n_pipe):
            y = y + 1
        final = y.get()
        ours_pipe = n_pipe / (time.perf_counter() - t)
        assert final.item() == n_pipe + 1

        # 3. 64 MiB
        big = torch.randn(nbytes // 4)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            back = big.send(w).get()
            best = min(best, time.perf_counter() - t)
        assert torch.equal(back, big)
        ours_big = best
        w.close()
    finally:
        node.stop()

    with baselines.EchoServer() as url:
        echo_rt = baselines.echo_roundtrip_us(url, frame, n_rt)
        echo_big = baselines.echo_transfer_s(url, nbytes, reps)
    rpc_rt = baselines.rpc_measure("roundtrip", n_rt)
    rpc_pipe = baselines.rpc_measure("pipeline", n_pipe)
    rpc_big = baselines.rpc_measure("transfer", reps, nbytes)

    print("1. round trip of one small op + get (median)   goal: <= 2x echo, <= 0.4x rpc")
    row("vs raw websocket echo (the floor)", ours_rt, echo_rt, "us", "raw echo", False)
    row("vs torch rpc_sync", ours_rt, rpc_rt, "us", "rpc_sync", False)
    met = ours_rt <= 2 * echo_rt and ours_rt <= 0.4 * rpc_rt
    print(f"  one small op + get(): {ours_rt / echo_rt:.2f}x echo, {ours_rt / rpc_rt:.2f}x rpc_sync  goal <= 2x echo, <= 0.4x rpc: {'met' if met else 'NOT met'}")
    print(f"2. pipelined dependent ops ({n_pipe}, then one get)")
    row("vs torch rpc_async pipelined", ours_pipe, rpc_pipe, "ops/s", "rpc_async", True)
    gb = nbytes / 1e9
    print(f"3. send + get of a {mib} MiB float32 tensor (best of {reps})")
    row("throughput vs raw websocket echo", 2 * gb / ours_big, 2 * gb / echo_big, "GB/s", "raw echo", True)
    row("throughput vs torch rpc_sync", 2 * gb / ours_big, 2 * gb / rpc_big, "GB/s", "rpc_sync", True)


if __name__ == "__main__":
    main()
