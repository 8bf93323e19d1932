"""Running the deployment's entry points as processes, the way the containers run them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "deploy" / "docker-entrypoint.sh"


def compose_service(name: str) -> dict[str, Any]:
    import yaml

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    service: dict[str, Any] = compose["services"][name]
    return service


def fedws_shim(directory: Path) -> Path:
    """A ``fedws`` on PATH that runs this interpreter's fedws (the image's console script)."""
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / "fedws"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fedws "$@"\n')
    shim.chmod(0o755)
    return directory


def env(bin_dir: Path, **extra: str) -> dict[str, str]:
    """This process's environment with the shim first on PATH and this tree importable."""
    out = {k: v for k, v in os.environ.items() if k != "FEDWS_TOKEN"}
    out["PATH"] = f"{bin_dir}{os.pathsep}{out.get('PATH', '')}"
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), out.get("PYTHONPATH")]))
    out["OMP_NUM_THREADS"] = "1"
    out.update(extra)
    return out


def set_option(cmd: list[str], name: str, value: str) -> None:
    cmd[cmd.index(name) + 1] = value


class Node:
    """A node started through the image's entry point; its URL from its ready line."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            ["sh", str(ENTRYPOINT), *cmd], env=env, cwd=cwd, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.url: str | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if " listening on " in line and self.url is None:
                self.url = line.split()[-1]
                self.ready.set()
        self.ready.set()

    def wait_ready(self, timeout: float = 60.0) -> str:
        assert self.ready.wait(timeout), "".join(self.lines)
        assert self.url is not None, "node exited:\n" + "".join(self.lines)
        return self.url

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode
