"""FedAvg as pure functions: state dicts and sample counts in, one state dict out.

Nothing here does I/O or knows about workers, so the arithmetic of federated averaging is
tested on its own (``tests/fl/test_fl_aggregate.py``) and reused by every way of
training: on the coordinator, or on a trusted aggregator worker (:mod:`fedws.fl.trusted`).
Both run the same :func:`weighted_average` — on local tensors here, on pointers there (a
pointer is a tensor whose ops run on its node) — so both give the same model, down to how
a tie rounds.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "RunningAverage",
    "StateDict",
    "Update",
    "fedavg",
    "fedavg_weights",
    "validate_updates",
    "weighted_average",
]

StateDict = Mapping[str, torch.Tensor]
Update = tuple[StateDict, int]


def fedavg_weights(num_examples: Sequence[int]) -> list[float]:
    """Each update's share of the average: its sample count over the total.

    A node that trained on more examples moves the global model further, which is what
    makes FedAvg equal to centralized SGD on the union of the data in the simple case.

    Raises:
        ValueError: a count is negative, or they sum to zero.
    """
    counts = [int(n) for n in num_examples]
    if not counts:
        raise ValueError("fedavg needs at least one update")
    for i, n in enumerate(counts):
        if n < 0:
            raise ValueError(f"update {i} has a negative sample count ({n})")
    total = sum(counts)
    if total == 0:
        raise ValueError("fedavg: every update has 0 examples, nothing to weigh them by")
    return [n / total for n in counts]


def validate_updates(updates: Sequence[Update]) -> None:
    """Check that the updates can be averaged: same keys, shapes and dtypes everywhere.

    Checked up front so that a node that sent a different model is named in the error
    instead of surfacing as a shape error halfway through the average.

    Raises:
        ValueError: no updates, a mismatched key set, shape or dtype, or a non-tensor.
    """
    if not updates:
        raise ValueError("fedavg needs at least one update")
    first, _ = updates[0]
    keys = list(first.keys())
    for i, (state, _n) in enumerate(updates):
        if set(state.keys()) != set(keys):
            missing = sorted(set(keys) - set(state.keys()))
            extra = sorted(set(state.keys()) - set(keys))
            raise ValueError(
                f"update {i} does not have the keys of update 0 (missing {missing}, extra {extra})"
            )
        for key in keys:
            ref, value = first[key], state[key]
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"update {i}: {key!r} is a {type(value).__name__}, not a tensor")
            if value.shape != ref.shape:
                raise ValueError(
                    f"update {i}: {key!r} has shape {tuple(value.shape)}, update 0 has {tuple(ref.shape)}"
                )
            if value.dtype != ref.dtype:
                raise ValueError(f"update {i}: {key!r} has dtype {value.dtype}, update 0 has {ref.dtype}")


def fedavg(updates: Sequence[Update]) -> dict[str, torch.Tensor]:
    """Average state dicts weighted by the number of examples each was trained on.

    Floating-point entries are averaged in float64 and cast back, so the result does not
    depend on the order of the updates beyond rounding. Integer entries (such as a
    BatchNorm's ``num_batches_tracked``) are averaged the same way and rounded.

    Args:
        updates: ``(state_dict, num_examples)`` pairs, one per node.

    Returns:
        A new state dict with the keys (in the order) of the first update.

    Raises:
        ValueError: see :func:`validate_updates` and :func:`fedavg_weights`.

    Example:
        >>> fedavg([({"w": torch.tensor([0.0])}, 1), ({"w": torch.tensor([3.0])}, 2)])
        {'w': tensor([2.])}
    """
    validate_updates(updates)
    weights = fedavg_weights([n for _, n in updates])
    first, _ = updates[0]
    return {key: weighted_average([state[key] for state, _n in updates], weights) for key in first}


def weighted_average(values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum(w * v)`` computed wide and cast back to the dtype of ``values[0]``.

    The sum runs in float64 (complex128 for complex entries), so it does not depend on the
    order of the updates beyond rounding. Cast back: floating and complex entries as they
    are; integers rounded half to even (``torch.round``); bools by majority, a 0.5 tie
    counting as True (``sum >= 0.5``). Terms with weight 0 are skipped, so a node that
    trained on nothing cannot bring a NaN in.

    Only tensor ops are used, so ``values`` may be pointers on one worker: the trusted
    aggregator averages there with this very function.

    Args:
        values: one tensor per update, same shape and dtype (see :func:`validate_updates`).
        weights: one weight per update, from :func:`fedavg_weights`.

    Example:
        >>> weighted_average([torch.tensor([True]), torch.tensor([False])], [0.5, 0.5])
        tensor([True])
    """
    dtype = values[0].dtype
    wide = torch.complex128 if dtype.is_complex else torch.float64
    total: torch.Tensor | None = None
    for value, w in zip(values, weights):
        if w:
            term = value.detach().to(wide) * w
            total = term if total is None else total + term
    if total is None:
        raise ValueError("weighted_average: every weight is 0")
    if dtype.is_floating_point or dtype.is_complex:
        return total.to(dtype)
    if dtype == torch.bool:
        return total >= 0.5
    return total.round().to(dtype)


class RunningAverage:
    """FedAvg folded in one update at a time: ``sum(n * state)`` and ``sum(n)``, nothing else.

    A round of 1,000 nodes does not have to hold 1,000 models: each update is added to a
    float64 (complex128) running sum as it arrives and can be freed at once, so memory is
    one model wide whatever the number of nodes. The result equals :func:`fedavg` of the
    same updates up to float64 rounding (the sum is ``n * v`` then divided by the total,
    where :func:`fedavg` multiplies by ``n / total``), cast back the same way. Only for
    strategies that need nothing but the weighted mean: a median or Krum needs every update
    at once, so those keep buffering them. ``add`` may be called from several threads.

    Example:
        >>> avg = RunningAverage()
        >>> avg.add({"w": torch.tensor([0.0])}, 1); avg.add({"w": torch.tensor([3.0])}, 2)
        >>> avg.result()
        {'w': tensor([2.])}
    """

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] | None = None
        self._specs: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self.total = 0
        self.count = 0
        self._lock = threading.Lock()

    def add(self, state: StateDict, num_examples: int) -> None:
        """Fold one node's state in, weighted by its example count.

        Raises:
            ValueError: a negative count, or keys, shapes or dtypes that differ from the
                first update's (checked before anything is added, so a bad update leaves the
                sum as it was).
        """
        n = int(num_examples)
        if n < 0:
            raise ValueError(f"update {self.count} has a negative sample count ({n})")
        with self._lock:
            if self._sum is None:
                validate_updates([(state, n)])
                self._specs = {k: (v.shape, v.dtype) for k, v in state.items()}
                self._sum = {k: torch.zeros_like(_wide(v)) for k, v in state.items()}
            else:
                self._check(state)
            if n:  # a node that trained on nothing cannot bring a NaN in
                for k, v in state.items():
                    self._sum[k].add_(_wide(v), alpha=n)
            self.total += n
            self.count += 1

    def _check(self, state: StateDict) -> None:
        if set(state.keys()) != set(self._specs):
            missing, extra = sorted(set(self._specs) - set(state)), sorted(set(state) - set(self._specs))
            raise ValueError(f"update {self.count} does not have the keys of update 0 (missing {missing}, extra {extra})")
        for key, (shape, dtype) in self._specs.items():
            value = state[key]
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"update {self.count}: {key!r} is a {type(value).__name__}, not a tensor")
            if value.shape != shape or value.dtype != dtype:
                raise ValueError(
                    f"update {self.count}: {key!r} is {tuple(value.shape)} {value.dtype}, update 0 is {tuple(shape)} {dtype}"
                )

    def result(self) -> dict[str, torch.Tensor]:
        """The weighted average so far, in the keys (order) and dtypes of the first update.

        Raises:
            ValueError: nothing was added, or every update had 0 examples.
        """
        with self._lock:
            if self._sum is None:
                raise ValueError("fedavg needs at least one update")
            if self.total == 0:
                raise ValueError("fedavg: every update has 0 examples, nothing to weigh them by")
            return {k: _narrow(self._sum[k] / self.total, dtype) for k, (_shape, dtype) in self._specs.items()}


def _wide(value: torch.Tensor) -> torch.Tensor:
    return value.detach().to(torch.complex128 if value.dtype.is_complex else torch.float64)


def _narrow(total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a wide average back as :func:`weighted_average` does."""
    if dtype.is_floating_point or dtype.is_complex:
        return total.to(dtype)
    if dtype == torch.bool:
        return total >= 0.5
    return total.round().to(dtype)
