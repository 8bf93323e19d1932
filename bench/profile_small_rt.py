"""Where one small op + ``get()`` spends its CPU: per-thread CPU on both sides, per round trip.

Reads ``/proc/<pid>/task/*/stat`` (utime + stime) of this process (the coordinator) and of
the node process before and after ``n`` round trips, and prints the CPU each thread spent
per round trip next to the wall-clock median. Linux only (``/proc``).
Run: ``python bench/profile_small_rt.py [-n 2000]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import threading
import time

import torch

import fedws as sy
from fedws.launch import start_node

_TICK = os.sysconf("SC_CLK_TCK")


def thread_names(pid: int) -> dict[str, str]:
    """Thread id -> Python thread name: ours from ``threading``, the node's from ``py-spy dump``."""
    if pid == os.getpid():
        return {str(t.native_id): t.name for t in threading.enumerate()}
    if shutil.which("py-spy") is None:
        return {}
    dump = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True, text=True).stdout
    return dict(re.findall(r'^Thread (\d+) \(\w+\): "([^"]+)"', dump, re.M))


def thread_cpu(pid: int) -> dict[str, float]:
    """Thread name -> CPU seconds (threads of one name summed; unnamed: native threads)."""
    names = thread_names(pid)
    out: dict[str, float] = {}
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = names.get(tid, "native " + stat[stat.index("(") + 1 : stat.rindex(")")])
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _TICK
    return out


def diff(after: dict[str, float], before: dict[str, float], n: int) -> dict[str, float]:
    return {k: (v - before.get(k, 0.0)) / n * 1e6 for k, v in after.items() if v - before.get(k, 0.0) > 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--py-spy", metavar="PREFIX", help="also sample both processes with py-spy into PREFIX-{coordinator,node}.txt")
    args = ap.parse_args()
    hook = sy.TorchHook(torch)
    node = start_node(id="prof", port=0, extra_args=["--threads", "1"])
    try:
        w = sy.connect(node.url, hook=hook, timeout=60)
        x = torch.ones(1).send(w)
        for _ in range(100):
            (x + 1).get()
        spies = [
            subprocess.Popen(["py-spy", "record", "--threads", "-r", "500", "-f", "raw", "--pid", str(pid),
                              "-o", f"{args.py_spy}-{side}.txt"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for side, pid in (("coordinator", os.getpid()), ("node", node.pid))
        ] if args.py_spy else []
        time.sleep(1.0 if spies else 0.0)  # py-spy attaches
        me, them = thread_cpu(os.getpid()), thread_cpu(node.pid)
        times = []
        t0 = time.perf_counter()
        for _ in range(args.n):
            t = time.perf_counter()
            (x + 1).get()
            times.append(time.perf_counter() - t)
        wall = (time.perf_counter() - t0) / args.n * 1e6
        me2, them2 = thread_cpu(os.getpid()), thread_cpu(node.pid)
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        w.close()
    finally:
        node.stop()
    print(f"small op + get: median {statistics.median(times) * 1e6:.0f} us, mean {wall:.0f} us")
    for side, d in (("coordinator", diff(me2, me, args.n)), ("node", diff(them2, them, args.n))):
        print(f"  {side}: " + ", ".join(f"{k} {v:.0f} us" for k, v in sorted(d.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
