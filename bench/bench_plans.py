"""A 20-op function run as a plan vs issued op by op, each ending with a get.

Prints messages sent, frames sent and the median wall time per run for both, and their ratio, on a
VirtualWorker (in process, no network) and on a real WebSocket node started for the run
(``fedws.launch.start_node``; stopped by PID at the end, even on error). The op-by-op run is
the baseline, measured in the same run; nothing is asserted about timings.

Run: ``python bench/bench_plans.py`` (``--quick`` for fewer runs, a smoke run).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import fedws as sy
from fedws.launch import start_node
from fedws.plans import func2plan


def twenty_ops(x: torch.Tensor) -> torch.Tensor:
    """Twenty cheap elementwise ops: the shape of a small model's pre/post-processing."""
    for _ in range(5):
        x = x * 1.01
        x = x + 0.5
        x = torch.tanh(x)
        x = x.abs()
    return x


class Measured:
    """Messages, frames and per-run wall times of one way of running the function."""

    def __init__(self) -> None:
        self.runs = 0
        self.messages = 0
        self.frames = 0
        self.times: list[float] = []

    def measure(self, worker: sy.Worker, run: Callable[[], torch.Tensor], runs: int) -> None:
        worker.ping()  # nothing left in flight from before
        session = worker.session
        msgs0, frames0 = session.messages_sent, session.frames_taken
        for _ in range(runs):
            start = time.perf_counter()
            run()
            self.times.append(time.perf_counter() - start)
        worker.ping()
        # Not the closing ping (one message in one frame). Deletes of the dropped intermediate
        # pointers count: they are messages the op-by-op way has to send.
        self.messages += session.messages_sent - msgs0 - 1
        self.frames += session.frames_taken - frames0 - 1
        self.runs += runs

    def row(self, label: str) -> str:
        ms = statistics.median(self.times) * 1e3
        return f"  {label:12}{self.messages / self.runs:>14.1f}{self.frames / self.runs:>12.1f}{ms:>16.3f}"


def bench_worker(
    worker: sy.Worker, label: str, runs: int, size: int, warmup: int, blocks: int
) -> dict[str, float]:
    x = torch.randn(size)
    x_ptr = x.send(worker)
    plan = func2plan(args_shape=[(size,)])(twenty_ops)
    assert len(plan._code.ops) == 20, plan.code
    pointer_plan = plan.send(worker)
    expected = twenty_ops(x)
    assert torch.allclose(pointer_plan(x_ptr).get(), expected)
    assert torch.allclose(twenty_ops(x_ptr).get(), expected)

    def op_by_op() -> torch.Tensor:
        return twenty_ops(x_ptr).get()

    def as_plan() -> torch.Tensor:
        return pointer_plan(x_ptr).get()

    for _ in range(warmup):
        op_by_op()
        as_plan()
    # Alternate blocks of the two, so load from elsewhere on the machine hits both alike;
    # medians, so a run that waited for a core does not swing the result.
    ops, plans = Measured(), Measured()
    per_block = max(1, runs // blocks)
    for _ in range(blocks):
        ops.measure(worker, op_by_op, per_block)
        plans.measure(worker, as_plan, per_block)

    print(f"{label}: {worker!r}, {ops.runs} runs each of a 20-op function on {size} floats, then get")
    print(f"  {'':12}{'messages/run':>14}{'frames/run':>12}{'median ms/run':>16}")
    print(ops.row("op by op"))
    print(plans.row("plan"))
    msg_ratio = ops.messages / plans.messages
    time_ratio = statistics.median(ops.times) / statistics.median(plans.times)
    print(f"  ratio (op by op / plan) on {label}: messages {msg_ratio:.1f}x, time {time_ratio:.1f}x")
    return {"messages": msg_ratio, "time": time_ratio}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs (CI smoke run)")
    parser.add_argument(
        "--runs", type=int, default=None, help="runs per measurement (default 200, 20 with --quick)"
    )
    parser.add_argument("--size", type=int, default=1000, help="elements in the input tensor")
    args = parser.parse_args(argv)
    runs = args.runs if args.runs is not None else (20 if args.quick else 200)
    warmup = 2 if args.quick else 10
    blocks = 2 if args.quick else 5

    hook = sy.TorchHook(torch)
    summary: dict[str, dict[str, float]] = {}

    summary["VirtualWorker"] = bench_worker(
        sy.VirtualWorker(hook, id="bench"), "VirtualWorker", runs, args.size, warmup, blocks
    )

    node = start_node(id="bench-plans", port=0, extra_args=["--threads", "1"])
    try:
        worker = sy.connect(node.url, hook=hook, timeout=120)
        try:
            summary["WebSocket node"] = bench_worker(
                worker, "WebSocket node", runs, args.size, warmup, blocks
            )
        finally:
            worker.close()
    finally:
        node.stop()

    print("summary (op by op / plan, higher means the plan saves more):")
    for label, r in summary.items():
        print(f"  {label:<16} messages {r['messages']:5.1f}x   wall time {r['time']:5.1f}x")


if __name__ == "__main__":
    main()
