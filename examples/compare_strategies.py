"""Every federated strategy on the demo's non-IID split: accuracy after a fixed number of rounds.

The demo's data and model (``examples/federated_demo.py``: sklearn digits on alice, bob and
charlie, a 64-64-10 MLP, 2 local epochs of SGD at lr 0.1 per round), with Dirichlet label
skew (``--alpha``, default 0.3, seed 0), trained with each strategy for ``--rounds``
(default 10) on in-process VirtualWorkers (the same plans a node runs, without processes).
Prints one row per strategy: the final model's accuracy on the coordinator's test set
(central), and the mean over the nodes of each node's accuracy on its own held-out shard
(federated evaluation), plus the worst node::

    python examples/compare_strategies.py
    python examples/compare_strategies.py --alpha 0.1 --rounds 20 --strategies fedavg,fedprox
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import fedws as sy
from fedws.fl import FedAvg, FedAvgConfig
from fedws.fl.strategies import strategy_names

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import federated_demo as demo  # noqa: E402  (the demo's data, model and strategy defaults)

sys.path.remove(str(HERE))


def compare(strategies: list[str], *, alpha: float, rounds: int, seed: int = 0, local_epochs: int = 2,
            lr: float = 0.1) -> list[dict[str, Any]]:
    """Train once per strategy on the same split; one result row per strategy."""
    torch.set_num_threads(1)
    demo.HOOK = hook = sy.TorchHook(torch)
    cfg = FedAvgConfig(rounds=rounds, local_epochs=local_epochs, lr=lr, seed=seed, min_nodes=2,
                       data_tags=("#digits", "#train"), evaluate_on_nodes=True, eval_tags=("#digits", "#test"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedws-compare-") as tmp:
        data = demo.make_data(Path(tmp), non_iid=False, alpha=alpha, seed=seed, port=None)
        from fedws.node_config import load_config, load_tensor

        shards = []
        for path in data.configs:
            c = load_config(path)
            shards.append((c.id, [load_tensor(e).tag(*e.tags) for e in c.data]))
        for name in strategies:
            workers = [sy.VirtualWorker(hook, id=wid, data=tensors) for wid, tensors in shards]
            t0 = time.perf_counter()
            history = FedAvg(demo.make_model(seed), workers, cfg, test_data=data.test, progress=False,
                             strategy=demo.make_strategy(name, len(workers))).fit()
            node_acc = {n: v["accuracy"] for n, v in history[-1].node_metrics.items()}
            rows.append({
                "strategy": name,
                "central": history[-1].test_accuracy,
                "per_node_mean": sum(node_acc.values()) / len(node_acc),
                "worst_node": min(node_acc.values()),
                "per_round": history.test_accuracies,
                "node_accuracy": {n: history.node_metric(n, "accuracy") for n in sorted(node_acc)},
                "seconds": time.perf_counter() - t0,
            })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows."""
    lines = ["| strategy | final central acc | mean per-node acc | worst node |", "|---|---|---|---|"]
    lines += [f"| {r['strategy']} | {r['central']:.3f} | {r['per_node_mean']:.3f} | {r['worst_node']:.3f} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet label skew (default 0.3)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", default=",".join(strategy_names()),
                        help="comma-separated names (default: every strategy)")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    t0 = time.perf_counter()
    rows = compare(names, alpha=args.alpha, rounds=args.rounds, seed=args.seed)
    print(f"3 nodes, Dirichlet(alpha={args.alpha:g}) label skew, seed {args.seed}, {args.rounds} rounds x 2 local "
          "epochs of SGD (lr 0.1), library defaults (krum: f=0)\n")
    print(table(rows))
    print(f"\nwall time: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
