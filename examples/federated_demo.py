"""Federated training of a digits classifier across three worker nodes (``make demo``).

1. prepares the data if needed (``examples/prepare_data.py``: sklearn's bundled digits,
   sharded into ``workers/data/``),
2. starts one node process per ``workers/*.toml`` (alice, bob, charlie on ports
   8777-8779); each node loads its own shard and serves it under tags. The nodes run in
   the private policy (the default of ``fedws worker``): no coordinator can read the shards
   or anything computed from them, except what a plan the operator approved computes. The
   demo plays the operator too: it computes the digest of FedAvg's training-step plan and
   starts each node with ``--approve-plan <digest>`` (and an audit log in ``workers/run/``),
3. trains a small MLP with FedAvg: every round the model goes to the nodes, trains there on
   data the coordinator never sees (one training-step plan call per minibatch, sent to
   each node once), and only the parameters come back to be averaged,
4. trains the same model centrally on the pooled data, for comparison,
5. prints both accuracies, writes ``examples/output/federated_demo.png``, stops the nodes.

On nodes someone else started (``make workers``, or ``fedws worker`` on other machines)::

    python examples/federated_demo.py --print-digest     # what their operators approve
    python examples/federated_demo.py --nodes ws://host1:8777,ws://host2:8777 --token-file tok

Options: ``--non-iid`` (each node sees mostly its own digits), ``--trusted`` (average on a
trusted aggregator node: the coordinator receives only the averages), ``--virtual``
(in-process VirtualWorkers loaded from the same configs instead of node processes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import fedws as sy
from fedws.fl import FedAvg, FedAvgConfig, History, RoundMetrics, evaluate, training_plan_digest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKERS = ROOT / "workers"
DATA = WORKERS / "data"
OUTPUT = HERE / "output"
NODE_NAMES = ["alice", "bob", "charlie"]


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def ensure_data(non_iid: bool, seed: int) -> list[Path]:
    """Shard the data unless shards of the wanted kind are already there; return configs."""
    manifest = DATA / "manifest.json"
    want = "non-iid" if non_iid else "iid"
    configs = [WORKERS / f"{n}.toml" for n in NODE_NAMES]
    ready = manifest.exists() and all(c.exists() for c in configs)
    if ready:
        m = json.loads(manifest.read_text())
        ready = m.get("mode") == want and m.get("seed") == seed and sorted(m.get("nodes", {})) == sorted(NODE_NAMES)
    if not ready:
        sys.path.insert(0, str(HERE))
        import prepare_data

        print(f"preparing {want} shards of sklearn digits in {DATA}")
        prepare_data.prepare(nodes=len(NODE_NAMES), non_iid=non_iid, seed=seed)
    return configs


# -- the federation -------------------------------------------------------------------------


@contextlib.contextmanager
def network_federation(
    configs: list[Path], trusted: bool, approved: str, dial_out: bool = False
) -> Iterator[tuple[list[sy.Worker], sy.Worker | None]]:
    """Private node processes from the configs (stopped on exit), and connected handles to them.

    ``approved`` is the digest of the training-step plan: the one release rule FedAvg needs.
    """
    from fedws.launch import start_node

    # Node processes inherit this: one torch thread each, or 3 nodes + the coordinator
    # fight over the cores for a model this small.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with contextlib.ExitStack() as stack:
        nodes = []
        listener, dial = None, []
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
        for config in configs:
            # The operator's part: approve the one plan FedAvg runs, keep an audit log.
            audit = WORKERS / "run" / f"audit-{config.stem}.jsonl"
            try:
                n = start_node(config, extra_args=["--approve-plan", approved, "--audit-log", str(audit), *dial],
                               connect=listener.url if listener is not None else None)
            except RuntimeError as exc:
                last = [line for line in str(exc).splitlines() if line.strip()][-1]
                raise SystemExit(f"federated_demo: cannot start {config.stem}: {last.strip()} — to train on "
                                 "nodes already running, use --nodes URL,URL (see --help)") from None
            stack.callback(n.stop)
            nodes.append(n)
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
        workers.append(sy.VirtualWorker(sy.local_worker.hook, id=cfg.id, data=data))
        print(f"  virtual node {cfg.id:<8} ({len(data)} tensors from {path.name})")
    aggregator = sy.VirtualWorker(sy.local_worker.hook, id="secure_worker") if trusted else None
    yield workers, aggregator


def shard_tensors(configs: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled training data, read from the shard files: only for the central baseline."""
    xs, ys = [], []
    for name in NODE_NAMES:
        t = load_file(str(DATA / f"{name}.safetensors"))
        xs.append(t["x"])
        ys.append(t["y"])
    return torch.cat(xs), torch.cat(ys)


# -- training -------------------------------------------------------------------------------


def train_central(model: nn.Module, x: torch.Tensor, y: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor],
                  cfg: FedAvgConfig) -> list[tuple[float, float]]:
    """Plain minibatch SGD on the pooled data, same budget of epochs as the federation."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
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


def plot(history: History, central: list[tuple[float, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(rounds, history.train_losses, "o-", label="FedAvg (mean local loss)")
    if central:
        ax_loss.plot(rounds, [c[0] for c in central], "s--", label="central")
    ax_loss.set(xlabel="round", ylabel="training loss", title="loss")
    ax_acc.plot(rounds, history.test_accuracies, "o-", label="FedAvg")
    if central:
        ax_acc.plot(rounds, [c[1] for c in central], "s--", label="central")
    ax_acc.set(xlabel="round", ylabel="test accuracy", title="accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--non-iid", action="store_true", help="shard with skewed label sets per node")
    parser.add_argument("--trusted", action="store_true", help="average on a trusted aggregator node")
    parser.add_argument("--virtual", action="store_true", help="in-process VirtualWorkers instead of node processes")
    parser.add_argument("--dial-out", action="store_true",
                        help="the node processes dial out to this coordinator (fedws worker --connect), as nodes "
                        "behind firewalls do, instead of listening")
    parser.add_argument("--nodes", metavar="URL,URL,...",
                        help="train on these running nodes (their data tagged #digits #train) instead of starting any")
    parser.add_argument("--token-file", type=Path, help="file holding the nodes' token (default: $FEDWS_TOKEN)")
    parser.add_argument("--test-data", type=Path, default=DATA / "test.safetensors",
                        help="held-out set (x, y) the coordinator scores on (default: workers/data/test.safetensors)")
    parser.add_argument("--print-digest", action="store_true",
                        help="print the training plan's digest (what the nodes' operators approve) and exit")
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    torch.set_num_threads(1)  # a tiny model: extra threads only contend on a small machine
    cfg = FedAvgConfig(rounds=args.rounds, local_epochs=args.local_epochs, batch_size=args.batch_size,
                       lr=args.lr, seed=args.seed, min_nodes=2, round_timeout=60.0, data_tags=("#digits", "#train"))
    if args.print_digest:
        sy.TorchHook(torch)
        print(plan_digest(args.seed, cfg))
        return 0
    if args.nodes:
        return train_on_nodes(args, cfg)
    configs = ensure_data(args.non_iid, args.seed)
    sy.TorchHook(torch)  # the federation's hook: workers below join it
    test_tensors = load_file(str(DATA / "test.safetensors"))
    test = (test_tensors["x"], test_tensors["y"])

    mode = "virtual" if args.virtual else "network"
    if mode == "network":
        try:
            import fedws.launch  # noqa: F401
        except ImportError:
            mode = "virtual"
            print("fedws.launch is not available: falling back to in-process VirtualWorkers (--virtual)")
    if mode == "network":
        # What the nodes' operator approves: the digest of FedAvg's training-step plan for
        # this model, loss, learning rate, momentum and data signature.
        shard = load_file(str(DATA / f"{NODE_NAMES[0]}.safetensors"))
        approved = training_plan_digest(
            make_model(args.seed), cfg,
            x_like=(tuple(shard["x"].shape[1:]), shard["x"].dtype), y_like=(tuple(shard["y"].shape[1:]), shard["y"].dtype),
        )
        print(f"private nodes; approved plan: train_step sha256 {approved[:16]}...")

        def federation(configs: list[Path], trusted: bool) -> contextlib.AbstractContextManager[Any]:
            return network_federation(configs, trusted, approved, args.dial_out)
    else:
        federation = virtual_federation
    shards = "non-IID" if args.non_iid else "IID"
    print(f"mode: {mode} — {len(configs)} nodes from workers/*.toml, {shards} shards"
          f"{', trusted aggregator' if args.trusted else ''}")

    def report(m: RoundMetrics) -> None:
        dropped = f"  dropped {sorted(m.dropped)}" if m.dropped else ""
        print(f"round {m.round:2d}/{cfg.rounds}  train loss {m.train_loss:.4f}  test acc {m.test_accuracy:.3f}"
              f"  nodes {','.join(m.nodes)}  ({m.seconds:.2f} s){dropped}")

    with federation(configs, args.trusted) as (workers, aggregator):
        model = make_model(args.seed)
        t_fed = time.perf_counter()
        history = FedAvg(model, workers, cfg, test_data=test, aggregator=aggregator, on_round=report).fit()
        t_fed = time.perf_counter() - t_fed

    t_central = time.perf_counter()
    central = train_central(make_model(args.seed), *shard_tensors(configs), test, cfg)
    t_central = time.perf_counter() - t_central
    fed_acc, central_acc = history[-1].test_accuracy, central[-1][1]
    print(f"\ntest accuracy after {cfg.rounds} rounds x {cfg.local_epochs} local epochs:")
    print(f"  FedAvg  ({mode}, {shards}): {fed_acc:.3f}   ({t_fed:.1f} s)")
    print(f"  central (pooled data):   {central_acc:.3f}   ({t_central:.1f} s)")
    out = OUTPUT / ("federated_demo_non_iid.png" if args.non_iid else "federated_demo.png")
    plot(history, central, out, f"FedAvg on {len(workers)} {mode} nodes ({shards}) vs central training")
    print(f"plot: {out.relative_to(ROOT)}")
    print(f"wall time: {time.perf_counter() - t0:.1f} s")
    return 0


def plan_digest(seed: int, cfg: FedAvgConfig) -> str:
    """The digest of FedAvg's training-step plan for this model on digits shards (64 float32
    features, int64 labels): what a node's operator approves (``--approve-plan``)."""
    return training_plan_digest(make_model(seed), cfg, x_like=((64,), torch.float32), y_like=((), torch.int64))


def train_on_nodes(args: argparse.Namespace, cfg: FedAvgConfig) -> int:
    """FedAvg on running nodes: connect, train, report; nothing is started or stopped here."""
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
    sy.TorchHook(torch)
    print(f"training on {len(urls)} running nodes; their operators approve the plan "
          f"{plan_digest(args.seed, cfg)[:16]}... (--print-digest)")

    def report(m: RoundMetrics) -> None:
        print(f"round {m.round:2d}/{cfg.rounds}  train loss {m.train_loss:.4f}  test acc {m.test_accuracy:.3f}"
              f"  nodes {','.join(m.nodes)}  ({m.seconds:.2f} s)")

    try:
        with remote_federation(urls, token) as (workers, _):
            history = FedAvg(make_model(args.seed), workers, cfg, test_data=test, on_round=report).fit()
    except (sy.FedwsError, ValueError) as exc:
        print(f"federated_demo: {type(exc).__name__}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"test accuracy after {cfg.rounds} rounds: {history[-1].test_accuracy:.3f}")
    if not args.no_plot:
        out = OUTPUT / "federated_demo_nodes.png"
        plot(history, [], out, f"FedAvg on {len(urls)} running nodes")
        print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
