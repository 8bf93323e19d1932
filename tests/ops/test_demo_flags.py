"""``examples/federated_demo.py``'s flags reach the library, refused combinations stop before
any node starts, and the plot carries each node's federated evaluation.

The demo runs in this process (its ``main``), so the test can see the :class:`FedAvg` it
built; the nodes it starts are real private node processes on free ports (``--base-port 0``),
stopped by the demo itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "federated_demo.py"
FAST = ("--rounds", "2", "--local-epochs", "1", "--base-port", "0")


@pytest.fixture(scope="module")
def demo() -> Iterator[ModuleType]:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import federated_demo
    finally:
        sys.path.remove(str(ROOT / "examples"))
    yield federated_demo


@pytest.fixture
def trainers(demo: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Any]:
    """Every FedAvg the demo builds (the combination check's included); output to tmp_path."""
    built: list[Any] = []

    class Recording(demo.FedAvg):  # type: ignore[name-defined,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(demo, "FedAvg", Recording)
    monkeypatch.setattr(demo, "OUTPUT", tmp_path)
    return built


def test_flags_reach_the_library_on_real_nodes(demo: ModuleType, trainers: list[Any], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = demo.main([*FAST, "--strategy", "fedadam", "--optimizer", "adam", "--secure-agg", "--alpha", "0.5"])
    out = capsys.readouterr().out
    assert code == 0, out
    trainer = trainers[-1]
    assert trainer.strategy.name == "fedadam" and trainer.secure_aggregation
    assert trainer.step is not None and trainer.step.optimizer.kind == "adam" and trainer.config.lr == 0.01
    assert [type(w).__name__ for w in trainer.workers] == ["WebsocketClientWorker"] * 3  # real nodes
    assert "Dirichlet(alpha=0.5)" in out and "fedadam (network" in out and "pid" in out
    history = trainer.history
    assert len(history) == 2 and history[-1].node_metrics.keys() == {"alice", "bob", "charlie"}
    # The plot's data: each node's held-out accuracy per round, beside the central accuracy.
    series = json.loads((tmp_path / "federated_demo_non_iid.json").read_text())
    assert (tmp_path / "federated_demo_non_iid.png").stat().st_size > 0
    assert series["rounds"] == [1, 2]
    assert series["node_accuracy"] == {n: history.node_metric(n, "accuracy") for n in ("alice", "bob", "charlie")}
    assert all(0.0 <= a <= 1.0 for accs in series["node_accuracy"].values() for a in accs)
    assert series["central_accuracy"] == history.test_accuracies and len(series["central_training"]["accuracy"]) == 2
    assert series["federated_accuracy"] == history.metric("accuracy", federated=True)


def test_dp_epsilon_and_strategy_names(demo: ModuleType, trainers: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    code = demo.main([*FAST, "--virtual", "--no-plot", "--dp-epsilon", "8", "--strategy", "fedavg"])
    out = capsys.readouterr().out
    assert code == 0, out
    trainer = trainers[-1]
    assert trainer.dp is not None and trainer.dp.config.mode == "central"  # the documented default
    assert 0 < trainer.history[-1].epsilon <= 8.0 and "privacy spent: epsilon" in out
    # hyphenated and library names alike; krum on 3 nodes tolerates f=0 (it needs > 2f + 2)
    assert demo.make_strategy("trimmed-mean", 3).name == "trimmed_mean"
    assert demo.make_strategy("krum", 3).f == 0 and demo.make_strategy("krum", 7).f == 2


@pytest.mark.parametrize("flags, message", [
    (("--secure-agg", "--dp-epsilon", "5", "--dp-mode", "central"), "central DP clips each update on the coordinator"),
    (("--dp-epsilon", "5", "--dp-mode", "distributed"), "needs secure_aggregation"),
    (("--dp-epsilon", "5", "--strategy", "fedprox"), "dp= works with the fedavg strategy only"),
    (("--secure-agg", "--strategy", "krum"), "needs every node's model"),
    (("--trusted", "--strategy", "fedmedian"), "needs every node's model"),
])
def test_refused_combinations_exit_2_before_any_node_starts(
    demo: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    flags: tuple[str, ...], message: str,
) -> None:
    import fedws.launch

    def no_node(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a node was started")

    monkeypatch.setattr(fedws.launch, "start_node", no_node)
    with pytest.raises(SystemExit) as exited:
        demo.main([*FAST, *flags])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("federated_demo: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_refusal_on_the_command_line_is_one_line() -> None:
    pytest.importorskip("sklearn")
    run = subprocess.run([sys.executable, str(DEMO), "--secure-agg", "--strategy", "fedmedian"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2 and run.stdout == ""
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert "--strategy fedmedian --secure-agg do not combine" in run.stderr
