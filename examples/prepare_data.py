"""Shard scikit-learn's handwritten digits across worker nodes (nothing is downloaded).

Writes, under ``workers/data/`` (gitignored):

* ``<node>.safetensors`` — that node's training shard: ``x`` (N, 64) float32 in [0, 1] and
  ``y`` (N,) int64 labels;
* ``test.safetensors`` — the held-out test set the coordinator scores the model on;
* ``manifest.json`` — how the shards were made (mode, seed, sizes, labels per node).

and a node config ``workers/<node>.toml`` for any node that has none (ports from 8777).

Usage::

    python examples/prepare_data.py                 # 3 nodes, IID
    python examples/prepare_data.py --non-iid       # each node sees mostly 3-4 digits
    python examples/prepare_data.py --nodes 5
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ROOT / "workers"
NAMES = ["alice", "bob", "charlie", "dave", "eve", "frank", "grace", "heidi"]
BASE_PORT = 8777
# In --non-iid mode a node gets this share of the examples of its own digits; the rest of
# each digit is spread over the other nodes.
SKEW = 0.9


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 digits bundled with scikit-learn, as (x in [0, 1], y)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    return x, y


def split_train_test(
    x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def shard_indices(y: torch.Tensor, nodes: int, non_iid: bool, seed: int) -> list[torch.Tensor]:
    """Which training examples each node gets.

    IID: a random equal split. Non-IID: the digits are dealt out in contiguous groups
    (0-3, 4-6, 7-9 for three nodes); each example goes to its digit's node with
    probability ``SKEW``, otherwise to another node at random — label skew, as in real
    federations where each site sees its own population.
    """
    g = torch.Generator().manual_seed(seed + 1)
    if not non_iid:
        order = torch.randperm(len(y), generator=g)
        return [part.sort().values for part in torch.tensor_split(order, nodes)]
    classes = int(y.max()) + 1
    owner_of_class = [c * nodes // classes for c in range(classes)]
    assign = torch.empty(len(y), dtype=torch.int64)
    coins = torch.rand(len(y), generator=g)
    others = torch.randint(0, max(nodes - 1, 1), (len(y),), generator=g)
    for i, label in enumerate(y.tolist()):
        home = owner_of_class[label]
        if coins[i] < SKEW or nodes == 1:
            assign[i] = home
        else:  # one of the other nodes, uniformly
            assign[i] = others[i] + (others[i] >= home)
    return [torch.nonzero(assign == k).flatten() for k in range(nodes)]


def node_config(name: str, port: int, shard: int, nodes: int) -> str:
    desc = f"digits, training shard {shard} of {nodes}"
    return (
        f'id = "{name}"\nhost = "127.0.0.1"\nport = {port}\nmax_store_mb = 256\n\n'
        f'[[data]]\nfile = "data/{name}.safetensors"\nkey = "x"\n'
        f'tags = ["#digits", "#train", "#x"]\ndescription = "{desc}: images (N, 64) in [0, 1]"\n\n'
        f'[[data]]\nfile = "data/{name}.safetensors"\nkey = "y"\n'
        f'tags = ["#digits", "#train", "#y"]\ndescription = "{desc}: labels (N,)"\n'
    )


def prepare(nodes: int = 3, non_iid: bool = False, seed: int = 0, test_fraction: float = 0.2,
            workers_dir: Path = WORKERS, quiet: bool = False) -> dict:
    """Write the shards, the test set, the manifest and missing node configs; return the manifest."""
    if not 1 <= nodes <= len(NAMES):
        raise ValueError(f"--nodes must be between 1 and {len(NAMES)}")
    data_dir = workers_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    x, y = load_digits_tensors()
    (x_train, y_train), (x_test, y_test) = split_train_test(x, y, test_fraction, seed)
    save_file({"x": x_test.contiguous(), "y": y_test.contiguous()}, str(data_dir / "test.safetensors"))
    manifest: dict = {"dataset": "sklearn digits", "mode": "non-iid" if non_iid else "iid", "seed": seed,
                      "test_examples": len(y_test), "nodes": {}}
    for k, idx in enumerate(shard_indices(y_train, nodes, non_iid, seed)):
        name = NAMES[k]
        save_file({"x": x_train[idx].contiguous(), "y": y_train[idx].contiguous()},
                  str(data_dir / f"{name}.safetensors"))
        labels = Counter(y_train[idx].tolist())
        manifest["nodes"][name] = {"examples": len(idx), "labels": {str(c): labels[c] for c in sorted(labels)}}
        config = workers_dir / f"{name}.toml"
        if not config.exists():
            config.write_text(node_config(name, BASE_PORT + k, k + 1, nodes))
        if not quiet:
            top = ", ".join(f"{c}:{n}" for c, n in sorted(labels.items()))
            print(f"{name:>8}: {len(idx):4d} examples  labels {{{top}}}")
    (data_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if not quiet:
        print(f"    test: {len(y_test):4d} examples  -> {data_dir}")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3, help="how many nodes to shard across (default 3)")
    parser.add_argument("--non-iid", action="store_true", help="skewed label sets per node")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    args = parser.parse_args(argv)
    prepare(args.nodes, args.non_iid, args.seed, args.test_fraction)


if __name__ == "__main__":
    main()
