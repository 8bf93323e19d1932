"""Federated datasets under PySyft 0.2's names: BaseDataset, FederatedDataset, FederatedDataLoader.

A :class:`BaseDataset` holds features and targets. It may hold local tensors or pointers.
``dataset.federate((bob, alice))`` splits it, sends each part to its worker and returns a
:class:`FederatedDataset`. A :class:`FederatedDataLoader` draws batches worker by worker.
Each batch is cut on the node that holds the data: one indexing command per tensor
(``data[a:b]`` or ``data[[i, j, ...]]``), so no example passes through the coordinator.
The batch pointers belong to the coordinator's session, so a private node applies its
policy to them as it does to anything else the session computed.

A node can also serve datasets itself (``bob.add_dataset(ds, key="mnist")``, or tensors listed
in its config). They are tagged ``#<key>`` plus ``#data`` / ``#target``, so
``FederatedDataset.from_workers([bob, alice], "mnist")`` finds them (see :func:`dataset_on`).

Example:
    >>> fd = sy.BaseDataset(x, y).federate((bob, alice))
    >>> for data, target in sy.FederatedDataLoader(fd, batch_size=32, shuffle=True):
    ...     model.send(data.location)
    ...     ...
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .client.worker import Worker
from .exceptions import ObjectNotFoundError
from .pointers import PointerTensor

__all__ = [
    "BaseDataset",
    "FederatedDataset",
    "FederatedDataLoader",
    "dataset_federate",
    "dataset_on",
    "dataset_tensors",
    "DATA_TAG",
    "TARGET_TAG",
]

log = logging.getLogger("fedws.datasets")

DATA_TAG = "#data"
"""Tag of a served dataset's features (with ``#<key>``), as PySyft's sandbox tagged them."""
TARGET_TAG = "#target"
"""Tag of a served dataset's targets (with ``#<key>``)."""


class BaseDataset(Dataset[tuple[Any, Any]]):
    """Features and targets held together, locally or on a worker (as pointers).

    Args:
        data: the examples, first dimension indexing them (a tensor or a pointer).
        targets: the labels, one per example.
        transform: applied to one local example at a time in ``dataset[i]`` (it receives
            a numpy array, as in PySyft, so torchvision transforms work) and before sending
            in :meth:`federate`. It cannot run on a node: nodes run no user code.

    Example:
        >>> ds = sy.BaseDataset(torch.randn(100, 3), torch.randint(0, 2, (100,)))
        >>> fd = ds.federate((bob, alice))
    """

    def __init__(self, data: Any, targets: Any, transform: Callable[[Any], Any] | None = None) -> None:
        if len(data) != len(targets):
            raise ValueError(f"data has {len(data)} examples but targets has {len(targets)}")
        self.data = data
        self.targets = targets
        self.transform_ = transform

    def __len__(self) -> int:
        return int(len(self.data))

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        elem = self.data[index]
        if self.transform_ is not None and not isinstance(elem, PointerTensor):
            elem = torch.as_tensor(self.transform_(elem.numpy()))
        return elem, self.targets[index]

    @property
    def location(self) -> Worker | None:
        """The worker holding the data (None for local data)."""
        return self.data.location if isinstance(self.data, PointerTensor) else None

    def transform(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``transform`` to the whole local data tensor at once (PySyft's method).

        Raises:
            TypeError: the data is on a worker (a node runs no user code).
        """
        if isinstance(self.data, PointerTensor) or not isinstance(self.data, torch.Tensor):
            raise TypeError("transforms can be applied only to local torch tensors")
        self.data = transform(self.data)

    def send(self, worker: Worker) -> BaseDataset:
        """A dataset of pointers: data and targets sent to ``worker`` (this one unchanged)."""
        data, targets = dataset_tensors(self)
        return BaseDataset(data.send(worker), targets.send(worker))  # type: ignore[attr-defined]

    def get(self) -> BaseDataset:
        """Bring data and targets back from their worker; returns this dataset."""
        if isinstance(self.data, PointerTensor):
            self.data = self.data.get()
        if isinstance(self.targets, PointerTensor):
            self.targets = self.targets.get()
        return self

    def get_data(self) -> Any:
        return self.data

    def get_targets(self) -> Any:
        return self.targets

    def federate(self, *workers: Any, partition: Sequence[Sequence[int]] | None = None) -> FederatedDataset:
        """Split this dataset across ``workers`` (see :func:`dataset_federate`)."""
        return dataset_federate(self, *workers, partition=partition)

    def __repr__(self) -> str:
        where = f" on {self.location.id}" if self.location is not None else ""
        return f"BaseDataset{where}\n\tData: {self.data}\n\ttargets: {self.targets}"


def dataset_tensors(dataset: Any, indices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (data, targets) tensors of a local dataset, transforms applied, ``indices`` only.

    A :class:`BaseDataset` of plain tensors is sliced directly; any other
    ``torch.utils.data.Dataset`` (a ``TensorDataset``, torchvision's MNIST) is read through a
    ``DataLoader``, as PySyft did, so its transform runs and its examples are stacked.
    """
    if isinstance(dataset, BaseDataset) and dataset.transform_ is None:
        data, targets = dataset.data, dataset.targets
        if isinstance(data, PointerTensor) or isinstance(targets, PointerTensor):
            raise TypeError("the dataset is already on a worker: get() it first, or move its tensors")
        if not isinstance(data, torch.Tensor) or not isinstance(targets, torch.Tensor):
            data, targets = torch.as_tensor(data), torch.as_tensor(targets)
        if indices is None:
            return data, targets
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return data[index], targets[index]
    subset: Dataset[Any] = dataset if indices is None else Subset(dataset, list(indices))
    n = len(subset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("cannot take the tensors of an empty dataset")
    batch = next(iter(DataLoader(subset, batch_size=n)))
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError("a dataset to federate must yield (data, target) pairs")
    return torch.as_tensor(batch[0]), torch.as_tensor(batch[1])


def dataset_federate(
    dataset: Any, *workers: Any, partition: Sequence[Sequence[int]] | None = None
) -> FederatedDataset:
    """Split ``dataset`` across ``workers`` and send each part; a :class:`FederatedDataset`.

    Installed as ``torch.utils.data.Dataset.federate`` by ``sy.TorchHook`` (and a method of
    :class:`BaseDataset`), as in PySyft: ``datasets.MNIST(...).federate((bob, alice))``.

    Args:
        dataset: a local dataset yielding ``(data, target)`` pairs.
        workers: the workers, as arguments or one tuple/list.
        partition: the example indices each worker gets, one list per worker (see
            :mod:`fedws.fl.partition`). Default: contiguous parts of ``ceil(n / k)``
            examples, as PySyft split. A worker with no example gets no dataset.
    """
    if len(workers) == 1 and isinstance(workers[0], (list, tuple)):
        workers = tuple(workers[0])
    if not workers:
        raise ValueError("federate() needs at least one worker")
    for w in workers:
        if not isinstance(w, Worker):
            raise TypeError(f"federate() expects workers, got {type(w).__name__}")
    if len({w.id for w in workers}) != len(workers):
        raise ValueError("federate() got the same worker twice")
    n = len(dataset)
    if partition is None:
        size = math.ceil(n / len(workers))
        partition = [range(i * size, min(n, (i + 1) * size)) for i in range(len(workers))]
    elif len(partition) != len(workers):
        raise ValueError(f"partition has {len(partition)} parts for {len(workers)} workers")
    log.info("sending data to %s", ", ".join(w.id for w in workers))
    parts = []
    for worker, indices in zip(workers, partition):
        if len(indices) == 0:
            continue
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise IndexError(f"partition index {bad[0]} is out of range for {n} examples")
        data, targets = dataset_tensors(dataset, indices)
        parts.append(BaseDataset(data.send(worker), targets.send(worker)))  # type: ignore[attr-defined]
    return FederatedDataset(parts)


def dataset_on(worker: Worker, key: str) -> BaseDataset:
    """The dataset ``worker`` serves under ``key`` (``"mnist"`` or ``"#mnist"``), as pointers.

    Found by search: one tensor tagged ``#<key>`` and ``#data``, one tagged ``#<key>`` and
    ``#target``. The pointers do not own the data: dropping them never deletes it.

    Raises:
        ObjectNotFoundError: the worker holds none, or several, of either tensor.
    """
    tag = key if key.startswith("#") else f"#{key}"
    found = []
    for role in (DATA_TAG, TARGET_TAG):
        ptrs = worker.search(tag, role)
        if len(ptrs) != 1:
            raise ObjectNotFoundError(
                f"worker {worker.id!r} holds {len(ptrs)} tensors tagged {tag} {role}, expected exactly 1",
                worker=worker.id,
            )
        found.append(ptrs[0])
    return BaseDataset(found[0], found[1])


class FederatedDataset:
    """Datasets already on their workers, by worker id: the input of a FederatedDataLoader.

    Args:
        datasets: :class:`BaseDataset` objects whose data are pointers, one per worker.

    Raises:
        TypeError: a dataset is local (send or federate it first).
        ValueError: two datasets are on the same worker.
    """

    def __init__(self, datasets: Sequence[BaseDataset]) -> None:
        self.datasets: dict[str, BaseDataset] = {}
        for ds in datasets:
            where = ds.location
            if where is None or not isinstance(ds.targets, PointerTensor) or ds.targets.location is not where:
                raise TypeError("a FederatedDataset holds datasets whose data and targets are on one worker")
            if where.id in self.datasets:
                raise ValueError(f"two datasets are on worker {where.id!r}")
            self.datasets[where.id] = ds

    @classmethod
    def from_workers(cls, workers: Sequence[Worker], key: str) -> FederatedDataset:
        """The datasets ``workers`` serve under ``key`` (see :func:`dataset_on`)."""
        return cls([dataset_on(w, key) for w in workers])

    @property
    def workers(self) -> list[str]:
        """The ids of the workers holding a part."""
        return list(self.datasets)

    locations = workers

    def __getitem__(self, worker: str | Worker) -> BaseDataset:
        return self.datasets[worker.id if isinstance(worker, Worker) else worker]

    def __len__(self) -> int:
        return sum(len(ds) for ds in self.datasets.values())

    def get_dataset(self, worker: str | Worker) -> BaseDataset:
        """Bring one worker's part back and drop it from this federated dataset."""
        wid = worker.id if isinstance(worker, Worker) else worker
        return self.datasets.pop(wid).get()

    def __repr__(self) -> str:
        return (
            f"FederatedDataset\n    Distributed accross: {', '.join(self.workers)}\n"
            f"    Number of datapoints: {len(self)}\n"
        )


Batch = tuple[Any, Any]


class FederatedDataLoader:
    """Batches of a :class:`FederatedDataset`, cut on the workers that hold them.

    As PySyft 0.2's loader: by default it yields ``(data_ptr, target_ptr)``, every batch of
    the first worker, then of the next. With ``iter_per_worker=True`` each step yields a
    dict ``{worker: (data_ptr, target_ptr)}`` with one batch of every worker, and the
    iteration ends when the first worker runs out. The loader is its own iterator
    (``iter(loader)`` restarts it, reshuffling when ``shuffle``).

    Args:
        federated_dataset: the datasets on their workers.
        batch_size: examples per batch.
        shuffle: a new random order of each worker's examples every epoch.
        drop_last: drop each worker's last incomplete batch.
        iter_per_worker: one batch per worker per step, as a dict.
        generator: the torch.Generator shuffling draws from (default: torch's global one).
        **kwargs: DataLoader options that mean nothing here (``num_workers``,
            ``pin_memory``): logged and ignored, as PySyft did.

    Raises:
        TypeError: the dataset is not a FederatedDataset.
    """

    def __init__(
        self,
        federated_dataset: FederatedDataset,
        batch_size: int = 8,
        shuffle: bool = False,
        num_iterators: int = 1,
        drop_last: bool = False,
        iter_per_worker: bool = False,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            log.warning("FederatedDataLoader ignores these options: %s", ", ".join(f"{k}={v}" for k, v in kwargs.items()))
        if not isinstance(federated_dataset, FederatedDataset):
            raise TypeError("this dataset is not a FederatedDataset: use torch.utils.data.DataLoader instead")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if num_iterators != 1 and not iter_per_worker:
            raise NotImplementedError("num_iterators > 1 is not supported; iter_per_worker=True draws from every worker")
        self.federated_dataset = federated_dataset
        self.workers = federated_dataset.workers
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.iter_per_worker = iter_per_worker
        self.num_iterators = len(self.workers) if iter_per_worker else 1
        self.generator = generator
        self._iters: list[Iterator[Batch]] = []
        self._started = False

    def _batches_of(self, worker_id: str) -> int:
        n = len(self.federated_dataset[worker_id])
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        """Batches per epoch (steps, with ``iter_per_worker``)."""
        counts = [self._batches_of(w) for w in self.workers]
        if self.iter_per_worker:
            return min(counts, default=0)
        return sum(counts)

    def _worker_batches(self, worker_id: str) -> Iterator[Batch]:
        ds = self.federated_dataset[worker_id]
        n = len(ds)
        order = torch.randperm(n, generator=self.generator).tolist() if self.shuffle else None
        for start in range(0, n, self.batch_size):
            stop = min(n, start + self.batch_size)
            if stop - start < self.batch_size and self.drop_last:
                return
            yield take_batch(ds, order[start:stop] if order is not None else slice(start, stop))

    def __iter__(self) -> FederatedDataLoader:
        if self.iter_per_worker:
            self._iters = [self._worker_batches(w) for w in self.workers]
        else:
            self._iters = [_chain(self._worker_batches(w) for w in self.workers)]
        self._started = True
        return self

    def __next__(self) -> Any:
        if not self._started:
            self.__iter__()
        if not self.iter_per_worker:
            return next(self._iters[0])
        step = {}
        for it in self._iters:
            data, target = next(it)
            step[data.location] = (data, target)
        return step


def _chain(parts: Iterator[Iterator[Batch]]) -> Iterator[Batch]:
    for part in parts:
        yield from part


def take_batch(ds: BaseDataset, index: slice | list[int]) -> Batch:
    """``(data[index], targets[index])``: on a worker, one indexing command per tensor.

    A slice is a view of the worker's tensors; a list of indices gathers a copy.
    """
    return ds.data[index], ds.targets[index]
