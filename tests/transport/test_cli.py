"""The ``fedws`` command line: help, a node from a config with data, clean shutdown, and
``fedws up``/``down`` (what ``make workers``/``make workers-stop`` run)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fedws as sy
from fedws.launch import down, start_node, up


def _fedws(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedws", *args], capture_output=True, text=True, timeout=60)


def test_help_documents_every_worker_option() -> None:
    top = _fedws("--help")
    assert top.returncode == 0 and "worker" in top.stdout and "up" in top.stdout
    helptext = _fedws("worker", "--help").stdout
    for option in ("--id", "--host", "--port", "--token", "--certfile", "--keyfile", "--config",
                   "--max-frame-mb", "--max-store-mb", "--threads", "--verbose"):
        assert option in helptext, option


def test_worker_without_id_or_config_is_a_clear_error() -> None:
    result = _fedws("worker")
    assert result.returncode != 0 and "--id or --config" in result.stderr


def _write_config(tmp_path: Path) -> Path:
    save_file({"x": torch.arange(6.0).reshape(3, 2), "y": torch.tensor([0, 1, 1])}, str(tmp_path / "d.safetensors"))
    np.save(tmp_path / "extra.npy", np.ones(4, dtype=np.float32))
    cfg = tmp_path / "carol.toml"
    cfg.write_text(
        'id = "carol"\nport = 0\nthreads = 1\n'
        '[[data]]\nfile = "d.safetensors"\nkey = "x"\ntags = ["#x", "#train"]\ndescription = "features"\n'
        '[[data]]\nfile = "d.safetensors"\nkey = "y"\ntags = ["#y", "#train"]\n'
        '[[data]]\nfile = "extra.npy"\ntags = ["#extra"]\n'
    )
    return cfg


def test_node_serves_the_data_of_its_config(tmp_path: Path, hook: sy.TorchHook) -> None:
    # The open development mode: served data can be read (the private default refuses it,
    # see tests/e2e/test_security_policy.py).
    node = start_node(_write_config(tmp_path), extra_args=["--insecure-dev"])
    try:
        assert node.id == "carol" and node.url.startswith("ws://127.0.0.1:")
        with sy.connect(node.url, hook=hook) as carol:
            assert len(carol.search("#train")) == 2
            (x,) = carol.search("#x")
            assert x.shape == (3, 2)
            assert torch.equal((x * 2).get(), torch.arange(6.0).reshape(3, 2) * 2)
            listing = {d["description"] for d in carol.list_objects_remote()}
            assert "features" in listing
            assert carol.search("#extra")[0].get().tolist() == [1.0] * 4
            # get() took #extra off the node; dropped search pointers deleted nothing
            assert carol.objects_count_remote() == 2
    finally:
        node.stop()


def test_bad_config_is_reported(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('id = "bad"\nport = 0\n[[data]]\nfile = "missing.safetensors"\n')
    result = _fedws("worker", "--config", str(cfg))
    assert result.returncode == 2 and "missing.safetensors" in result.stderr
    cfg.write_text('id = "bad"\nfile = "x.pkl"\n')
    assert "unknown keys" in _fedws("worker", "--config", str(cfg)).stderr


def test_sigterm_and_sigint_stop_the_node_cleanly() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        node = start_node(id="brief", port=0)
        assert node.process is not None
        node.process.send_signal(sig)
        assert node.process.wait(timeout=20) == 0
        node.stop()


def test_up_and_down_start_and_stop_a_federation_by_pid(tmp_path: Path, hook: sy.TorchHook) -> None:
    cfg = _write_config(tmp_path)
    run_dir = tmp_path / "run"
    nodes = up([cfg], run_dir)
    try:
        assert (run_dir / "carol.pid").exists()
        with sy.connect(nodes[0].url, hook=hook) as carol:
            carol.ping()
    finally:
        assert down(run_dir) == 1
    assert not list(run_dir.glob("*.pid"))
    with pytest.raises(sy.FedwsConnectionError):
        sy.connect(nodes[0].url, hook=hook, connect_timeout=3)


def test_sigterm_right_after_the_ready_line_exits_cleanly() -> None:
    """The handlers are installed before the ready line is printed: no window where a
    SIGTERM kills the node with -15 instead of stopping it cleanly."""
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedws", "worker", "--id", "quick", "--port", "0", "--threads", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert " listening on " in line, line
            proc.send_signal(signal.SIGTERM)  # at once, from the thread that read the line
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
