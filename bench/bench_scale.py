"""FedAvg round time vs number of nodes (10, 100, 1,000): does the coordinator scale?

Each node holds 16 examples of an 8-feature, 2-class problem and trains a Linear(8, 2) for
one local epoch (one minibatch): the model is tiny on purpose, so what is measured is the
runtime's per-node cost (messages, bookkeeping, the node's interpreter), not arithmetic.

Rows:
- ``in-process``: VirtualWorkers. The nodes run inside the coordinator's process, so the
  round's CPU time is the coordinator's AND every node's; the "node side" column is the
  time spent inside the nodes' frame handlers, the rest is the coordinator's.
- ``multi-node hosts``: ``HOSTS`` (4) processes of ``fedws worker --nodes n/4``, private
  nodes with the training plan approved; the coordinator connects to each node at
  ``ws://127.0.0.1:PORT/ID``. CPU and memory columns are the coordinator's only.
- ``dial-out nodes``: the same 4 hosts with ``--connect``: every node dials one
  ``sy.serve(...)`` coordinator, which waits for all n (``wait_for_nodes``).
  Both go through :data:`EXTRA_ROWS` (a name and a function ``n -> (workers, cleanup)``),
  timed by :func:`measure` with the very same round.
- Flower's simulation engine (``start_simulation``, Ray) at the same counts, same model,
  data and local SGD, when ``flwr`` and ``ray`` are importable (the ``bench`` extra); run
  after every fedws row, and skipped with a reason when they are not.

Baseline, in the same run: plain PyTorch doing the same local training N times in this
process (no runtime at all), the floor any federated runtime pays. Printed: wall and CPU
seconds per round (median), ms per node, linearity (ms per node at N over ms per node at
the smallest N: 1.0 is linear), the goal "1,000 nodes <= 1 s per round" beside, and the
coordinator's memory per connected node. A PNG of round time vs nodes goes to bench/out/.

Run: ``python bench/bench_scale.py`` (``--quick``: 10 nodes, seconds). Not in ``make test``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fedws as sy
from fedws.fl import FedAvg, FedAvgConfig
from fedws.launch import NodeProcess

OUT = Path(__file__).parent / "out"
GOAL_NODES, GOAL_SECONDS = 1000, 1.0
ROWS, FEATURES, CLASSES = 16, 8, 2

# Hook for the lead: other ways of hosting nodes, measured with the same round. Each entry
# is (label, make) where ``make(n)`` returns ``(workers, cleanup)``: n connected workers
# holding data made by :func:`shard`, and a function that stops whatever it started.
# Multi-node hosts (``fedws worker --nodes N``) and dial-out nodes (``--connect``) belong
# here once they are merged; until then they are reported as not measured.
Factory = Callable[[int], tuple[list[sy.Worker], Callable[[], None]]]
NOT_YET = ["multi-node hosts", "dial-out nodes"]
HOSTS = 4  # node-host processes for the hosted rows (--hosts)
HOST_TOKEN = "bench-scale-token"


def _host_config(tmp: Path) -> Path:
    """One node's config for ``fedws worker --nodes N``: 16 rows of the tiny problem (every
    node of a host serves its own copy of the same shard) and the training plan approved,
    so the nodes stay private, as deployed."""
    from safetensors.torch import save_file

    from fedws.fl import training_plan_digest

    x, y = shard(0)
    save_file({"x": x, "y": y}, str(tmp / "shard.safetensors"))
    digest = training_plan_digest(make_model(), FedAvgConfig(batch_size=ROWS, lr=0.1),
                                  x_like=((FEATURES,), torch.float32), y_like=((), torch.int64))
    lines = ['id = "n"']
    for key, tag in (("x", "#x"), ("y", "#y")):
        lines += ["[[data]]", 'file = "shard.safetensors"', f'key = "{key}"', f'tags = ["#train", "{tag}"]']
    lines += ["[release]", f'approved_plans = ["{digest}"]']
    (tmp / "token").write_text(HOST_TOKEN + "\n")
    cfg = tmp / "node.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def _start_hosts(n: int, connect: str | None) -> tuple[list[NodeProcess], Path]:
    """``HOSTS`` processes of ``fedws worker --nodes n/HOSTS`` (ids ``h{k}-{i}``), started
    in parallel; listening on port 0, or dialing ``connect``."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from fedws.launch import start_node

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    cfg = _host_config(tmp)
    counts = [n // HOSTS + (1 if k < n % HOSTS else 0) for k in range(HOSTS)]
    extra = ["--threads", "1", "--token-file", str(tmp / "token"), "--log-level", "WARNING"]
    with ThreadPoolExecutor(HOSTS) as pool:
        futures = [pool.submit(start_node, cfg, port=0, connect=connect, timeout=300.0, extra_args=[
            *extra, "--nodes", str(c), "--id-prefix", f"h{k}-"]) for k, c in enumerate(counts) if c]
    procs = [f.result() for f in futures]
    return procs, tmp


def _host_usage(pid: int) -> tuple[float, float]:
    """(RSS MB, CPU seconds since start) of a host process."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stop_all(procs: list[NodeProcess]) -> None:
    usage = []
    for p in procs:
        try:
            usage.append(_host_usage(p.pid))
        except (OSError, StopIteration):
            pass
    if usage:
        print("    hosts: " + ", ".join(f"RSS {r:.0f} MB CPU {c:.1f} s" for r, c in usage)
              + f" (coordinator RSS {rss_bytes() / 2**20:.0f} MB)", flush=True)
    for p in procs:
        p.stop()


def multi_node_hosts(n: int) -> tuple[list[sy.Worker], Callable[[], None]]:
    """Inbound: the coordinator connects to each node at ``ws://127.0.0.1:PORT/ID``."""
    procs, _ = _start_hosts(n, None)
    hook = sy.TorchHook(torch, federation=sy.Federation())
    workers: list[sy.Worker] = []
    try:
        for k, p in enumerate(procs):
            size = n // HOSTS + (1 if k < n % HOSTS else 0)
            for i in range(size):
                workers.append(sy.connect(f"{p.url}/h{k}-{i}", HOST_TOKEN, hook=hook, timeout=600.0))
    except BaseException:
        _stop_all(procs)
        raise

    def cleanup() -> None:
        for w in workers:
            w.close()
        _stop_all(procs)

    return workers, cleanup


def dial_out_hosts(n: int) -> tuple[list[sy.Worker], Callable[[], None]]:
    """Dial-out: ``HOSTS`` hosts of ``--nodes n/HOSTS --connect URL`` dial one ``sy.serve``."""
    hook = sy.TorchHook(torch, federation=sy.Federation())
    listener = sy.serve("127.0.0.1", 0, token=HOST_TOKEN, hook=hook, timeout=600.0)
    assert listener.url is not None
    try:
        procs, _ = _start_hosts(n, listener.url)
    except BaseException:
        listener.close()
        raise
    workers: list[sy.Worker] = list(listener.wait_for_nodes(n, timeout=300))

    def cleanup() -> None:
        _stop_all(procs)
        listener.close()

    return workers, cleanup


EXTRA_ROWS: list[tuple[str, Factory]] = [("multi-node hosts", multi_node_hosts), ("dial-out nodes", dial_out_hosts)]


def shard(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(ROWS, FEATURES, generator=g), torch.randint(0, CLASSES, (ROWS,), generator=g)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, CLASSES)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@dataclass
class Row:
    label: str
    nodes: int
    wall: float  # median seconds per round
    cpu: float  # process CPU seconds per round (all threads)
    node_cpu: float  # of which inside the nodes' frame handlers (in-process rows only)
    messages: float  # per node per round
    mem_per_node: float  # bytes of RSS per connected node

    @property
    def ms_per_node(self) -> float:
        return 1e3 * self.wall / self.nodes


class NodeClock:
    """CPU time spent inside VirtualWorkers' frame handlers: the nodes' share of a round.

    Installed before any worker is made (a link keeps the bound handler it was given)."""

    seconds = 0.0

    @classmethod
    def install(cls) -> None:
        orig = sy.VirtualWorker.handle_frame

        def timed(worker: sy.VirtualWorker, frame: bytes, caller: object = None) -> object:
            t = time.process_time()
            try:
                return orig(worker, frame, caller)  # type: ignore[arg-type]
            finally:
                cls.seconds += time.process_time() - t

        sy.VirtualWorker.handle_frame = timed  # type: ignore[assignment,method-assign]


def measure(label: str, workers: list[sy.Worker], rounds: int, mem_before: int) -> Row:
    """Time ``rounds`` FedAvg rounds over ``workers`` (after one warm-up round, which also
    finds the data and sends the plan). Works for any list of connected workers."""
    cfg = FedAvgConfig(rounds=rounds + 1, batch_size=ROWS, lr=0.1, round_timeout=600.0)
    trainer = FedAvg(make_model(), workers, cfg, progress=False)
    trainer.run_round(1)
    mem = (rss_bytes() - mem_before) / len(workers)
    msgs0 = sum(w.session.messages_sent for w in workers)
    walls = []
    node0 = NodeClock.seconds
    cpu0 = time.process_time()
    for r in range(2, rounds + 2):
        t0 = time.perf_counter()
        trainer.run_round(r)
        walls.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / rounds
    msgs = (sum(w.session.messages_sent for w in workers) - msgs0) / rounds / len(workers)
    return Row(label, len(workers), statistics.median(walls), cpu, (NodeClock.seconds - node0) / rounds, msgs, mem)


def in_process(n: int, rounds: int) -> Row:
    gc.collect()
    before = rss_bytes()
    hook = sy.TorchHook(torch, federation=sy.Federation())
    workers: list[sy.Worker] = []
    for i in range(n):
        x, y = shard(i)
        workers.append(sy.VirtualWorker(hook, id=f"node{i}", data=[x.tag("#train", "#x"), y.tag("#train", "#y")]))
    return measure("in-process", workers, rounds, before)


def plain_torch(n: int, rounds: int) -> float:
    """Seconds per round for the same local training with no runtime: the floor."""
    data = [shard(i) for i in range(n)]
    model = make_model()
    times = []
    for _ in range(rounds + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        states = []
        for x, y in data:
            local = nn.Linear(FEATURES, CLASSES)
            local.load_state_dict(model.state_dict())
            opt = torch.optim.SGD(local.parameters(), lr=0.1)
            loss = F.cross_entropy(local(x), y)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            states.append(local.state_dict())
        model.load_state_dict({k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]})
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def flower(n: int, rounds: int) -> float | None:
    """Flower's simulation engine (``flwr.simulation.start_simulation``, Ray) at ``n``
    clients with the same model, data and local training: median seconds per round after
    a warm-up round (timed from the strategy's ``configure_fit`` to the end of its
    ``aggregate_fit``), or None (reason printed) without flwr and Ray (the bench extra)."""
    import importlib.util

    if importlib.util.find_spec("flwr") is None or importlib.util.find_spec("ray") is None:
        return None
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import logging

    import flwr
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerConfig
    from flwr.server.strategy import FedAvg as FlowerFedAvg
    from flwr.simulation import start_simulation

    logging.getLogger("flwr").setLevel(logging.ERROR)
    times: list[float] = []

    class Timed(FlowerFedAvg):  # type: ignore[misc]
        started = 0.0

        def configure_fit(self, server_round: int, parameters: object, client_manager: object) -> object:
            self.started = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: list[object], failures: list[object]) -> object:
            if failures or len(results) != n:
                raise RuntimeError(f"Flower round {server_round}: {len(results)} of {n} results, failures {failures}")
            out = super().aggregate_fit(server_round, results, failures)
            times.append(time.perf_counter() - self.started)
            return out

    class TinyClient(flwr.client.NumPyClient):  # type: ignore[misc]
        def __init__(self, i: int) -> None:
            self.x, self.y = shard(i)
            self.model = make_model()

        def get_parameters(self, config: dict[str, object]) -> list[object]:
            return [v.detach().numpy() for v in self.model.state_dict().values()]

        def fit(self, parameters: list[object], config: dict[str, object]) -> tuple[list[object], int, dict[str, object]]:
            self.model.load_state_dict({k: torch.as_tensor(v) for k, v in zip(self.model.state_dict(), parameters)})
            opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
            loss = F.cross_entropy(self.model(self.x), self.y)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            return self.get_parameters(config), ROWS, {}

    def client_fn(context: object) -> object:
        return TinyClient(int(context.node_config["partition-id"])).to_client()  # type: ignore[attr-defined]

    initial = [v.detach().numpy() for v in make_model().state_dict().values()]
    # Ray's workers unpickle the client by reference to this module (and it imports fedws)
    here = Path(__file__).resolve().parent
    path = os.pathsep.join(p for p in (str(here), str(here.parent), os.environ.get("PYTHONPATH", "")) if p)
    strategy = Timed(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_evaluate_clients=0,
                     min_available_clients=n, initial_parameters=ndarrays_to_parameters(initial),
                     fit_metrics_aggregation_fn=lambda _: {})
    start_simulation(client_fn=client_fn, num_clients=n, config=ServerConfig(num_rounds=rounds + 1),
                     strategy=strategy, client_resources={"num_cpus": 1, "num_gpus": 0.0},
                     ray_init_args={"ignore_reinit_error": True, "include_dashboard": False, "log_to_driver": False,
                                    "configure_logging": False, "runtime_env": {"env_vars": {"PYTHONPATH": path}}})
    if len(times) != rounds + 1:
        raise RuntimeError(f"Flower simulation at {n}: {len(times)} of {rounds + 1} rounds")
    return statistics.median(times[1:])


def plot(rows: list[Row], floor: dict[int, float], path: Path, flower_wall: dict[int, float] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r.label for r in rows):
        pts = [r for r in rows if r.label == label]
        ax.plot([r.nodes for r in pts], [r.wall for r in pts], "o-", label=f"fedws {label} (wall)")
        ax.plot([r.nodes for r in pts], [r.cpu for r in pts], "o--", label=f"fedws {label} ({'CPU' if label == 'in-process' else 'coordinator CPU'})")
    ax.plot(list(floor), list(floor.values()), "s:", label="plain PyTorch, no runtime")
    if flower_wall:
        ax.plot(list(flower_wall), list(flower_wall.values()), "^-", color="black", label="Flower simulation (Ray), wall")
    ax.axhline(GOAL_SECONDS, color="grey", lw=0.8)
    ax.plot([GOAL_NODES], [GOAL_SECONDS], "r*", ms=12, label="goal: 1,000 nodes in 1 s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("nodes per round")
    ax.set_ylabel("seconds per FedAvg round")
    ax.set_title("FedAvg round of Linear(8, 2) vs nodes (2 cores)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 nodes only, 2 rounds (smoke run)")
    ap.add_argument("--nodes", type=int, nargs="*", help="node counts (default 10 100 1000)")
    ap.add_argument("--rounds", type=int, help="timed rounds per count (default 3; --quick: 2)")
    ap.add_argument("--plot", type=Path, default=OUT / "scale.png")
    ap.add_argument("--flower", action="store_true", help="with --quick: run Flower's simulation peer too")
    args = ap.parse_args(argv)
    counts = args.nodes or ([10] if args.quick else [10, 100, 1000])
    rounds = args.rounds or (2 if args.quick else 3)
    torch.set_num_threads(1)  # tiny models: OpenMP threads only contend on 2 cores
    NodeClock.install()

    print("FedAvg round of Linear(8, 2), 16 examples per node, 1 local epoch; median of "
          f"{rounds} rounds after a warm-up round")
    print(f"{'hosting':<16} {'nodes':>6} {'wall s':>8} {'CPU s':>8} {'node CPU':>9} "
          f"{'ms/node':>8} {'msgs/node':>9} {'linear':>7} {'KB/node':>8} {'plain s':>8} {'x plain':>8}")
    rows: list[Row] = []
    floor: dict[int, float] = {}
    for n in counts:
        floor[n] = plain_torch(n, rounds)
        makers: list[tuple[str, Callable[[int], Row]]] = [("in-process", lambda k: in_process(k, rounds))]
        for label, make in EXTRA_ROWS:
            def hosted(k: int, label: str = label, make: Factory = make) -> Row:
                before = rss_bytes()
                workers, cleanup = make(k)
                try:
                    return measure(label, workers, rounds, before)
                finally:
                    cleanup()
            makers.append((label, hosted))
        for _label, run in makers:
            row = run(n)
            rows.append(row)
            first = next(r for r in rows if r.label == row.label)
            print(f"{row.label:<16} {n:>6} {row.wall:>8.3f} {row.cpu:>8.3f} {row.node_cpu:>9.3f} "
                  f"{row.ms_per_node:>8.2f} {row.messages:>9.1f} {row.ms_per_node / first.ms_per_node:>7.2f} "
                  f"{row.mem_per_node / 1024:>8.1f} {floor[n]:>8.4f} {row.wall / floor[n]:>8.1f}", flush=True)
            gc.collect()
    for what in NOT_YET:
        if not any(label == what for label, _ in EXTRA_ROWS):
            print(f"{what}: not measured (hook: bench_scale.EXTRA_ROWS, once that hosting is merged)")
    flower_wall: dict[int, float] = {}
    for n in counts:  # last: Ray's processes would otherwise share the cores with fedws's rows
        if args.quick and not args.flower:
            print(f"flower at {n} nodes: skipped: --quick (Ray's start-up alone takes 15-20 s here; --flower runs it)")
            break
        wall = flower(n, rounds)
        if wall is None:
            print(f"flower at {n} nodes: skipped: flwr or ray is not importable (Flower's simulation: the bench extra)")
            break
        flower_wall[n] = wall
        fedws = next(r for r in rows if r.label == "in-process" and r.nodes == n)
        print(f"{'flower sim':<16} {n:>6} {wall:>8.3f}   Flower simulation (Ray) / fedws in-process: "
              f"{wall / fedws.wall:.1f}x" + ("   goal >= 10x at 100 nodes: " + ("met" if wall / fedws.wall >= 10
                                                                                 else "NOT met") if n == 100 else ""),
              flush=True)
    for row in rows:
        if row.nodes == GOAL_NODES:
            verdict = "met" if row.wall <= GOAL_SECONDS else "NOT met"
            print(f"goal 1,000 nodes <= {GOAL_SECONDS:g} s per round ({row.label}): wall {row.wall:.2f} s, "
                  f"CPU {row.cpu:.2f} s (nodes {row.node_cpu:.2f} s, coordinator {row.cpu - row.node_cpu:.2f} s): {verdict}")
    plot(rows, floor, args.plot, flower_wall)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
