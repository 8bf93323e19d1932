"""Smoke run of ``bench/bench_plans.py --quick``: it runs end to end on a VirtualWorker and
on a real node, and prints its ratio lines. No assertion is made about timings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_plans.py"
RATIO = r"ratio \(op by op / plan\) on {}: messages [\d.]+x, time [\d.]+x"


def test_bench_plans_quick_prints_ratios() -> None:
    out = subprocess.run(
        [sys.executable, "-W", "ignore", str(BENCH), "--quick", "--runs", "5"],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for label in ("VirtualWorker", "WebSocket node"):
        assert re.search(RATIO.format(label), out.stdout), out.stdout
    assert "summary (op by op / plan" in out.stdout, out.stdout
    # Message counts do not depend on timing: a plan call and its get are two messages.
    plan_rows = re.findall(r"^\s+plan\s+([\d.]+)\s", out.stdout, re.M)
    assert plan_rows == ["2.0", "2.0"], out.stdout


def test_bench_secagg_quick_prints_ratios() -> None:
    secagg = BENCH.parent / "bench_secagg.py"
    out = subprocess.run([sys.executable, "-W", "ignore", str(secagg), "--quick"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(re.findall(r"^\s+\d+ \|\s+\d+ms \|\s+\d+ms \|\s+[\d.]+x", out.stdout, re.M)) == 2, out.stdout
    assert re.search(r"SecAgg\+ \(k=2\) round \d+ms: [\d.]+x plain", out.stdout), out.stdout
