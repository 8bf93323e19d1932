"""The coordinator's FedAvg and the trusted aggregator's average are one function.

They used to be two copies that disagreed on a tie: a bool buffer averaging to exactly 0.5
was True on the coordinator (``>= 0.5``) and False on the aggregator (round half to even).
"""

from __future__ import annotations

from concurrent.futures import wait

import torch
from torch import nn

import fedws as sy
from fedws.fl.aggregate import fedavg, weighted_average
from fedws.fl.local_training import LocalRun, NodeData
from fedws.fl.trusted import connect_aggregator, start_trusted_average


class WithBuffers(nn.Module):
    def __init__(self, w: float, flag: list[bool], count: list[int]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w]))
        self.register_buffer("flag", torch.tensor(flag))
        self.register_buffer("count", torch.tensor(count))


# Equal sample counts: each update weighs 0.5, so flag[0] and both counts are exact ties.
A = dict(w=1.0, flag=[True, True, False], count=[2, 3])
B = dict(w=2.0, flag=[False, True, False], count=[3, 4])
EXPECTED = {"w": [1.5], "flag": [True, True, False], "count": [2, 4]}  # ints: half to even


def test_weighted_average_ties() -> None:
    half = [0.5, 0.5]
    assert weighted_average([torch.tensor([True]), torch.tensor([False])], half).tolist() == [True]
    assert weighted_average([torch.tensor([2, 3]), torch.tensor([3, 4])], half).tolist() == [2, 4]
    assert weighted_average([torch.tensor([1.0]), torch.tensor([2.0])], [0.0, 1.0]).tolist() == [2.0]


def test_trusted_aggregator_and_coordinator_agree_on_ties(hook: sy.TorchHook) -> None:
    local = fedavg([(WithBuffers(**A).state_dict(), 10), (WithBuffers(**B).state_dict(), 10)])
    assert {k: v.tolist() for k, v in local.items()} == EXPECTED

    alice = sy.VirtualWorker(hook, id="tie_alice")
    bob = sy.VirtualWorker(hook, id="tie_bob")
    secure = sy.VirtualWorker(hook, id="tie_secure")
    connect_aggregator(secure, [alice, bob])
    runs = []
    for worker, values in ((alice, A), (bob, B)):
        model = WithBuffers(**values).send(worker)  # type: ignore[operator]
        data = NodeData(worker=worker, x=None, y=None, num_examples=10)  # type: ignore[arg-type]
        runs.append(LocalRun(data=data, model=model, start_seq=0, end_seq=0, futures=[], examples_seen=10))
    keys, futures = start_trusted_average(runs, secure)
    wait(futures, timeout=10)
    remote = {k: f.result() for k, f in zip(keys, futures)}
    assert {k: v.tolist() for k, v in remote.items()} == EXPECTED
    for key, value in local.items():
        assert remote[key].dtype == value.dtype, key
