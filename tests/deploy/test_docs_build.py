"""The documentation site builds with warnings as errors (``make docs``): every page in
the nav, every link and anchor, every API reference the docstrings feed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]') builds the site")
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings[python] renders the API pages")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for page in ("index.html", "getting-started/index.html", "concepts/index.html", "security/index.html",
                 "deployment/index.html", "api/fl/index.html"):
        assert (site / page).exists(), page
    # the API reference is generated from the docstrings
    pointers = (site / "api" / "pointers" / "index.html").read_text()
    assert 'id="fedws.PointerTensor.get"' in pointers
    assert 'id="fedws.fl.FedAvg"' in (site / "api" / "fl" / "index.html").read_text()
    # the concepts diagram is a Mermaid block the theme renders
    assert 'class="mermaid"' in (site / "concepts" / "index.html").read_text()
