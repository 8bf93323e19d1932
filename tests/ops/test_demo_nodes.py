"""``examples/federated_demo.py --nodes ... --token-file ...`` trains on nodes someone else
started: here, private node processes this test starts, whose operator approved the plan
the demo prints with ``--print-digest``."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedws.launch import NodeProcess, start_node

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "federated_demo.py"
TOKEN = "demo-token-456"


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(DEMO), *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def _prepare(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "examples" / "prepare_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.prepare(nodes=2, workers_dir=tmp_path, quiet=True)


def test_the_demo_trains_on_running_nodes(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    _prepare(tmp_path)
    args = ("--rounds", "2", "--local-epochs", "1")
    digest = _demo("--print-digest", *args)
    assert digest.returncode == 0, digest.stderr
    approved = digest.stdout.strip().splitlines()[-1]
    assert len(approved) == 64
    nodes: list[NodeProcess] = []
    try:
        for name in ("alice", "bob"):
            cfg = tmp_path / f"{name}.toml"
            cfg.write_text(re.sub(r"(?m)^port = \d+$", "port = 0", cfg.read_text()))
            nodes.append(start_node(cfg, extra_args=["--token", TOKEN, "--approve-plan", approved, "--threads", "1"]))
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        urls = ",".join(n.url for n in nodes)
        run = _demo("--nodes", urls, "--token-file", str(token_file), "--test-data",
                    str(tmp_path / "data" / "test.safetensors"), "--no-plot", *args)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "round  2/2" in run.stdout and "test accuracy after 2 rounds" in run.stdout
        accuracy = float(run.stdout.split("test accuracy after 2 rounds:")[1].split()[0])
        assert accuracy > 0.5
        # The wrong token: one line, no traceback; the nodes keep running.
        token_file.write_text("wrong\n")
        refused = _demo("--nodes", urls, "--token-file", str(token_file), "--test-data",
                        str(tmp_path / "data" / "test.safetensors"), "--no-plot", *args)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert all(n.process is not None and n.process.poll() is None for n in nodes)
    finally:
        for n in nodes:
            n.stop()
