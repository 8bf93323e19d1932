"""Smoke run of ``bench/bench_scale.py --quick``: 10 in-process nodes end to end, its table,
the multi-node-host and dial-out rows (4 host processes each), the Flower peer skipped with a reason,
and the plot written. No assertion is made about timings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_scale.py"


def test_bench_scale_quick(tmp_path: Path) -> None:
    png = tmp_path / "scale.png"
    out = subprocess.run(
        [sys.executable, "-W", "ignore", str(BENCH), "--quick", "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^in-process\s+10\s+[\d.]+\s+[\d.]+", out.stdout, re.M), out.stdout
    # the same round on 4 node-host processes: listening (by path) and dialing out
    assert re.search(r"^multi-node hosts\s+10\s+[\d.]+\s+[\d.]+", out.stdout, re.M), out.stdout
    assert re.search(r"^dial-out nodes\s+10\s+[\d.]+\s+[\d.]+", out.stdout, re.M), out.stdout
    assert re.search(r"flower at \d+ nodes: skipped: |flower at \d+:", out.stdout), out.stdout
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
