"""fedws over WebSockets against the raw-websocket floor and torch.distributed.rpc.

1. Round trip of one small remote op + get, vs a raw echo of a frame of the same size and
   vs ``rpc_sync``.
2. Pipelined small ops per second (10,000 dependent ops, then one get), vs ``rpc_async``.
3. Sending and getting back one float32 tensor of 1, 16, 64 and 256 MiB, vs ``rpc_sync``
   (and the raw echo at 64 MiB); goal: at most 0.8x rpc's time.
4. A 100 MB model state (4 tensors) to 3 nodes and back, vs ``rpc_async`` to 3 peers.

Everything prints as the fedws figure, the baseline from this same run, and the ratio;
bulk figures are medians of ``--reps`` runs.
Run: ``python bench/bench_network.py`` (``--quick`` for fewer repetitions and sizes,
``--only bulk`` for rows 3-4 only).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

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


SIZES_MIB = (1, 16, 64, 256)
MODEL_BYTES = 100_000_000
GOAL = 0.8  # fedws's time as a fraction of rpc's


def time_row(label: str, ours: float, base: float, cpu: tuple[float, float] | None = None) -> None:
    ratio = ours / base if base else float("nan")
    verdict = "met" if ratio <= GOAL else "NOT met"
    line = f"  {label:<10} fedws {ours * 1e3:8.1f} ms   torch rpc {base * 1e3:8.1f} ms   ratio {ratio:5.2f} (goal <= {GOAL}: {verdict})"
    if cpu is not None:  # CPU of every process involved: steadier than wall time on a busy machine
        line += f"   CPU/run fedws {cpu[0] * 1e3:7.1f} ms, rpc {cpu[1] * 1e3:7.1f} ms, ratio {cpu[0] / cpu[1]:4.2f}"
    print(line, flush=True)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # not Linux: no CPU column
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bulk(sizes: tuple[int, ...], reps: int, model_bytes: int) -> None:
    """Rows 3 and 4: large tensors to one node and back, a model state to 3 nodes and back.

    Each fedws figure is followed at once by its rpc baseline, so the two see the same load.
    """
    nodes = [start_node(id=f"bulk{i}", port=0, extra_args=["--threads", "1"]) for i in range(3)]
    try:
        hook = sy.TorchHook(torch)
        ws = [sy.connect(n.url, hook=hook, timeout=300) for n in nodes]
        print(f"3. send + get of one float32 tensor (median of {reps}; vs rpc_sync of the same tensor)", flush=True)
        for mib in sizes:
            big = torch.randn((mib << 20) // 4)
            big.send(ws[0]).get()  # warm-up: connection buffers, allocator
            times = []
            cpu0 = cpu_s(os.getpid()) + cpu_s(nodes[0].pid)
            for _ in range(reps):
                t = time.perf_counter()
                back = big.send(ws[0]).get()
                times.append(time.perf_counter() - t)
            ours_cpu = (cpu_s(os.getpid()) + cpu_s(nodes[0].pid) - cpu0) / reps
            assert torch.equal(back, big)
            del big, back
            rpc_cpu: list[float] = []
            rpc_t = baselines.rpc_measure("transfer", reps, mib << 20, cpu_out=rpc_cpu)
            time_row(f"{mib} MiB", statistics.median(times), rpc_t, (ours_cpu, rpc_cpu[0] / reps))
        state = baselines._model_state(model_bytes)

        async def gather_all(ptrs: list[Any]) -> list[Any]:
            return await asyncio.gather(*(p.get_async() for p in ptrs))

        def model_round() -> list[Any]:
            ptrs = [t.send(w) for w in ws for t in state.values()]  # every send, then every get
            return asyncio.run(gather_all(ptrs))

        model_round()
        times = []
        pids = [os.getpid(), *(n.pid for n in nodes)]
        cpu0 = sum(cpu_s(p) for p in pids)
        for _ in range(reps):
            t = time.perf_counter()
            backs = model_round()
            times.append(time.perf_counter() - t)
        ours_cpu = (sum(cpu_s(p) for p in pids) - cpu0) / reps
        assert all(torch.equal(a, b) for a, b in zip(backs, list(state.values()) * 3, strict=True))
        backs = []
        print(
            f"4. {model_bytes / 1e6:.0f} MB model state (4 tensors) to 3 nodes and back "
            f"(median of {reps}; vs rpc_async to 3 peers)",
            flush=True,
        )
        rpc_cpu = []
        rpc_t = baselines.rpc_measure("model", reps, model_bytes, world=4, cpu_out=rpc_cpu)
        time_row("3 nodes", statistics.median(times), rpc_t, (ours_cpu, rpc_cpu[0] / reps))
        for w in ws:
            w.close()
    finally:
        for n in nodes:
            n.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (CI smoke run)")
    ap.add_argument("--only", choices=["all", "small", "bulk"], default="all", help="which rows to run")
    ap.add_argument("--reps", type=int, default=0, help="runs per bulk figure (default 5, 2 with --quick)")
    args = ap.parse_args()
    reps_bulk = args.reps or (2 if args.quick else 5)
    if args.only != "small":
        sizes = (1, 16) if args.quick else SIZES_MIB
        bulk(sizes, reps_bulk, 16 << 20 if args.quick else MODEL_BYTES)
        if args.only == "bulk":
            return
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
    print(f"5. send + get of a {mib} MiB float32 tensor (best of {reps}), against the WebSocket floor")
    row("throughput vs raw websocket echo", 2 * gb / ours_big, 2 * gb / echo_big, "GB/s", "raw echo", True)
    row("throughput vs torch rpc_sync", 2 * gb / ours_big, 2 * gb / rpc_big, "GB/s", "rpc_sync", True)


if __name__ == "__main__":
    main()
