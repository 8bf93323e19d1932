"""Checkpoints of a federated run: the global model and where the run stopped.

A checkpoint is a directory with ``model_round_NNNN.safetensors`` (the tensors) and
``checkpoint.json`` (round number, history, config, and which tensor file is current).
No pickle: loading a checkpoint never runs code from the file. The json is written last
and atomically, so a crash mid-save leaves the previous checkpoint intact.

A resumed run must go on as if it had never stopped, so a checkpoint also keeps the run's
state beside the model (:func:`run_state`): the server optimizer's tensors (FedAvgM's
velocity, FedAdam/Yogi/Adagrad's moments: every attribute of the strategy that holds a
dict of tensors, stored as ``strategy.<attr>.<key>`` in the same safetensors file) and the
DP accountant's history, so epsilon keeps adding up instead of restarting at 0.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .history import History

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "run_state", "restore_run_state", "CHECKPOINT_JSON"]

CHECKPOINT_JSON = "checkpoint.json"
_FORMAT = 1


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    Attributes:
        state: the global model's state dict after ``round``.
        round: the last completed round (the next run starts at ``round + 1``).
        history: the metrics of rounds 1..round.
        config: the run's config as saved (for information; not applied).
    """

    state: dict[str, torch.Tensor]
    round: int
    history: History
    config: dict[str, Any]
    strategy_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None


def save_checkpoint(
    directory: str | os.PathLike[str],
    state: Mapping[str, torch.Tensor],
    round_number: int,
    history: History | None = None,
    config: Mapping[str, Any] | None = None,
    *,
    strategy_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    privacy: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint into ``directory`` (created if needed); returns the json path.

    ``strategy_state`` (attribute -> tensors) and ``privacy`` (the accountant's json-able
    state): the rest of the run, as :func:`run_state` gives them.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    extra = {f"strategy.{attr}.{k}": v.detach().to("cpu").contiguous().clone()
             for attr, values in (strategy_state or {}).items() for k, v in values.items()}
    model_name = f"model_round_{round_number:04d}.safetensors"
    tmp_model = directory / (model_name + ".tmp")
    save_file({**tensors, **extra}, str(tmp_model), metadata={"round": str(round_number)})
    os.replace(tmp_model, directory / model_name)
    record = {
        "format": _FORMAT,
        "round": round_number,
        "model_file": model_name,
        "keys": list(tensors),
        "history": (history or History()).to_dict(),
        "config": dict(config or {}),
        "strategy_state": {attr: list(values) for attr, values in (strategy_state or {}).items()},
        "privacy": None if privacy is None else dict(privacy),
    }
    tmp_json = directory / (CHECKPOINT_JSON + ".tmp")
    tmp_json.write_text(json.dumps(record, indent=2))
    os.replace(tmp_json, directory / CHECKPOINT_JSON)
    for old in directory.glob("model_round_*.safetensors"):
        if old.name != model_name:
            old.unlink(missing_ok=True)
    return directory / CHECKPOINT_JSON


def load_checkpoint(directory: str | os.PathLike[str]) -> Checkpoint | None:
    """Read the checkpoint in ``directory``; None if there is none.

    Raises:
        ValueError: the checkpoint exists but is inconsistent (unknown format, missing or
            mismatched tensor file).
    """
    path = Path(directory) / CHECKPOINT_JSON
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("format") != _FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {record.get('format')!r}")
    model_path = Path(directory) / record["model_file"]
    if not model_path.exists():
        raise ValueError(f"{path} names {model_path.name}, which is missing")
    tensors = load_file(str(model_path))
    state = {k: tensors[k] for k in record["keys"] if k in tensors}
    if len(state) != len(record["keys"]):
        raise ValueError(f"{model_path} lacks some of the keys listed in {path}")
    strategy_state = {}
    for attr, names in record.get("strategy_state", {}).items():
        try:
            strategy_state[attr] = {k: tensors[f"strategy.{attr}.{k}"] for k in names}
        except KeyError:
            raise ValueError(f"{model_path} lacks some of the strategy's {attr!r} tensors listed in {path}") from None
    return Checkpoint(
        state=state,
        round=int(record["round"]),
        history=History.from_dict(record.get("history", {})),
        config=record.get("config", {}),
        strategy_state=strategy_state,
        privacy=record.get("privacy"),
    )


def run_state(strategy: Any, privacy: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`save_checkpoint` that keep a run's state: the
    strategy's tensor dicts (server optimizer state) and ``privacy.state_dict()`` (if any)."""
    tensors = {
        attr: dict(value) for attr, value in vars(strategy).items()
        if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values())
    }
    return {"strategy_state": tensors, "privacy": None if privacy is None else privacy.state_dict()}


def restore_run_state(checkpoint: Checkpoint, strategy: Any, privacy: Any) -> None:
    """Put a checkpoint's run state back into ``strategy`` and ``privacy`` (a resumed run)."""
    for attr, values in checkpoint.strategy_state.items():
        if hasattr(strategy, attr):
            setattr(strategy, attr, dict(values))
    if privacy is not None and checkpoint.privacy is not None:
        privacy.load_state_dict(checkpoint.privacy)
