"""The console script starts fast: ``fedws --help`` and ``fedws status`` never import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

_CHECK = (
    "import sys\n"
    "from fedws.cli import main\n"
    "try:\n"
    "    main({argv!r})\n"
    "except SystemExit:\n"
    "    pass\n"
    "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
)


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["worker", "--help"], ["status", "--help"], ["status", "--timeout", "2", "ws://127.0.0.1:9"],
     ["down", "--run-dir", "/nonexistent-fedws-run"]],
)
def test_the_cli_does_not_import_torch(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-c", _CHECK.format(argv=argv)], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "NO-TORCH", out.stderr


def test_importing_fedws_is_lazy_but_complete() -> None:
    code = ("import sys, fedws\nassert 'torch' not in sys.modules\n"
            "fedws.TorchHook\nassert 'torch' in sys.modules\nprint(sorted(set(fedws.__all__) - set(dir(fedws))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
