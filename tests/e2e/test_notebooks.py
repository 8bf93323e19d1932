"""The example notebooks run top to bottom in a real Jupyter kernel, and leave no node behind.

Each notebook under ``examples/`` is executed with nbclient in a ``python3`` kernel (fedws is
installed editable, so the kernel imports this checkout). A test fails if any cell errors, if a
meaningful output is missing, or if a worker node the notebook started is still alive after the
kernel has shut down.

Leaked nodes are found two ways, never by process name: by the PIDs the notebook printed
(``FEDWS_NODE_PIDS [...]``), and by a per-test token put in the kernel's environment, which
every node the kernel starts inherits (``/proc/<pid>/environ``) — that finds children even if
the notebook died before printing their PIDs. Survivors are killed by PID, then the test fails.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import time
import uuid
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
TOKEN_VAR = "FEDWS_NOTEBOOK_TEST_TOKEN"

# seed 004, "Learn a Simple Linear Model": the losses the course printed
LINEAR_MODEL_LOSSES = [
    "tensor(2.)", "tensor(0.5600)", "tensor(0.2432)", "tensor(0.1372)", "tensor(0.0849)",
    "tensor(0.0538)", "tensor(0.0344)", "tensor(0.0220)", "tensor(0.0141)", "tensor(0.0090)",
]


def cell_text(cell: dict) -> str:
    """Everything a code cell showed: streams and the text of results."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out["data"].get("text/plain", ""))
    return "\n".join(parts)


def outputs_of(nb, source_start: str) -> list[str]:
    """The outputs of the code cells whose source starts with ``source_start``, in order."""
    return [cell_text(c) for c in nb.cells if c.cell_type == "code" and c.source.lstrip().startswith(source_start)]


def all_text(nb) -> str:
    return "\n".join(cell_text(c) for c in nb.cells if c.cell_type == "code")


def printed_pids(nb) -> list[int]:
    pids: list[int] = []
    for m in re.finditer(r"FEDWS_NODE_PIDS (\[[\d, ]*\])", all_text(nb)):
        pids += ast.literal_eval(m.group(1))
    return pids


def alive(pid: int) -> bool:
    """Running (a zombie of ours does not count: it has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def pids_with_token(token: str) -> list[int]:
    """Processes whose environment carries ``token``: the kernel and everything it started."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry.name))
    return [p for p in found if alive(p)]


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if alive(p)]
    return left


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- per-notebook checks ----------------------------------------------------------------------


def check_01_remote_tensors(nb) -> None:
    # the linear model, on a VirtualWorker and then on a real node: the course's losses, twice
    for out in outputs_of(nb, "for i in range(10):") + outputs_of(nb, "input = th.tensor("):
        if "tensor(" in out:
            assert out.split() == LINEAR_MODEL_LOSSES, out
    assert all_text(nb).count("tensor(0.0090)") == 2
    assert "tensor([ 2,  4,  6,  8, 10])" in outputs_of(nb, "x_ptr = x.send(bob, alice)\nx_ptr.get(sum_results=True)")[0]
    text = all_text(nb)
    assert "LocationError: cannot mix a local tensor" in text
    assert "ObjectNotFoundError: worker 'bob' has no object" in text
    assert "after remote_get:  bob 0 alice 1" in text  # the data moved node to node
    assert "<WebsocketClientWorker id:bob" in text


def check_02_plans(nb) -> None:
    text = all_text(nb)
    assert "plan 'plan_double_abs' is not built" in text
    assert outputs_of(nb, "plan_double_abs.build(")[0].strip() == "tensor([2., 4.])"
    assert outputs_of(nb, "pointer_plan = plan_abs.send(device_1)")[0].strip() == "tensor([2, 1])"
    assert "plan on nodes matches local run: [True, True]" in text
    assert "plan_abs on device_1: tensor([2, 1])" in text
    losses = re.search(r"losses after 30 steps: \['([\d.]+)', '([\d.]+)'\]", text)
    assert losses and all(float(v) < 0.1 for v in losses.groups()), text[-2000:]


def check_03_federated_training(nb) -> None:
    text = all_text(nb)
    rounds = re.findall(r"round +(\d+)/(\d+) +train loss ([\d.]+) +test acc ([\d.]+)", text)
    assert rounds and len(rounds) == int(rounds[0][1])
    losses = [float(r[2]) for r in rounds]
    assert losses[-1] < losses[0]
    m = re.search(r"final test accuracy: FedAvg ([\d.]+), central ([\d.]+)", text)
    assert m, text[-2000:]
    assert float(m.group(1)) > 0.5 and float(m.group(2)) > 0.5
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o["output_type"] == "display_data" and "image/png" in o["data"]]
    assert images, "the plot cell showed no image"
    assert "test accuracy after one hand-made round" in text


def check_05_secure_aggregation_dp(nb) -> None:
    text = all_text(nb)
    runs = re.findall(r"noise multiplier ([\d.]+): epsilon ([\d.]+), test accuracy ([\d.]+)", text)
    assert len(runs) == 4, text[-2000:]
    eps = [float(e) for _, e, _ in runs]
    assert eps == sorted(eps), eps  # less noise, more epsilon
    assert "accuracy grows with epsilon" in text
    assert any(o["output_type"] == "display_data" and "image/png" in o["data"]
               for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])), "no plot"



def check_04_strategies_non_iid(nb) -> None:
    text = all_text(nb)
    finals = dict(re.findall(r"(?m)^(\w+) +central acc ([\d.]+) +per node:", text))
    assert set(finals) >= {"fedavg", "fedprox", "fedadam", "fedmedian", "trimmed_mean", "krum"}, text[-2000:]
    assert float(finals["fedavg"]) > 0.3
    assert re.search(r"\| fedavg \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", text)  # the table
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o["output_type"] == "display_data" and "image/png" in o["data"]]
    assert len(images) >= 3, "the split, per-round and per-node plots"


CHECKS = {
    "01_remote_tensors": check_01_remote_tensors,
    "02_plans": check_02_plans,
    "03_federated_training": check_03_federated_training,
    "04_strategies_non_iid": check_04_strategies_non_iid,
    "05_secure_aggregation_dp": check_05_secure_aggregation_dp,
}
# Notebooks that use in-process VirtualWorkers only (no node process to leak or print).
IN_PROCESS = {"04_strategies_non_iid", "05_secure_aggregation_dp"}


# -- the tests --------------------------------------------------------------------------------


def test_notebooks_are_clean() -> None:
    """Committed without outputs, valid nbformat v4, kernel python3; each has its checks."""
    assert NOTEBOOKS, f"no notebooks in {EXAMPLES}"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.nbformat == 4
        assert nb.metadata["kernelspec"]["name"] == "python3"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"
        assert path.stem in CHECKS, f"add output checks for {path.name}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = uuid.uuid4().hex
    monkeypatch.setenv(TOKEN_VAR, token)  # the kernel inherits it, and so do its nodes
    monkeypatch.setenv("FEDWS_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
    )
    error: BaseException | None = None
    started = time.perf_counter()
    try:
        client.execute()  # starts the kernel, runs every cell, shuts the kernel down
    except nbclient.exceptions.CellExecutionError as exc:
        error = exc
    finally:
        elapsed = time.perf_counter() - started
        # The kernel is gone: its atexit handlers have stopped any node a failed cell left.
        leaked = wait_gone(sorted(set(printed_pids(nb)) | set(pids_with_token(token))))
        kill(leaked)
    print(f"{path.name}: {elapsed:.1f} s")
    if error is not None:
        pytest.fail(f"{path.name}: a cell failed\n{error}")
    assert not leaked, f"{path.name} left processes running: {leaked} (killed)"
    assert printed_pids(nb) or path.stem in IN_PROCESS, f"{path.name} started no worker node"
    CHECKS[path.stem](nb)
