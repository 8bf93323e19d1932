"""examples/prepare_data.py: digits sharding (IID and label-skewed), files and configs."""

from __future__ import annotations

import importlib.util
import json
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("sklearn")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _prepare_data() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prepare_data", EXAMPLES / "prepare_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_iid_shards_partition_the_training_set(tmp_path: Path) -> None:
    manifest = _prepare_data().prepare(nodes=3, workers_dir=tmp_path, quiet=True)
    shards = [load_file(str(tmp_path / "data" / f"{n}.safetensors")) for n in ("alice", "bob", "charlie")]
    test = load_file(str(tmp_path / "data" / "test.safetensors"))
    sizes = [len(s["y"]) for s in shards]
    assert sum(sizes) + len(test["y"]) == 1797 and max(sizes) - min(sizes) <= 1
    assert all(s["x"].shape[1] == 64 and s["x"].dtype == torch.float32 and 0 <= s["x"].min() for s in shards)
    assert all(len(s["y"].unique()) == 10 for s in shards)  # every node sees every digit
    assert manifest["mode"] == "iid" and json.loads((tmp_path / "data" / "manifest.json").read_text()) == manifest
    config = tomllib.loads((tmp_path / "bob.toml").read_text())
    assert config["id"] == "bob" and config["port"] == 8778
    assert [d["key"] for d in config["data"]] == ["x", "y"] and "#train" in config["data"][0]["tags"]


def test_non_iid_shards_are_label_skewed(tmp_path: Path) -> None:
    manifest = _prepare_data().prepare(nodes=3, non_iid=True, workers_dir=tmp_path, quiet=True)
    home = {"alice": range(0, 4), "bob": range(4, 7), "charlie": range(7, 10)}
    for name, info in manifest["nodes"].items():
        own = sum(n for c, n in info["labels"].items() if int(c) in home[name])
        assert own / info["examples"] > 0.8, name
