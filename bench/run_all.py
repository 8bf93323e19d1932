"""``make bench``: every benchmark, each printing fedws against a baseline from the same run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = ["bench_network.py", "bench_plans.py"]


def main() -> int:
    extra = sys.argv[1:]
    failed = 0
    for script in SCRIPTS:
        print(f"\n=== {script} ===", flush=True)
        failed += subprocess.call([sys.executable, "-W", "ignore", str(HERE / script), *extra]) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
