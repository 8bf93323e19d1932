"""A node's log lines, read from its stderr as an operator would: connections, plan runs,
releases, refusals and its stop; text by default, JSON on request, a level per logger."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import fedws as sy
from fedws.plans import func2plan

TOKEN = "log-token-123"


def _start(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    save_file({"x": torch.ones(3)}, str(tmp_path / "d.safetensors"))
    cfg = tmp_path / "logger.toml"
    cfg.write_text('id = "lognode"\nport = 0\nthreads = 1\n[[data]]\nfile = "d.safetensors"\ntags = ["#x"]\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedws", "worker", "--config", str(cfg), "--token", TOKEN, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert " listening on " in line, proc.stderr.read() if proc.stderr else ""
    return proc, line.split()[-1]


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    return err


def _work(url: str) -> None:
    hook = sy.TorchHook(torch, federation=sy.Federation())
    with sy.connect(url, TOKEN, hook=hook) as node:
        mine = torch.arange(4.0).send(node)
        assert mine.get().tolist() == [0.0, 1.0, 2.0, 3.0]  # a release: its own value
        (data,) = node.search("#x")
        try:
            data.get()  # served data never leaves: a refusal
        except sy.PermissionDeniedError:
            pass

        @func2plan(args_shape=[(3,)])
        def double(x):  # type: ignore[no-untyped-def]
            return x + x

        ptr_plan = double.send(node)
        out = ptr_plan(data)
        node.ping()
        del out


def test_text_log_has_one_line_per_event(tmp_path: Path) -> None:
    proc, url = _start(tmp_path)
    try:
        _work(url)
    finally:
        err = _stop(proc)
    lines = err.splitlines()

    def find(*words: str) -> str:
        hits = [line for line in lines if all(w in line for w in words)]
        assert hits, (words, err)
        return hits[0]

    assert "127.0.0.1:" in find("INFO", "fedws.server", "default connected from")
    # a caller fetching its own result is a reply, not an event: no INFO line per get
    assert not [line for line in lines if "released object" in line]
    assert "never leaves" in find("WARNING", "refused GET of default/")
    assert "sha256" in find("plan 'double'", "ran for default/", " ms")
    find("node lognode: stopped")


def test_json_log_and_per_logger_levels(tmp_path: Path) -> None:
    proc, url = _start(tmp_path, "--log-format", "json", "--log-level", "fedws.node=WARNING")
    try:
        _work(url)
    finally:
        err = _stop(proc)
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    events = {r.get("event") for r in records}
    assert {"connect", "refuse", "stop"} <= events
    assert "release" not in events and "run_plan" not in events  # fedws.node INFO lines are off
    connect = next(r for r in records if r.get("event") == "connect")
    assert connect["principal"] == "default" and connect["logger"] == "fedws.server" and connect["level"] == "INFO"


def test_a_bad_log_level_is_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "fedws", "worker", "--id", "x", "--log-level", "fedws=LOUD"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "unknown log level" in out.stderr
