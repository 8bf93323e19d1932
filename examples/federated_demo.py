"""Federated training of a digits classifier across three worker nodes (``make demo``).

1. shards scikit-learn's bundled digits (nothing is downloaded) into a fresh directory:
   each node gets a training shard (today's split: ``examples/prepare_data.py``; or
   Dirichlet label skew with ``--alpha``) and a held-out shard drawn from the test set with
   its own label mix,
2. starts one node process per ``workers/*.toml`` (alice, bob, charlie on ports
   8777-8779) serving those shards under tags. The nodes run in the private policy (the
   default of ``fedws worker``): no coordinator can read the shards or anything computed
   from them, except what a plan the operator approved computes. The demo plays the
   operator too: it computes the digests of the training-step plan and of the evaluation
   plan and starts each node with ``--approve-plan <digest>`` (and an audit log in
   ``workers/run/``),
3. trains a small MLP federated (FedAvg by default, ``--strategy`` for others): every
   round the model goes to the nodes, trains there on data the coordinator never sees
   (one training-step plan call per minibatch), only the parameters come back, and each
   node scores the new model on its held-out shard (only the sums leave it),
4. trains the same model centrally on the pooled data, for comparison,
5. prints the accuracies, writes ``examples/output/federated_demo.png`` (loss; central
   accuracy; each node's own accuracy per round) with the plotted series beside it as
   ``.json``, and stops the nodes.

On nodes someone else started (``make workers``, or ``fedws worker`` on other machines)::

    python examples/federated_demo.py --print-digest     # what their operators approve
    python examples/federated_demo.py --nodes ws://host1:8777,ws://host2:8777 --token-file tok

Options: ``--non-iid`` (each node sees mostly its own digits), ``--alpha A`` (Dirichlet label
skew), ``--strategy``, ``--optimizer``/``--lr``, ``--secure-agg``, ``--dp-epsilon``,
``--trusted`` (average on a trusted aggregator node: the coordinator receives only the
averages), ``--virtual`` (in-process VirtualWorkers instead of node processes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import fedws as sy
from fedws.fl import (
    DPConfig,
    FedAvg,
    FedAvgConfig,
    History,
    Krum,
    LocalStep,
    OptimizerSpec,
    RoundMetrics,
    Strategy,
    default_train_step,
    evaluate,
    evaluation_plan_digest,
    get_strategy,
    local_step,
    step_plan_digest,
    training_plan_digest,
)
from fedws.fl.dp import epsilon_for
from fedws.fl.partition import dirichlet
from fedws.fl.strategies import strategy_names

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKERS = ROOT / "workers"
DATA = WORKERS / "data"
OUTPUT = HERE / "output"
NODE_NAMES = ["alice", "bob", "charlie"]
X_LIKE, Y_LIKE = ((64,), torch.float32), ((), torch.int64)
OPTIMIZERS = ("sgd", "adam", "adamw")
DEFAULT_LR = {"sgd": 0.1, "adam": 0.01, "adamw": 0.01}
HOOK: Any = None  # the federation's hook (main() makes it): VirtualWorkers join it


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


# -- the data -------------------------------------------------------------------------------


@dataclass
class DemoData:
    """The shards of one run: node configs to start from, and what the coordinator holds."""

    configs: list[Path]
    train: tuple[torch.Tensor, torch.Tensor]  # pooled training shards: the central baseline only
    test: tuple[torch.Tensor, torch.Tensor]  # the coordinator's held-out set
    labels: dict[str, dict[int, int]]  # node -> label -> training examples


def _prepare_data_module() -> Any:
    sys.path.insert(0, str(HERE))
    try:
        import prepare_data
    finally:
        sys.path.remove(str(HERE))
    return prepare_data


def split_indices(y: torch.Tensor, nodes: int, *, non_iid: bool, alpha: float | None, seed: int) -> list[torch.Tensor]:
    """Which training examples each node gets: Dirichlet(alpha) label skew, else today's
    split of ``examples/prepare_data.py`` (IID, or ``--non-iid``'s 90 % own digits)."""
    if alpha is not None:
        return [torch.tensor(sorted(part), dtype=torch.int64) for part in dirichlet(y, nodes, alpha, seed=seed)]
    return list(_prepare_data_module().shard_indices(y, nodes, non_iid, seed))


def held_out_indices(y_test: torch.Tensor, labels: list[dict[int, int]], seed: int) -> list[torch.Tensor]:
    """Deal the test set to the nodes, each example to a node with probability proportional
    to that node's share of its label in training: each node is scored on its own population."""
    g = torch.Generator().manual_seed(seed + 2)
    owner = torch.empty(len(y_test), dtype=torch.int64)
    for i, c in enumerate(y_test.tolist()):
        weights = torch.tensor([float(n.get(c, 0)) for n in labels]) + 1e-3
        owner[i] = torch.multinomial(weights / weights.sum(), 1, generator=g)
    return [torch.nonzero(owner == k).flatten() for k in range(len(labels))]


def node_config(name: str, template: Path, port: int | None) -> str:
    """A node's config: id, address and threads from ``workers/<name>.toml``, the data here."""
    from fedws.node_config import load_config

    cfg = load_config(template)
    lines = [f'id = "{cfg.id}"', f'host = "{cfg.host}"', f"port = {cfg.port if port is None else port}",
             "max_store_mb = 256", "threads = 1", ""]
    for split, tag in (("train", "#train"), ("test", "#test")):
        for key, role in (("x", "#x"), ("y", "#y")):
            lines += ["[[data]]", f'file = "{name}.safetensors"', f'key = "{key}_{split}"',
                      f'tags = ["#digits", "{tag}", "{role}"]', f'description = "digits, {split} shard of {name}"', ""]
    return "\n".join(lines)


def make_data(directory: Path, *, non_iid: bool, alpha: float | None, seed: int, port: int | None) -> DemoData:
    """Write each node's shards and config into ``directory``; the pooled train and test sets."""
    prep = _prepare_data_module()
    x, y = prep.load_digits_tensors()
    (x_train, y_train), (x_test, y_test) = prep.split_train_test(x, y, 0.2, seed)
    parts = split_indices(y_train, len(NODE_NAMES), non_iid=non_iid, alpha=alpha, seed=seed)
    labels = [{c: int((y_train[idx] == c).sum()) for c in range(10) if (y_train[idx] == c).any()} for idx in parts]
    held = held_out_indices(y_test, labels, seed)
    configs = []
    for k, (name, idx, hidx) in enumerate(zip(NODE_NAMES, parts, held)):
        save_file({"x_train": x_train[idx].contiguous(), "y_train": y_train[idx].contiguous(),
                   "x_test": x_test[hidx].contiguous(), "y_test": y_test[hidx].contiguous()},
                  str(directory / f"{name}.safetensors"))
        config = directory / f"{name}.toml"
        config.write_text(node_config(name, WORKERS / f"{name}.toml", port + k if port else port))
        configs.append(config)
    pooled = torch.cat(parts)
    return DemoData(configs, (x_train[pooled], y_train[pooled]), (x_test, y_test), dict(zip(NODE_NAMES, labels)))


# -- the federation -------------------------------------------------------------------------


@contextlib.contextmanager
def network_federation(
    configs: list[Path], trusted: bool, approved: list[str], dial_out: bool = False
) -> Iterator[tuple[list[sy.Worker], sy.Worker | None]]:
    """Private node processes from the configs (stopped on exit), and connected handles to them.

    ``approved`` are the digests of the training-step and evaluation plans: the release
    rules this run needs.
    """
    from fedws.launch import start_node

    # Node processes inherit this: one torch thread each, or 3 nodes + the coordinator
    # fight over the cores for a model this small.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with contextlib.ExitStack() as stack:
        listener, dial = None, list[str]()
        if dial_out:  # nodes behind firewalls: this coordinator listens and the nodes dial it
            if trusted:
                raise SystemExit("federated_demo: --trusted needs nodes that reach each other; dial-out nodes "
                                 "cannot (no relay through the coordinator yet)")
            token_file = WORKERS / "run" / "dialout.token"
            token_file.parent.mkdir(parents=True, exist_ok=True)
            token_file.write_text(secrets.token_hex(16))
            token_file.chmod(0o600)
            listener = sy.serve("127.0.0.1", 0, token=token_file.read_text())
            stack.callback(listener.close)
            dial = ["--token-file", str(token_file)]
            print(f"  coordinator listening on {listener.url}; nodes dial out to it")

        def start(config: Path) -> Any:
            # The operator's part: approve the plans this run needs, keep an audit log.
            audit = WORKERS / "run" / f"audit-{config.stem}.jsonl"
            extra = [a for d in approved for a in ("--approve-plan", d)] + ["--audit-log", str(audit), *dial]
            return start_node(config, extra_args=extra, connect=listener.url if listener is not None else None)

        # All at once: each node spends its start-up importing torch.
        with ThreadPoolExecutor(len(configs)) as pool:
            starting = [pool.submit(start, c) for c in configs]
        nodes, failed = [], None
        for config, future in zip(configs, starting):
            try:
                n = future.result()
            except RuntimeError as exc:
                failed = failed or (config, exc)
                continue
            stack.callback(n.stop)
            nodes.append(n)
        if failed is not None:
            last = [line for line in str(failed[1]).splitlines() if line.strip()][-1]
            raise SystemExit(f"federated_demo: cannot start {failed[0].stem}: {last.strip()} — to train on "
                             "nodes already running, use --nodes URL,URL (see --help)")
        for n in nodes:
            print(f"  node {n.id:<8} pid {n.pid:<7} {n.url}")
        if listener is not None:
            workers: list[sy.Worker] = list(listener.wait_for_nodes(len(nodes), timeout=60))
        else:
            workers = [stack.enter_context(sy.connect(n.url)) for n in nodes]
        aggregator = None
        if trusted:
            # its config lists the nodes it may link to: a node connects nowhere else
            secure = start_node(WORKERS / "secure_worker.toml")
            stack.callback(secure.stop)
            print(f"  node {secure.id:<8} pid {secure.pid:<7} {secure.url} (aggregator)")
            aggregator = stack.enter_context(sy.connect(secure.url))
        yield workers, aggregator


@contextlib.contextmanager
def remote_federation(
    urls: list[str], token: str | None
) -> Iterator[tuple[list[sy.Worker], sy.Worker | None]]:
    """Handles to nodes someone else started and runs (never stopped here)."""
    with contextlib.ExitStack() as stack:
        workers = []
        for url in urls:
            w = stack.enter_context(sy.connect(url, token))
            print(f"  node {w.id:<8} {url}  (ping {w.ping() * 1000:.1f} ms)")
            workers.append(w)
        yield workers, None


@contextlib.contextmanager
def virtual_federation(configs: list[Path], trusted: bool) -> Iterator[tuple[list[sy.Worker], sy.Worker | None]]:
    """VirtualWorkers holding what the node configs say, in this process."""
    from fedws.node_config import load_config, load_tensor

    workers = []
    for path in configs:
        cfg = load_config(path)
        data = [load_tensor(e).tag(*e.tags).describe(e.description or "") for e in cfg.data]
        workers.append(sy.VirtualWorker(HOOK, id=cfg.id, data=data))
        print(f"  virtual node {cfg.id:<8} ({len(data)} tensors from {path.name})")
    aggregator = sy.VirtualWorker(HOOK, id="secure_worker") if trusted else None
    yield workers, aggregator


# -- what the run trains with -----------------------------------------------------------------


def make_strategy(name: str, nodes: int) -> Strategy:
    """The library's strategy by name, with its defaults; Krum tolerates as many byzantine
    nodes as ``nodes`` allows (it needs more than ``2f + 2`` answers: f=0 for 3 nodes)."""
    if get_strategy(name).name == "krum":
        return Krum(f=max(0, (nodes - 3) // 2))
    return get_strategy(name)


def noise_for_epsilon(epsilon: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier (to 1 %) whose epsilon after ``rounds`` full-participation
    rounds stays within ``epsilon`` (the accountant FedAvg reports with: Opacus's RDP)."""
    lo, hi = 0.05, 1.0
    while epsilon_for(hi, 1.0, rounds, delta) > epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"--dp-epsilon {epsilon} is out of reach in {rounds} rounds")
    while hi - lo > 0.01 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if epsilon_for(mid, 1.0, rounds, delta) > epsilon else (lo, mid)
    return hi


def dp_config(args: argparse.Namespace) -> DPConfig | None:
    if args.dp_epsilon is None:
        return None
    if not args.dp_epsilon > 0:
        raise ValueError(f"--dp-epsilon must be > 0, got {args.dp_epsilon}")
    delta = 1e-5
    # With --secure-agg the coordinator never sees one node's update to clip: the nodes add
    # their shares of the noise under the mask (distributed DP) unless told otherwise.
    mode = args.dp_mode or ("distributed" if args.secure_agg else "central")
    return DPConfig(mode=mode, clip=args.dp_clip, delta=delta,
                    noise_multiplier=noise_for_epsilon(args.dp_epsilon, args.rounds, delta))


def fedavg_kwargs(args: argparse.Namespace, nodes: int) -> dict[str, Any]:
    """What the flags ask of :class:`FedAvg` (strategy, optimizer, secure aggregation, DP)."""
    kw: dict[str, Any] = {"strategy": make_strategy(args.strategy, nodes), "dp": dp_config(args),
                          "secure_aggregation": args.secure_agg, "progress": False}
    if args.optimizer != "sgd":
        kw["optimizer"] = args.optimizer
    return kw


def check_combination(args: argparse.Namespace, nodes: int) -> None:
    """Let the library refuse what it refuses, before any node starts: FedAvg's own checks
    run against in-process stand-ins. Raises ValueError with the library's message."""
    stand_ins = [sy.VirtualWorker(HOOK, id=f"check-{i}") for i in range(nodes)]
    aggregator = sy.VirtualWorker(HOOK, id="check-aggregator") if args.trusted else None
    FedAvg(make_model(args.seed), stand_ins, FedAvgConfig(lr=args.lr), aggregator=aggregator,
           **fedavg_kwargs(args, nodes))


def plan_digests(seed: int, cfg: FedAvgConfig, optimizer: str = "sgd", strategy: str = "fedavg") -> tuple[str, str]:
    """The digests of the training-step plan and of the evaluation plan for this model on
    digits shards (64 float32 features, int64 labels): what a node's operator approves."""
    model = make_model(seed)
    proximal = get_strategy(strategy).name == "fedprox"  # FedProx's term is in the step plan
    if optimizer == "sgd" and not proximal:
        train = training_plan_digest(model, cfg, x_like=X_LIKE, y_like=Y_LIKE)
    else:
        if optimizer == "sgd":  # what FedAvg runs for SGD with a round config
            step = LocalStep(default_train_step(F.cross_entropy),
                             OptimizerSpec.of("SGD", {"lr": cfg.lr, "momentum": cfg.momentum}))
        else:
            step = local_step(optimizer=optimizer, default_lr=cfg.lr, default_momentum=cfg.momentum)
        train = step_plan_digest(model, step, x_like=X_LIKE, y_like=Y_LIKE, proximal=proximal)
    return train, evaluation_plan_digest(model, x_like=X_LIKE, y_like=Y_LIKE)


def plan_digest(seed: int, cfg: FedAvgConfig, optimizer: str = "sgd", strategy: str = "fedavg") -> str:
    """The digest of the training-step plan alone (``--print-digest``, ``--approve-plan``)."""
    return plan_digests(seed, cfg, optimizer, strategy)[0]


# -- training -------------------------------------------------------------------------------


def train_central(model: nn.Module, x: torch.Tensor, y: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor],
                  cfg: FedAvgConfig, optimizer: str = "sgd") -> list[tuple[float, float]]:
    """Plain minibatch training on the pooled data: the nodes' optimizer and budget of epochs."""
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    else:
        opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW)(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    curve = []
    for _round in range(cfg.rounds):
        total, seen = 0.0, 0
        for _epoch in range(cfg.local_epochs):
            order = torch.randperm(len(y), generator=g)
            for lo in range(0, len(y), cfg.batch_size):
                idx = order[lo : lo + cfg.batch_size]
                opt.zero_grad()
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                seen += len(idx)
        curve.append((total / seen, evaluate(model, *test, F.cross_entropy)[1]))
    return curve


def plot_series(history: History, central: list[tuple[float, float]], label: str) -> dict[str, Any]:
    """Every series the plot draws, by name (also written beside the PNG as JSON)."""
    nodes = sorted({n for r in history for n in r.node_metrics})
    return {
        "label": label,
        "rounds": [r.round for r in history],
        "train_loss": history.train_losses,
        "central_accuracy": history.test_accuracies,  # the federated model on the coordinator's test set
        "federated_accuracy": history.metric("accuracy", federated=True),  # over every node's held-out shard
        "node_accuracy": {n: history.node_metric(n, "accuracy") for n in nodes},
        "central_training": {"loss": [c[0] for c in central], "accuracy": [c[1] for c in central]},
        "epsilon": history.epsilons,
    }


def plot(series: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds, label = series["rounds"], series["label"]
    central = series["central_training"]
    per_node = series["node_accuracy"]
    fig, axes = plt.subplots(1, 3 if per_node else 2, figsize=(15 if per_node else 10, 4))
    ax_loss, ax_acc = axes[0], axes[1]
    ax_loss.plot(rounds, series["train_loss"], "o-", label=f"{label} (mean local loss)")
    if central["loss"]:
        ax_loss.plot(rounds, central["loss"], "s--", label="central")
    ax_loss.set(xlabel="round", ylabel="training loss", title="loss")
    ax_acc.plot(rounds, series["central_accuracy"], "o-", label=f"{label} (coordinator's test set)")
    if any(v is not None for v in series["federated_accuracy"]):
        ax_acc.plot(rounds, series["federated_accuracy"], "^-", label=f"{label} (nodes' held-out shards)")
    if central["accuracy"]:
        ax_acc.plot(rounds, central["accuracy"], "s--", label="central training")
    ax_acc.set(xlabel="round", ylabel="test accuracy", title="accuracy", ylim=(0, 1))
    used = [ax_loss, ax_acc]
    if per_node:
        ax_node = axes[2]
        for node, accs in per_node.items():
            ax_node.plot(rounds, accs, "o-", label=node)
        ax_node.plot(rounds, series["central_accuracy"], "k--", label="central test set")
        ax_node.set(xlabel="round", ylabel="accuracy", title="federated evaluation per node", ylim=(0, 1))
        used.append(ax_node)
    for ax in used:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    path.with_suffix(".json").write_text(json.dumps(series, indent=1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None,
                        help="local learning rate (default 0.1 for sgd, 0.01 for adam and adamw)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategy", default="fedavg", type=lambda s: s.strip().lower().replace("-", "_"),
                        choices=strategy_names(), metavar="NAME",
                        help=f"how the server combines the nodes' models: {', '.join(strategy_names())} "
                             "(trimmed-mean also works; krum uses f=0 on 3 nodes). Default fedavg")
    parser.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS, help="the nodes' local optimizer (default sgd)")
    parser.add_argument("--secure-agg", action="store_true",
                        help="secure aggregation: the nodes mask their updates, the coordinator unmasks only the sum")
    parser.add_argument("--dp-epsilon", type=float, metavar="E",
                        help="differential privacy: noise calibrated so that epsilon after --rounds rounds is at "
                             "most E (delta 1e-5); see --dp-mode")
    parser.add_argument("--dp-mode", choices=("central", "local", "distributed"), default=None,
                        help="central (default: the coordinator clips each update and noises their average; "
                             "the noise is divided by the node count, so it costs far less accuracy), local "
                             "(each node clips and noises its own update before it leaves) or distributed "
                             "(default with --secure-agg: each node adds its share of the noise under the mask)")
    parser.add_argument("--dp-clip", type=float, default=1.0, help="L2 bound of one node's update under DP (default 1)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--non-iid", action="store_true", help="shard with skewed label sets per node")
    split.add_argument("--alpha", type=float, metavar="A",
                       help="Dirichlet label skew (fedws.fl.partition.dirichlet): small A, few digits per node")
    parser.add_argument("--trusted", action="store_true", help="average on a trusted aggregator node")
    parser.add_argument("--virtual", action="store_true", help="in-process VirtualWorkers instead of node processes")
    parser.add_argument("--dial-out", action="store_true",
                        help="the node processes dial out to this coordinator (fedws worker --connect), as nodes "
                        "behind firewalls do, instead of listening")
    parser.add_argument("--base-port", type=int, metavar="PORT",
                        help="the nodes listen on PORT, PORT+1, ... (default: workers/*.toml's 8777-8779; 0: free ports)")
    parser.add_argument("--nodes", metavar="URL,URL,...",
                        help="train on these running nodes (their data tagged #digits #train) instead of starting any")
    parser.add_argument("--token-file", type=Path, help="file holding the nodes' token (default: $FEDWS_TOKEN)")
    parser.add_argument("--test-data", type=Path, default=DATA / "test.safetensors",
                        help="held-out set (x, y) the coordinator scores on with --nodes (default: workers/data/test.safetensors)")
    parser.add_argument("--print-digest", action="store_true",
                        help="print the training plan's digest (what the nodes' operators approve) and exit")
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
    if args.alpha is not None and not args.alpha > 0:
        parser.error(f"--alpha must be > 0, got {args.alpha}")

    t0 = time.perf_counter()
    torch.set_num_threads(1)  # a tiny model: extra threads only contend on a small machine
    cfg = FedAvgConfig(rounds=args.rounds, local_epochs=args.local_epochs, batch_size=args.batch_size,
                       lr=args.lr, seed=args.seed, min_nodes=2, round_timeout=60.0, data_tags=("#digits", "#train"),
                       evaluate_on_nodes=not args.nodes, eval_tags=("#digits", "#test"))
    global HOOK
    HOOK = sy.TorchHook(torch)  # the federation's hook: workers below join it
    nodes = len(args.nodes.split(",")) if args.nodes else len(NODE_NAMES)
    try:  # what the library refuses, refused here: before any node starts
        check_combination(args, nodes)
    except ValueError as exc:
        chosen = [f"--strategy {args.strategy}"] + [flag for flag, on in (
            ("--secure-agg", args.secure_agg), (f"--dp-epsilon {args.dp_epsilon}", args.dp_epsilon is not None),
            ("--trusted", args.trusted)) if on]
        parser.exit(2, f"federated_demo: error: {' '.join(chosen)} do not combine: {str(exc).splitlines()[0]}\n")
    if args.print_digest:
        print(plan_digest(args.seed, cfg, args.optimizer, args.strategy))
        return 0
    if args.nodes:
        return train_on_nodes(args, cfg)
    with tempfile.TemporaryDirectory(prefix="fedws-demo-") as tmp:
        data = make_data(Path(tmp), non_iid=args.non_iid, alpha=args.alpha, seed=args.seed, port=args.base_port)
        return train_locally(args, cfg, data, t0)


def split_name(args: argparse.Namespace) -> str:
    if args.alpha is not None:
        return f"Dirichlet(alpha={args.alpha:g})"
    return "non-IID" if args.non_iid else "IID"


def train_locally(args: argparse.Namespace, cfg: FedAvgConfig, data: DemoData, t0: float) -> int:
    """Start the nodes (or VirtualWorkers), train federated and centrally, report and plot."""
    mode = "virtual" if args.virtual else "network"
    if mode == "network":
        try:
            import fedws.launch  # noqa: F401
        except ImportError:
            mode = "virtual"
            print("fedws.launch is not available: falling back to in-process VirtualWorkers (--virtual)")
    if mode == "network":
        # What the nodes' operator approves: the digests of the training-step plan (this
        # model, loss, optimizer and data signature) and of the evaluation plan.
        approved = list(plan_digests(args.seed, cfg, args.optimizer, args.strategy))
        print(f"private nodes; approved plans: train_step sha256 {approved[0][:16]}..., "
              f"evaluate sha256 {approved[1][:16]}...")

        def federation(configs: list[Path], trusted: bool) -> contextlib.AbstractContextManager[Any]:
            return network_federation(configs, trusted, approved, args.dial_out)
    else:
        federation = virtual_federation
    shards = split_name(args)
    kwargs = fedavg_kwargs(args, len(data.configs))
    strategy: Strategy = kwargs["strategy"]
    label = "FedAvg" if strategy.name == "fedavg" else strategy.name
    extras = [", trusted aggregator" if args.trusted else "", ", secure aggregation" if args.secure_agg else ""]
    if kwargs["dp"] is not None:
        dp = kwargs["dp"]
        extras.append(f", {dp.mode} DP (epsilon <= {args.dp_epsilon:g}: noise multiplier {dp.noise_multiplier:.2f},"
                      f" clip {dp.clip:g})")
    print(f"mode: {mode} — {len(data.configs)} nodes from workers/*.toml, {shards} shards{''.join(extras)}")
    print(f"strategy: {strategy!r}; local optimizer {args.optimizer} (lr {cfg.lr:g})")
    for name, labels in data.labels.items():
        print(f"  {name:>8}: labels {{{', '.join(f'{c}:{n}' for c, n in sorted(labels.items()))}}}")

    def report(m: RoundMetrics) -> None:
        dropped = f"  dropped {sorted(m.dropped)}" if m.dropped else ""
        eps = f"  epsilon {m.epsilon:.2f}" if m.epsilon is not None else ""
        per_node = " ".join(f"{n} {v.get('accuracy', float('nan')):.2f}" for n, v in sorted(m.node_metrics.items()))
        print(f"round {m.round:2d}/{cfg.rounds}  train loss {m.train_loss:.4f}  test acc {m.test_accuracy:.3f}"
              f"  nodes {','.join(m.nodes)}  ({m.seconds:.2f} s){eps}{dropped}")
        if per_node:
            print(f"          per-node acc  {per_node}")

    with federation(data.configs, args.trusted) as (workers, aggregator):
        model = make_model(args.seed)
        t_fed = time.perf_counter()
        history = FedAvg(model, workers, cfg, test_data=data.test, aggregator=aggregator, on_round=report,
                         **kwargs).fit()
        t_fed = time.perf_counter() - t_fed

    t_central = time.perf_counter()
    central = train_central(make_model(args.seed), *data.train, data.test, cfg, args.optimizer)
    t_central = time.perf_counter() - t_central
    fed_acc, central_acc = history[-1].test_accuracy, central[-1][1]
    print(f"\ntest accuracy after {cfg.rounds} rounds x {cfg.local_epochs} local epochs:")
    print(f"  {label:<7} ({mode}, {shards}): {fed_acc:.3f}   ({t_fed:.1f} s)")
    print(f"  central (pooled data):   {central_acc:.3f}   ({t_central:.1f} s)")
    last = history[-1]
    if last.node_metrics:
        accs = ", ".join(f"{n} {v['accuracy']:.3f}" for n, v in sorted(last.node_metrics.items()))
        print(f"  each node's held-out shard: {accs}  (all: {last.federated_metrics.get('accuracy', 0.0):.3f})")
    if last.epsilon is not None:
        print(f"  privacy spent: epsilon {last.epsilon:.2f} at delta {kwargs['dp'].delta:g}")
    if not args.no_plot:
        stem = "federated_demo" if args.alpha is None and not args.non_iid else "federated_demo_non_iid"
        out = OUTPUT / f"{stem}.png"
        plot(plot_series(history, central, label), out,
             f"{label} on {len(workers)} {mode} nodes ({shards}) vs central training")
        print(f"plot: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(f"wall time: {time.perf_counter() - t0:.1f} s")
    return 0


def train_on_nodes(args: argparse.Namespace, cfg: FedAvgConfig) -> int:
    """Training on running nodes: connect, train, report; nothing is started or stopped here."""
    urls = [u.strip() for u in args.nodes.split(",") if u.strip()]
    if len(urls) < cfg.min_nodes:
        print(f"federated_demo: --nodes needs at least {cfg.min_nodes} URLs, got {len(urls)}", file=sys.stderr)
        return 2
    try:
        token = args.token_file.read_text().strip() if args.token_file else os.environ.get("FEDWS_TOKEN")
        test_tensors = load_file(str(args.test_data))
    except OSError as exc:
        hint = " (run `python examples/prepare_data.py`, or give --test-data)" if not args.token_file else ""
        print(f"federated_demo: {exc.strerror or exc}: {exc.filename}{hint}", file=sys.stderr)
        return 2
    test = (test_tensors["x"], test_tensors["y"])
    print(f"training on {len(urls)} running nodes; their operators approve the plan "
          f"{plan_digest(args.seed, cfg, args.optimizer, args.strategy)[:16]}... (--print-digest)")

    def report(m: RoundMetrics) -> None:
        print(f"round {m.round:2d}/{cfg.rounds}  train loss {m.train_loss:.4f}  test acc {m.test_accuracy:.3f}"
              f"  nodes {','.join(m.nodes)}  ({m.seconds:.2f} s)")

    try:
        with remote_federation(urls, token) as (workers, _):
            history = FedAvg(make_model(args.seed), workers, cfg, test_data=test, on_round=report,
                             **fedavg_kwargs(args, len(workers))).fit()
    except (sy.FedwsError, ValueError) as exc:
        print(f"federated_demo: {type(exc).__name__}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"test accuracy after {cfg.rounds} rounds: {history[-1].test_accuracy:.3f}")
    if not args.no_plot:
        out = OUTPUT / "federated_demo_nodes.png"
        plot(plot_series(history, [], "FedAvg"), out, f"FedAvg on {len(urls)} running nodes")
        print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
