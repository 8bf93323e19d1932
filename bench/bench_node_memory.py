"""Memory per idle node in a multi-node host (``fedws worker --nodes N``), goal <= 2 MB.

Starts one host process per node count (1, 100, 1000; ``--quick``: 1 and 100), waits for
its ready line, and reads its resident set size (VmRSS). MB per idle node is
``(RSS(N) - RSS(1)) / (N - 1)``: what one more logical node costs in a process that already
runs one. The baseline is a node in a process of its own (``RSS(1)``: torch and fedws
imported, one node), what each node costs when every node is a process. A second column
has every node of the host answer one session (connect, ping, close), so the per-node
state made on first use (the session, its caller record) is counted too.

Run: ``python bench/bench_node_memory.py [--quick]``. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fedws as sy
from fedws.launch import start_node

GOAL_MB = 2.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS (Linux /proc needed)")


def measure(n: int, touch: bool) -> tuple[float, float]:
    """RSS of a host of ``n`` nodes when idle, and after one session on each node."""
    host = start_node(port=0, extra_args=["--nodes", str(n), "--threads", "1"])
    try:
        idle = rss_mb(host.pid)
        if not touch:
            return idle, float("nan")
        hook = sy.TorchHook(torch, federation=sy.Federation())
        for i in range(n):
            with sy.connect(f"{host.url}/node-{i}", hook=hook, timeout=30.0) as w:
                w.ping()
        return idle, rss_mb(host.pid)
    finally:
        host.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 and 100 nodes only")
    args = ap.parse_args(argv)
    if not Path("/proc/self/status").exists():
        print("bench_node_memory: needs Linux /proc; skipped")
        return 0
    counts = [1, 100] if args.quick else [1, 100, 1000]
    base_idle, base_touched = measure(1, touch=True)
    print(f"baseline: one node in its own process: {base_idle:.0f} MB RSS "
          f"({base_touched:.0f} MB after one session)")
    print(f"{'nodes':>6} {'RSS MB':>8} {'MB/idle node':>13} {'MB/node, 1 session each':>24} "
          f"{'goal':>6} {'vs a process each':>18}")
    for n in counts[1:]:
        idle, touched = measure(n, touch=n <= 1000)
        per_idle = (idle - base_idle) / (n - 1)
        per_touched = (touched - base_touched) / (n - 1)
        ratio = base_idle / per_idle if per_idle > 0 else float("inf")
        print(f"{n:>6} {idle:>8.0f} {per_idle:>13.3f} {per_touched:>24.3f} {GOAL_MB:>6.1f} {ratio:>17.0f}x")
        if per_idle > GOAL_MB:
            print(f"  above the goal of {GOAL_MB} MB per idle node", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
