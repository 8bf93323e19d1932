"""The Makefile's set-up: a project .venv by default (PEP 668 systems), PYTHON= overrides,
a one-line message without the venv module, the pinned CPU torch first, and CI running the
README's test command. Each test works on a copy of the Makefile in a temporary directory."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _project(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    return tmp_path


def _make(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # The suite itself runs under `make test`: a sub-make would inherit its level and flags
    # (and print "Entering directory" lines), so it starts as a top-level make.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_by_default_everything_goes_into_a_project_venv(tmp_path: Path) -> None:
    out = _make(_project(tmp_path), "-n", f"SYSTEM_PYTHON={sys.executable}", "test")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{sys.executable} -m venv .venv"
    assert lines[1] == ".venv/bin/python -m pip install -q torch==2.13.0"  # the CPU pin first
    assert lines[2].startswith('.venv/bin/python -m pip install -q -e ".[test')
    assert lines[-1] == ".venv/bin/python -m pytest -q -n 2 --dist loadfile"


def test_python_overrides_the_venv(tmp_path: Path) -> None:
    out = _make(_project(tmp_path), "-n", "PYTHON=/opt/py/bin/python", "demo")
    assert out.returncode == 0, out.stderr
    assert "venv" not in out.stdout
    assert out.stdout.splitlines()[0] == "/opt/py/bin/python -m pip install -q torch==2.13.0"
    assert "/opt/py/bin/python examples/federated_demo.py" in out.stdout


def test_without_the_venv_module_one_line_says_what_to_do(tmp_path: Path) -> None:
    fake = tmp_path / "python-without-venv"
    fake.write_text("#!/bin/sh\nexit 1\n")  # `-c "import venv, ensurepip"` fails, as on a bare Debian
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = _make(_project(tmp_path), "-n", f"SYSTEM_PYTHON={fake}", "test")
    assert out.returncode == 0
    message = [line for line in out.stdout.splitlines() if "venv module" in line]
    assert len(message) == 1 and "apt install python3-venv" in message[0]
    assert f"{fake} -m pip install -q torch==2.13.0" in out.stdout


def test_notebook_and_workers_stop_targets(tmp_path: Path) -> None:
    project = _project(tmp_path)
    notebook = _make(project, "-n", "PYTHON=py", "notebook")
    assert 'py -m pip install -q -e ".[notebook]"' in notebook.stdout and "jupyter notebook" in notebook.stdout
    stop = _make(project, "-n", f"SYSTEM_PYTHON={sys.executable}", "workers-stop")
    # nothing to install first: it works with the venv gone (after `make clean`)
    assert stop.stdout.strip() == f"{sys.executable} -m fedws down --run-dir workers/run"


def test_the_venv_is_really_created(tmp_path: Path) -> None:
    """The real `python -m venv` (with pip, offline: ensurepip's bundled wheel)."""
    project = _project(tmp_path)
    out = _make(project, f"SYSTEM_PYTHON={sys.executable}", ".venv/bin/python", timeout=180)
    assert out.returncode == 0, out.stderr
    venv_python = project / ".venv" / "bin" / "python"
    prefix = subprocess.run([str(venv_python), "-c", "import sys, pip; print(sys.prefix)"], capture_output=True,
                            text=True, timeout=60)
    assert prefix.returncode == 0 and Path(prefix.stdout.strip()) == project / ".venv"
    assert _make(project, "-q", f"SYSTEM_PYTHON={sys.executable}", ".venv/bin/python").returncode == 0  # up to date


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert "make test" in readme and ci[-1] == "make test"
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
