"""FedAvg round, 3 nodes, tiny model: fedws against Flower's legacy gRPC API (issue 12).

The same workload on both sides, every node a separate process on 127.0.0.1:

- model: ``Sequential(Linear(10, 16), ReLU, Linear(16, 2))``, initial weights from
  ``torch.manual_seed(0)``, sent from the coordinator / server to every node each round;
- data: node ``i`` holds 64 examples made by ``torch.Generator().manual_seed(i)``
  (10 features, 2 classes);
- local training: one epoch of plain SGD (lr 0.1, no momentum), one minibatch of the whole
  shard, cross-entropy; the update averaged weighted by examples.

fedws: 3 ``fedws worker`` processes (``--threads 1``) and :class:`fedws.fl.FedAvg`.
Flower: ``flwr.server.start_server`` (in this process) and 3 client processes running
``flwr.client.start_client`` with a ``NumPyClient`` (the legacy grpc-bidi transport of
Flower's quickstarts; deprecated since 1.13 but still shipped), strategy
``flwr.server.strategy.FedAvg`` with the same initial parameters and no evaluation round.

Round 1 is a warm-up on both sides (fedws traces and sends its training plan then; Flower
waits for its clients to connect), so the figure is the median of the later rounds. A
Flower round is timed from its strategy's ``configure_fit`` to the end of its
``aggregate_fit`` (in Flower's favour: the server loop between rounds is left out); a fedws
round is ``FedAvg.run_round``. Both sides' per-round training losses (examples-weighted
mean over the nodes, the loss before each node's step) are printed and compared: they
agree to float tolerance (the same weights, batches and SGD; only summation order differs).

Goal (issue 12): the fedws round at most 0.4x Flower's. Without ``flwr`` (the ``bench``
extra: ``pip install -e ".[bench]"``) the script prints a skip line and exits 0.
Run: ``python bench/bench_flower.py`` (``--quick``: 2 rounds, a smoke run).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NODES, ROWS, FEATURES, HIDDEN, CLASSES, LR = 3, 64, 10, 16, 2, 0.1
GOAL = 0.4
TOLERANCE = 1e-5  # relative, on the per-round training loss
LABEL = "FedAvg round, 3 nodes, tiny model"


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def shard(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(ROWS, FEATURES, generator=g), torch.randint(0, CLASSES, (ROWS,), generator=g)


# -- fedws ----------------------------------------------------------------------------------


def run_fedws(rounds: int) -> tuple[list[float], list[float]]:
    """(seconds per round, training loss per round) on 3 ``fedws worker`` processes."""
    import fedws as sy
    from fedws.fl import FedAvg, FedAvgConfig
    from fedws.launch import start_node

    with ThreadPoolExecutor(NODES) as pool:  # started in parallel: each spends seconds importing torch
        nodes = list(pool.map(lambda i: start_node(id=f"n{i}", port=0, extra_args=["--threads", "1"]), range(NODES)))
    try:
        hook = sy.TorchHook(torch, federation=sy.Federation())
        workers = [sy.connect(n.url, hook=hook, timeout=300) for n in nodes]
        data = []  # held: dropping a pointer deletes its data on the node
        for i, w in enumerate(workers):
            x, y = shard(i)
            data += [x.tag("#train", "#x").send(w), y.tag("#train", "#y").send(w)]  # type: ignore[attr-defined]
        cfg = FedAvgConfig(rounds=rounds, batch_size=ROWS, lr=LR, round_timeout=600.0)
        trainer = FedAvg(make_model(), workers, cfg, progress=False)
        times, losses = [], []
        for r in range(1, rounds + 1):
            t0 = time.perf_counter()
            m = trainer.run_round(r)
            times.append(time.perf_counter() - t0)
            assert m.train_loss is not None and len(m.nodes) == NODES, m
            losses.append(m.train_loss)
        for w in workers:
            w.close()
        return times, losses
    finally:
        for n in nodes:
            n.stop()


# -- Flower (legacy gRPC API) ----------------------------------------------------------------


def _quiet_flower() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    logging.getLogger("flwr").setLevel(logging.ERROR)


def flower_client(index: int, address: str) -> None:
    """One Flower client process: the legacy ``start_client`` with a ``NumPyClient``."""
    _quiet_flower()
    torch.set_num_threads(1)
    import flwr
    import numpy as np

    x, y = shard(index)
    model = make_model()
    # Imports done, wait for the server's port, then connect once: start_client's retry
    # backoff would otherwise add seconds to the (untimed) first round.
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + 600  # the fedws run comes first
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)

    class TinyClient(flwr.client.NumPyClient):  # type: ignore[misc]
        def get_parameters(self, config: dict[str, Any]) -> list[Any]:
            return [v.detach().numpy() for v in model.state_dict().values()]

        def fit(self, parameters: list[Any], config: dict[str, Any]) -> tuple[list[Any], int, dict[str, Any]]:
            model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in zip(model.state_dict(), parameters)})
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            return self.get_parameters(config), ROWS, {"loss_sum": float(loss.item()) * ROWS}

    flwr.client.start_client(server_address=address, client=TinyClient().to_client(), insecure=True,
                             max_wait_time=60.0)


def spawn_flower_clients(address: str) -> list[subprocess.Popen[str]]:
    """3 client processes of this script. Started before the fedws run, so their imports
    (seconds each on a loaded machine) overlap fedws's node start-up; once imported they
    only poll the server's port, idle, until :func:`run_flower` opens it."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    return [subprocess.Popen([sys.executable, "-W", "ignore", __file__, "--client", str(i), "--address", address],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for i in range(NODES)]


def run_flower(rounds: int, address: str, clients: list[subprocess.Popen[str]]) -> tuple[list[float], list[float], str]:
    """(seconds per round, training loss per round, flwr version): ``start_server`` here,
    serving the client processes of :func:`spawn_flower_clients`."""
    _quiet_flower()
    import flwr
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerConfig, start_server
    from flwr.server.strategy import FedAvg as FlowerFedAvg

    times: list[float] = []
    losses: list[float] = []

    class Timed(FlowerFedAvg):  # type: ignore[misc]
        started = 0.0

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            self.started = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            if failures or len(results) != NODES:
                raise RuntimeError(f"Flower round {server_round}: {len(results)} results, failures {failures}")
            out = super().aggregate_fit(server_round, results, failures)
            times.append(time.perf_counter() - self.started)
            losses.append(sum(r.metrics["loss_sum"] for _, r in results) / sum(r.num_examples for _, r in results))
            return out

    initial = [v.detach().numpy() for v in make_model().state_dict().values()]
    strategy = Timed(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=NODES, min_evaluate_clients=0,
                     min_available_clients=NODES, initial_parameters=ndarrays_to_parameters(initial),
                     fit_metrics_aggregation_fn=lambda _: {})
    try:
        start_server(server_address=address, config=ServerConfig(num_rounds=rounds, round_timeout=600.0),
                     strategy=strategy)
    finally:
        stop_clients(clients, wait=len(times) != rounds)
    if len(times) != rounds:
        errs = "\n".join((c.stderr.read() if c.stderr else "")[-2000:] for c in clients)
        raise RuntimeError(f"Flower ran {len(times)} of {rounds} rounds; clients said:\n{errs}")
    for c in clients:
        if c.stderr:
            c.stderr.close()
    return times, losses, flwr.__version__


def stop_clients(clients: list[subprocess.Popen[str]], wait: bool = False) -> None:
    """The rounds are done (or failed): end the client processes (after a grace period
    to say why, when ``wait``)."""
    for c in clients:
        if wait:
            try:
                c.wait(10)
                continue
            except subprocess.TimeoutExpired:
                pass
        c.terminate()
    for c in clients:
        try:
            c.wait(10)
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds (warm-up + 1 timed): a smoke run")
    ap.add_argument("--rounds", type=int, help="rounds including the warm-up (default 11; --quick: 2)")
    ap.add_argument("--client", type=int, help=argparse.SUPPRESS)  # internal: a Flower client process
    ap.add_argument("--address", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client is not None:
        flower_client(args.client, args.address)
        return 0
    try:
        import flwr  # noqa: F401
    except ImportError:
        print(f"{LABEL}: Flower peer skipped: flwr is not importable (install the bench extra: "
              'pip install -e ".[bench]")')
        return 0
    logging.getLogger("fedws").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    rounds = max(2, args.rounds or (2 if args.quick else 11))

    sys.path.insert(0, str(Path(__file__).parent))
    from baselines import free_port

    address = f"127.0.0.1:{free_port()}"
    clients = spawn_flower_clients(address)
    try:
        fw_times, fw_losses = run_fedws(rounds)
    except BaseException:
        stop_clients(clients)
        raise
    fl_times, fl_losses, version = run_flower(rounds, address, clients)

    print(f"{LABEL}: Linear(10,16)-ReLU-Linear(16,2), 64 examples per node, 1 epoch of SGD lr {LR}; "
          f"median of {rounds - 1} rounds after a warm-up round")
    print(f"  {'round':>5} {'fedws loss':>12} {'Flower loss':>12}")
    for r, (a, b) in enumerate(zip(fw_losses, fl_losses), 1):
        print(f"  {r:>5} {a:>12.6f} {b:>12.6f}")
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(fw_losses, fl_losses))
    same = worst <= TOLERANCE
    print(f"  losses identical within {TOLERANCE:g} relative: {'yes' if same else 'NO'} (largest difference {worst:.2e})")
    fw, fl = statistics.median(fw_times[1:]), statistics.median(fl_times[1:])
    ratio = fw / fl
    print(f"  {LABEL}   fedws {fw * 1e3:7.1f} ms   Flower {version} legacy gRPC {fl * 1e3:7.1f} ms   "
          f"ratio {ratio:5.2f}x   goal <= {GOAL}x: {'met' if ratio <= GOAL else 'NOT met'}   "
          f"(round 1: fedws {fw_times[0] * 1e3:.0f} ms, Flower {fl_times[0] * 1e3:.0f} ms)", flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
