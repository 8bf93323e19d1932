"""Shared fixtures. ``make_worker`` is parametrized over transports: every test that uses
it runs against in-process VirtualWorkers and (once the WebSocket transport lands) against
real worker nodes in subprocesses on 127.0.0.1."""

from __future__ import annotations

import gc
from typing import Callable

import pytest
import torch

import fedws as sy

TRANSPORTS = ["virtual"]


@pytest.fixture
def hook() -> sy.TorchHook:
    return sy.TorchHook(torch)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_worker(hook: sy.TorchHook, transport: str) -> Callable[..., sy.Worker]:
    """``make_worker("bob")`` -> a worker of the current transport, empty, in ``hook``."""

    def make(worker_id: str, **kwargs: object) -> sy.Worker:
        if transport == "virtual":
            return sy.VirtualWorker(hook, id=worker_id, **kwargs)
        raise NotImplementedError(transport)

    yield make
    gc.collect()


def stored_count(worker: sy.Worker) -> int:
    """How many objects a worker holds, on any transport (pending deletes applied)."""
    gc.collect()
    return worker.objects_count_remote()
