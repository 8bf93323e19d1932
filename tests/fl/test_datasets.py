"""Federated datasets: BaseDataset, federate, FederatedDataLoader, datasets served by nodes.

Every loader test runs on both transports (``make_worker``); the served-data and policy
tests start their own ``fedws worker`` processes (a config with data, a private node).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import stored_count
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

import fedws as sy
from fedws.datasets import dataset_on
from fedws.fl.partition import dirichlet
from fedws.launch import start_node
from fedws.protocol.codec import ObjRef
from fedws.protocol.messages import Kind

MakeWorker = Callable[..., sy.Worker]
TOKEN = "data-token"


def xy(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(n * 3, dtype=torch.float32).view(n, 3), torch.arange(n) % 4


def test_federate_splits_like_pysyft_and_keeps_data_on_the_workers(make_worker: MakeWorker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    x, y = xy(11)
    fd = sy.BaseDataset(x, y).federate((bob, alice))
    assert isinstance(fd, sy.FederatedDataset)
    assert fd.workers == ["bob", "alice"] and len(fd) == 11
    assert len(fd["bob"]) == 6 and len(fd[alice]) == 5  # ceil(11 / 2) first, as PySyft split
    assert isinstance(fd["bob"].data, sy.PointerTensor) and fd["bob"].location is bob
    assert stored_count(bob) == 2 and stored_count(alice) == 2
    back = fd.get_dataset("alice")
    assert torch.equal(back.data, x[6:]) and torch.equal(back.targets, y[6:])
    assert fd.workers == ["bob"] and "bob" in repr(fd)


def test_torch_dataset_federate_is_installed_by_the_hook(make_worker: MakeWorker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    x, y = xy(8)
    fd = TensorDataset(x, y).federate(bob, alice)  # type: ignore[attr-defined]
    assert [len(fd[w]) for w in fd.workers] == [4, 4]
    assert torch.equal(fd["alice"].data.get(), x[4:])


def test_a_transform_runs_locally_before_sending(make_worker: MakeWorker) -> None:
    bob = make_worker("bob")
    x, y = xy(4)
    ds = sy.BaseDataset(x, y, transform=lambda a: a * 2)
    assert torch.equal(ds[1][0], x[1] * 2)
    fd = ds.federate((bob,))
    assert torch.equal(fd["bob"].data.get(), x * 2)


def test_federate_with_a_partition(make_worker: MakeWorker) -> None:
    bob, alice, carol = make_worker("bob"), make_worker("alice"), make_worker("carol")
    x, y = xy(40)
    parts = dirichlet(y, 3, alpha=0.3, seed=3)
    fd = sy.BaseDataset(x, y).federate((bob, alice, carol), partition=parts)
    assert len(fd) == 40
    for w, idx in zip(("bob", "alice", "carol"), parts):
        if idx:
            assert torch.equal(fd[w].targets.get(), y[idx])


def test_loader_yields_batches_worker_by_worker_cut_on_the_node(make_worker: MakeWorker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    x, y = xy(10)
    fd = sy.BaseDataset(x, y).federate((bob, alice))
    loader = sy.FederatedDataLoader(fd, batch_size=2, shuffle=False)
    assert len(loader) == 6 and loader.workers == ["bob", "alice"]
    seen = []
    for data, target in loader:
        assert isinstance(data, sy.PointerTensor) and isinstance(target, sy.PointerTensor)
        assert data.location is target.location
        seen.append((data.location.id, data.get(), target.get()))
    assert [w for w, _, _ in seen] == ["bob"] * 3 + ["alice"] * 3
    assert torch.equal(torch.cat([d for _, d, _ in seen]), x)
    assert torch.equal(torch.cat([t for _, _, t in seen]), y)


def test_shuffle_covers_every_example_once_and_drop_last(make_worker: MakeWorker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    x, y = xy(14)
    fd = sy.BaseDataset(x, y).federate((bob, alice))
    loader = sy.FederatedDataLoader(fd, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0))
    rows = torch.cat([data.get() for data, _ in loader])
    assert sorted(rows[:, 0].tolist()) == x[:, 0].tolist() and not torch.equal(rows, x)
    dropped = sy.FederatedDataLoader(fd, batch_size=3, drop_last=True)
    shapes = [d.shape[0] for d, _ in dropped]
    assert shapes == [3, 3, 3, 3] and len(dropped) == 4  # 7 and 7 examples: 2 full batches each


def test_iter_per_worker_gives_one_batch_per_worker_per_step(make_worker: MakeWorker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    x, y = xy(12)
    fd = sy.BaseDataset(x, y).federate((bob, alice))
    loader = sy.FederatedDataLoader(fd, batch_size=4, iter_per_worker=True)
    iter(loader)
    step = next(loader)
    assert set(step) == {bob, alice}
    assert torch.equal(step[alice][0].get(), x[6:10])
    assert set(next(loader)) == {bob, alice} and len(loader) == 2
    with pytest.raises(StopIteration):
        next(loader)
    assert len(list(loader)) == 2  # iter() starts a new epoch, as in PySyft


def test_batches_are_freed_with_their_pointers(make_worker: MakeWorker) -> None:
    bob = make_worker("bob")
    fd = sy.BaseDataset(*xy(9)).federate((bob,))
    for _data, _target in sy.FederatedDataLoader(fd, batch_size=4):
        pass
    del _data, _target
    assert stored_count(bob) == 2  # only the dataset itself


def test_node_side_dataset_found_by_key(hook: sy.TorchHook) -> None:
    bob = sy.VirtualWorker(hook, id="bob")
    x, y = xy(6)
    bob.add_dataset(TensorDataset(x, y), key="mnist")
    assert len(bob.search("#mnist")) == 2
    ds = dataset_on(bob, "mnist")
    assert torch.equal((ds.data * 1).get(), x) and torch.equal((ds.targets * 1).get(), y)
    fd = sy.FederatedDataset.from_workers([bob], "#mnist")
    batches = [(d.get(), t.get()) for d, t in sy.FederatedDataLoader(fd, batch_size=4)]
    assert torch.equal(batches[1][0], x[4:])
    ds = None
    del fd
    assert stored_count(bob) == 2  # search pointers do not own the served data
    with pytest.raises(sy.ObjectNotFoundError, match="expected exactly 1"):
        dataset_on(bob, "cifar")


def test_node_add_dataset_checks_its_input(hook: sy.TorchHook) -> None:
    bob = sy.VirtualWorker(hook, id="bob")
    with pytest.raises(ValueError, match="differ in length"):
        bob.node.add_dataset((torch.zeros(3, 2), torch.zeros(2)), key="x")
    with pytest.raises(ValueError, match="non-empty word"):
        bob.node.add_dataset((torch.zeros(3, 2), torch.zeros(3)), key="two words")
    with pytest.raises(TypeError):
        bob.node.add_dataset(([1, 2], [3, 4]), key="x")


def test_misuse_is_refused_with_clear_errors(hook: sy.TorchHook) -> None:
    bob = sy.VirtualWorker(hook, id="bob")
    x, y = xy(4)
    with pytest.raises(TypeError, match="on one worker"):
        sy.FederatedDataset([sy.BaseDataset(x, y)])
    fd = sy.BaseDataset(x, y).federate((bob,))
    with pytest.raises(ValueError, match="two datasets"):
        sy.FederatedDataset([fd["bob"], fd["bob"]])
    with pytest.raises(TypeError, match="not a FederatedDataset"):
        sy.FederatedDataLoader(sy.BaseDataset(x, y))  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError):
        sy.FederatedDataLoader(fd, num_iterators=2)
    with pytest.raises(ValueError, match="parts for"):
        sy.BaseDataset(x, y).federate((bob,), partition=[[0], [1]])
    with pytest.raises(IndexError):
        sy.BaseDataset(x, y).federate((bob,), partition=[[0, 9]])
    with pytest.raises(TypeError, match="only to local"):
        fd["bob"].transform(lambda t: t)


def _config_with_data(tmp_path: Path, node_id: str, x: torch.Tensor, y: torch.Tensor, policy: str = "private") -> Path:
    save_file({"x": x, "y": y}, str(tmp_path / f"{node_id}.safetensors"))
    lines = [f'id = "{node_id}"', "port = 0", f'policy = "{policy}"']
    for key, role in (("x", "#data"), ("y", "#target")):
        lines += ["[[data]]", f'file = "{node_id}.safetensors"', f'key = "{key}"', f'tags = ["#mnist", "{role}"]']
    path = tmp_path / f"{node_id}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _connect(url: str) -> sy.Worker:
    return sy.connect(url, TOKEN, hook=sy.TorchHook(torch, federation=sy.Federation()), timeout=30.0)


@pytest.mark.usefixtures("one_torch_thread")
def test_private_node_serves_a_config_dataset_and_keeps_sessions_apart(tmp_path: Path) -> None:
    x, y = xy(8)
    node = start_node(_config_with_data(tmp_path, "dana", x, y), extra_args=["--threads", "1", "--token", TOKEN])
    try:
        with _connect(node.url) as owner, _connect(node.url) as attacker:
            # The served dataset: batches are cut on the node, and stay there (private).
            fd = sy.FederatedDataset.from_workers([owner], "mnist")
            data, target = next(iter(sy.FederatedDataLoader(fd, batch_size=4, shuffle=True)))
            assert data.shape == (4, 3) and target.shape == (4,)
            with pytest.raises(sy.PermissionDeniedError, match="private"):
                data.get()
            # The owner's own federated data: its batches are its own, and no one else's.
            mine = sy.BaseDataset(x + 1, y).federate((owner,))
            batch, _ = next(iter(sy.FederatedDataLoader(mine, batch_size=3)))
            assert torch.equal(batch.get(), x[:3] + 1)
            victim = mine["dana"].data.id_at_location
            owner.ping()
            seq, _ = attacker.submit(Kind.CMD, "Tensor.__getitem__", [ObjRef(victim), slice(0, 2)], {}, [12345])
            attacker.ping()
            assert isinstance(attacker.session.error_of(seq), sy.PermissionDeniedError)
            with pytest.raises(sy.PermissionDeniedError, match="another session"):
                attacker.request(Kind.GET, victim, False)
            # The attacker may batch the served data too, but cannot take it away.
            theirs = sy.FederatedDataset.from_workers([attacker], "mnist")
            with pytest.raises(sy.PermissionDeniedError):
                next(iter(sy.FederatedDataLoader(theirs, batch_size=8)))[0].get()
            assert torch.equal(mine["dana"].data.get(), x + 1)  # intact
    finally:
        node.stop()


def test_a_batch_is_one_command_per_tensor_and_no_data_moves(make_worker: MakeWorker, monkeypatch: pytest.MonkeyPatch) -> None:
    bob = make_worker("bob")
    fd = sy.BaseDataset(*xy(12)).federate((bob,))
    sent: list[tuple[Kind, int]] = []
    real = bob.submit

    def spy(kind: Kind, *fields: object, want_value: bool = False) -> object:
        sent.append((kind, len(repr(fields))))
        return real(kind, *fields, want_value=want_value)

    monkeypatch.setattr(bob, "submit", spy)
    batches = list(sy.FederatedDataLoader(fd, batch_size=4, shuffle=True))
    assert len(batches) == 3
    kinds = [k for k, _ in sent if k != Kind.DELETE]  # (deletes of dropped batches)
    assert kinds == [Kind.CMD] * 6  # data[idx], targets[idx] per batch: no STORE, no GET
    assert all(n < 400 for _, n in sent)  # indices travel, examples do not


def test_node_server_add_dataset_serves_private_read_only_data() -> None:
    from fedws.node_config import NodeConfig
    from fedws.node_process import NodeServer

    server = NodeServer(NodeConfig(id="erin", port=0))  # private by default; not started
    x, y = xy(5)
    server.add_dataset(sy.BaseDataset(x, y), key="mnist", tags=["#train"])
    store = server.worker.node.store
    data_ids, target_ids = store.search(["#mnist", "#data", "#train"]), store.search(["#mnist", "#target"])
    assert len(data_ids) == 1 and len(target_ids) == 1
    assert set(data_ids + target_ids) <= store.readonly and torch.equal(store.get(target_ids[0]), y)
    server.worker.close()
