"""Every ``fedws`` error a user can fix is one line that says what to do, and ``fedws up`` /
``down`` (``make workers`` / ``make workers-stop``) are safe to repeat."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedws.launch import down, up

ROOT = Path(__file__).resolve().parents[2]


def _fedws(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedws", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_missing_and_malformed_configs_are_one_line(tmp_path: Path) -> None:
    assert "does not exist" in _one_line(_fedws("worker", "--config", str(tmp_path / "nope.toml")))
    bad = tmp_path / "bad.toml"
    bad.write_text('id = "x"\nport = \n')
    assert "not valid TOML" in _one_line(_fedws("worker", "--config", str(bad)))
    bad.write_text('id = "x"\nprot = 1\n')
    assert "unknown keys" in _one_line(_fedws("worker", "--config", str(bad)))
    assert "does not exist" in _one_line(_fedws("up", str(tmp_path / "nope.toml"), "--run-dir", str(tmp_path)))


def test_a_fresh_clone_without_data_says_how_to_prepare_it(tmp_path: Path) -> None:
    cfg = tmp_path / "alice.toml"
    cfg.write_text((ROOT / "workers" / "alice.toml").read_text().replace("port = 8777", "port = 0"))
    line = _one_line(_fedws("worker", "--config", str(cfg)))
    assert "does not exist" in line and "make workers" in line and "prepare_data.py" in line


def test_a_taken_port_is_one_line_with_what_to_do() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = _one_line(_fedws("worker", "--id", "p", "--port", str(port), "--threads", "1"))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "another --port" in line


def _config(tmp_path: Path, port: int = 0) -> Path:
    save_file({"x": torch.ones(2)}, str(tmp_path / "d.safetensors"))
    cfg = tmp_path / "carol.toml"
    cfg.write_text(f'id = "carol"\nport = {port}\nthreads = 1\n[[data]]\nfile = "d.safetensors"\n')
    return cfg


def test_up_twice_says_already_running_and_down_always_cleans_up(tmp_path: Path) -> None:
    cfg, run_dir = _config(tmp_path), tmp_path / "run"
    try:
        (first,) = up([cfg], run_dir)
        assert not first.already_running
        again = _fedws("up", str(cfg), "--run-dir", str(run_dir))
        assert again.returncode == 0 and "already running" in again.stdout and str(first.pid) in again.stdout
        (run_dir / "ghost.pid").write_text("not a pid\n")  # garbage: removed, not an error
    finally:
        stopped = _fedws("down", "--run-dir", str(run_dir))
    assert stopped.returncode == 0 and "stopped 1 node(s)" in stopped.stdout
    assert not list(run_dir.glob("*.pid"))
    assert "no node was running" in _fedws("down", "--run-dir", str(run_dir)).stdout


def test_up_on_a_taken_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cfg = _config(tmp_path, s.getsockname()[1])
        line = _one_line(_fedws("up", str(cfg), "--run-dir", str(tmp_path / "run")))
    assert "address already in use" in line.lower() and "log:" in line
    assert down(tmp_path / "run") == 0
