"""``make bench``: every benchmark, each printing fedws against a baseline from the same run.

``python bench/run_all.py [--quick] [script ...]``: ``--quick`` is passed to every script
(each accepts it: fewer repetitions, a smoke run); naming scripts runs only those.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = [
    "bench_network.py",  # small round trip, pipelined ops, bulk tensors (issue 12)
    "bench_coordinator.py",  # FedAvg round 1 and per-op cost (issue 12)
    "bench_flower.py",  # FedAvg round, 3 nodes, vs Flower's legacy gRPC API (issue 12)
    "bench_stream.py",  # tensors over the frame limit; compression (issue 12)
    "bench_plans.py",
    "bench_plans_concurrency.py",
    "bench_secagg.py",  # a round with SecAgg / SecAgg+ vs without (issue 11)
    "bench_scale.py",  # FedAvg round at 10 / 100 / 1,000 nodes (issue 14)
    "bench_node_memory.py",  # memory per idle node in a multi-node host (issue 14)
]
# Scripts that take --quick; every benchmark should.
ACCEPTS_QUICK = set(SCRIPTS)
TIMEOUT_S = 900  # per script; a hung benchmark fails the run instead of blocking it


def run(script: str, extra: list[str]) -> int:
    """Run one script; past the timeout, interrupt it (SIGINT, so its ``finally`` blocks stop
    the nodes it started), then kill it if it still has not exited."""
    proc = subprocess.Popen([sys.executable, "-W", "ignore", str(HERE / script), *extra])
    try:
        return proc.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"{script}: timed out after {TIMEOUT_S} s; interrupting it", flush=True)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 1
    except BaseException:  # Ctrl-C here: let the script clean up too
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions in every script (smoke run)")
    ap.add_argument(
        "scripts", nargs="*", metavar="script", help=f"run only these (default: {' '.join(SCRIPTS)})"
    )
    args = ap.parse_args(argv)
    unknown = [s for s in args.scripts if s not in SCRIPTS]
    if unknown:
        ap.error(f"unknown script(s) {unknown}; choose from {SCRIPTS}")
    failed = []
    for script in args.scripts or SCRIPTS:
        extra = ["--quick"] if args.quick and script in ACCEPTS_QUICK else []
        print(f"\n=== {script}{' --quick' if extra else ''} ===", flush=True)
        rc = run(script, extra)
        if rc != 0:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
