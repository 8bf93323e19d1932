"""Baselines measured in the same run as fedws: a raw ``websockets`` echo (the floor for
any WebSocket protocol) and ``torch.distributed.rpc`` on loopback (TensorPipe).

Each baseline runs its server in a child process, like a fedws node, so every figure
crosses the same process boundary.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import time
from typing import Any

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- raw websockets echo ------------------------------------------------------------------


def _echo_server(port: int, ready: Any) -> None:
    from websockets.asyncio.server import serve

    async def echo(ws: Any) -> None:
        async for message in ws:
            await ws.send(message)

    async def main() -> None:
        async with serve(echo, "127.0.0.1", port, compression=None, max_size=None):
            ready.set()
            await asyncio.Future()

    import uvloop

    uvloop.run(main())


class EchoServer:
    """A raw websockets echo server in a child process."""

    def __enter__(self) -> str:
        ctx = mp.get_context("spawn")
        self.port = free_port()
        ready = ctx.Event()
        self.proc = ctx.Process(target=_echo_server, args=(self.port, ready), daemon=True)
        self.proc.start()
        ready.wait(30)
        return f"ws://127.0.0.1:{self.port}"

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        self.proc.join(10)


def echo_roundtrip_us(url: str, size: int, n: int) -> float:
    """Median microseconds for one send+recv of ``size`` bytes."""
    from websockets.asyncio.client import connect

    async def run() -> float:
        payload = os.urandom(size)
        async with connect(url, compression=None, max_size=None) as ws:
            times = []
            for i in range(n + 20):
                t = time.perf_counter()
                await ws.send(payload)
                await ws.recv()
                if i >= 20:
                    times.append(time.perf_counter() - t)
            return statistics.median(times) * 1e6

    import uvloop

    return uvloop.run(run())


def echo_transfer_s(url: str, nbytes: int, repeat: int) -> float:
    """Median seconds to send ``nbytes`` and receive them back (1 MiB fragments)."""
    from websockets.asyncio.client import connect

    async def run() -> float:
        buf = memoryview(bytearray(os.urandom(1 << 20)) * (nbytes >> 20))
        frags = [buf[i : i + (1 << 20)] for i in range(0, nbytes, 1 << 20)]
        times = []
        async with connect(url, compression=None, max_size=None) as ws:
            for _ in range(repeat):
                t = time.perf_counter()
                await ws.send(frags)
                await ws.recv()
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    import uvloop

    return uvloop.run(run())


# -- torch.distributed.rpc ----------------------------------------------------------------


def _add_one(x: torch.Tensor) -> torch.Tensor:
    return x + 1


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _model_state(nbytes: int) -> dict[str, torch.Tensor]:
    """A model state of ``nbytes`` float32 bytes in 4 equal tensors (like 4 big layers)."""
    per = nbytes // 4 // 4
    return {f"layer{i}.weight": torch.randn(per) for i in range(4)}


def _identity_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return state


def _rpc_peer(
    rank: int, port: int, result: Any, mode: str, n: int, nbytes: int, world: int = 2, cpu: Any = None
) -> None:
    import torch.distributed.rpc as rpc

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    opts = rpc.TensorPipeRpcBackendOptions(num_worker_threads=8, _transports=["uv"], _channels=["basic"])
    rpc.init_rpc(f"w{rank}", rank=rank, world_size=world, rpc_backend_options=opts)
    x = torch.randn(nbytes // 4) if rank == 0 and mode == "transfer" else None
    state = _model_state(nbytes) if rank == 0 and mode == "model" else None
    cpu0 = time.process_time()
    if rank == 0 and mode == "model":
        # the state to every other peer at once and back (identity), like one FL round's traffic
        assert state is not None
        times = []
        for _ in range(n):
            t = time.perf_counter()
            futs = [rpc.rpc_async(f"w{r}", _identity_state, args=(state,)) for r in range(1, world)]
            torch.futures.wait_all(futs)
            times.append(time.perf_counter() - t)
        result.value = statistics.median(times)
    elif rank == 0:
        if mode == "roundtrip":
            x = torch.ones(1)
            times = []
            for i in range(n + 20):
                t = time.perf_counter()
                rpc.rpc_sync("w1", _add_one, args=(x,))
                if i >= 20:
                    times.append(time.perf_counter() - t)
            result.value = statistics.median(times) * 1e6
        elif mode == "pipeline":
            x = torch.ones(1)
            for _ in range(50):
                rpc.rpc_sync("w1", _add_one, args=(x,))
            t = time.perf_counter()
            futs = [rpc.rpc_async("w1", _add_one, args=(x,)) for _ in range(n)]
            torch.futures.wait_all(futs)
            result.value = n / (time.perf_counter() - t)
        elif mode == "transfer":
            assert x is not None
            times = []
            for _ in range(n):
                t = time.perf_counter()
                rpc.rpc_sync("w1", _identity, args=(x,))
                times.append(time.perf_counter() - t)
            result.value = statistics.median(times)
    if rank == 0 and cpu is not None:
        cpu[0] = time.process_time() - cpu0
    rpc.shutdown()  # a barrier: every peer's share of the work is done
    if rank and cpu is not None:
        cpu[rank] = time.process_time() - cpu0


def rpc_measure(mode: str, n: int, nbytes: int = 0, world: int = 2, cpu_out: list[float] | None = None) -> float:
    """Run a torch.distributed.rpc measurement between ``world`` child processes.

    ``transfer`` and ``model`` give the median seconds of ``n`` runs; ``cpu_out`` gets the
    CPU seconds all peers spent over those runs (includes the shutdown barrier).
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    result = ctx.Value("d", float("nan"))
    cpu = ctx.Array("d", [0.0] * world)
    procs = [
        ctx.Process(target=_rpc_peer, args=(r, port, result, mode, n, nbytes, world, cpu)) for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        if p.is_alive():
            p.kill()
    if cpu_out is not None:
        cpu_out.append(sum(cpu))
    return float(result.value)
