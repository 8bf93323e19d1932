"""A 20-op function run as a plan vs issued op by op, each ending with a get.

Prints messages sent and wall time per run for both, and their ratio. Runs standalone on
VirtualWorkers (``python bench/bench_plans.py``); the workers come from ``make_workers`` so
other transports can be plugged in without touching the measurement.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import fedws as sy
from fedws.plans import func2plan


def twenty_ops(x: torch.Tensor) -> torch.Tensor:
    """Twenty cheap elementwise ops: the shape of a small model's pre/post-processing."""
    for _ in range(5):
        x = x * 1.01
        x = x + 0.5
        x = torch.tanh(x)
        x = x.abs()
    return x


def make_workers(hook: sy.TorchHook) -> sy.Worker:
    return sy.VirtualWorker(hook, id="bench")


def measure(worker: sy.Worker, run: Callable[[], torch.Tensor], runs: int) -> tuple[float, float]:
    """(messages per run, seconds per run) for ``run``, after a warm-up."""
    for _ in range(3):
        run()
    worker.ping()
    before = worker.session.messages_sent
    start = time.perf_counter()
    for _ in range(runs):
        run()
    elapsed = time.perf_counter() - start
    worker.ping()
    messages = worker.session.messages_sent - before - 1  # not the closing ping
    return messages / runs, elapsed / runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--size", type=int, default=1000, help="elements in the input tensor")
    args = parser.parse_args(argv)

    hook = sy.TorchHook(torch)
    worker = make_workers(hook)
    x = torch.randn(args.size)
    x_ptr = x.send(worker)

    plan = func2plan(args_shape=[(args.size,)])(twenty_ops)
    assert len(plan._code.ops) == 20, plan.code
    pointer_plan = plan.send(worker)
    assert torch.allclose(pointer_plan(x_ptr).get(), twenty_ops(x))

    op_msgs, op_time = measure(worker, lambda: twenty_ops(x_ptr).get(), args.runs)
    plan_msgs, plan_time = measure(worker, lambda: pointer_plan(x_ptr).get(), args.runs)

    print(f"worker: {worker!r}, {args.runs} runs of a 20-op function on {args.size} floats, then get")
    print(f"{'':12}{'messages/run':>14}{'ms/run':>10}")
    print(f"{'op by op':12}{op_msgs:>14.1f}{op_time * 1e3:>10.3f}")
    print(f"{'plan':12}{plan_msgs:>14.1f}{plan_time * 1e3:>10.3f}")
    print(f"ratio (op by op / plan): messages {op_msgs / plan_msgs:.1f}x, time {op_time / plan_time:.1f}x")


if __name__ == "__main__":
    main()
