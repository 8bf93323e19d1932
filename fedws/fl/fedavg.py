"""FedAvg: the coordinator loop that trains one model across many worker nodes.

Each round: select nodes (seeded), send each the current model, queue local training on
all of them, then wait for all of them against one deadline. Nodes that fail, vanish or
are too slow are dropped from the round with a warning on the ``fedws.fl`` logger; the
answers of the others are averaged weighted by their sample counts (McMahan et al.,
2017), on the coordinator or — with ``aggregator=`` — on a trusted worker so that the
coordinator only ever sees the average.

Example:
    >>> trainer = FedAvg(model, [alice, bob, charlie], FedAvgConfig(rounds=5),
    ...                  test_data=(x_test, y_test))
    >>> history = trainer.fit()
    >>> history[-1].test_accuracy
    0.93
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..client.worker import Worker
from ..exceptions import PlanError, PointerError, RoundFailedError
from ..pointers import PointerTensor
from .aggregate import fedavg
from .checkpoint import load_checkpoint, save_checkpoint
from .config import FedAvgConfig
from .evaluate import evaluate
from .history import History, RoundMetrics
from .local_training import (
    LocalRun,
    LossFn,
    NodeData,
    TrainingPlans,
    data_from_search,
    find_data,
    start_local_training,
)
from .progress import progress_bar
from .remote import Deadline, first_error, wait_all
from .sampling import sample_nodes
from .train_config import TrainConfig, local_step
from .train_step import LocalStep, OptimizerLike, SchedulerFactory, StepFn
from .trusted import connect_aggregator, start_trusted_average

__all__ = ["FedAvg", "train_federated"]

log = logging.getLogger("fedws.fl")


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class FedAvg:
    """Federated averaging of ``model`` over ``workers``.

    Args:
        model: a local ``nn.Module``; it is updated in place after every round.
        workers: the nodes. Each holds a training shard tagged ``config.data_tags`` plus
            ``config.x_tag`` / ``config.y_tag``; the data never leaves it.
        config: rounds, sampling, local training, timeouts (:class:`FedAvgConfig`).
        test_data: ``(x, y)`` held out on the coordinator, scored after every round.
        loss_fn: ``loss_fn(output, target)``; runs on the nodes, so only allowlisted ops.
        aggregator: a trusted worker that averages the updates so the coordinator never
            receives an individual one. None: average on the coordinator.
        checkpoint_dir: save a checkpoint there after every round; ``fit(resume=True)``
            continues from it.
        progress: show a tqdm bar; None shows it on a terminal and in a Jupyter notebook (a widget when ipywidgets is installed).
        on_round: called with each round's metrics (printing, early stopping by raising).
        train_step: your own ``train_step(model, optimizer, x, y) -> loss``, traced into a
            plan (contract: :mod:`fedws.fl.train_step`). None: the built-in SGD step.
        optimizer, optimizer_args: ``"Adam"``/``torch.optim.AdamW``/a factory, and its keywords.
        lr_scheduler, max_grad_norm: a torch scheduler factory (per local run); clipping.
        train_config: a :class:`TrainConfig` giving the step, optimizer, schedule, clipping
            and loss at once (epochs, batch size and seed stay ``config``'s).
        round_config: ``round_config(worker_id, round) -> {"lr": ..., "proximal_mu": ...}``,
            the per-node config of a round.
    """

    def __init__(
        self,
        model: nn.Module,
        workers: Sequence[Worker],
        config: FedAvgConfig | None = None,
        *,
        test_data: tuple[torch.Tensor, torch.Tensor] | None = None,
        loss_fn: LossFn = F.cross_entropy,
        aggregator: Worker | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        progress: bool | None = None,
        on_round: Callable[[RoundMetrics], None] | None = None,
        train_step: StepFn | None = None,
        optimizer: OptimizerLike | None = None,
        optimizer_args: Mapping[str, Any] | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        max_grad_norm: float | None = None,
        train_config: TrainConfig | None = None,
        round_config: Callable[[str, int], Mapping[str, Any]] | None = None,
    ) -> None:
        if not workers:
            raise ValueError("FedAvg needs at least one worker")
        ids = [w.id for w in workers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"worker ids must be unique, got {ids}")
        if any(isinstance(p, PointerTensor) for p in model.parameters()):
            raise PointerError("FedAvg trains a local model; call model.get() first")
        self.model = model
        self.workers = list(workers)
        self.config = config or FedAvgConfig()
        self.test_data = test_data
        self.loss_fn = loss_fn
        self.aggregator = aggregator
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress
        self.on_round = on_round
        self.history = History()
        self._data: dict[str, NodeData] = {}
        self._plans = TrainingPlans()  # the training-step plan, traced once, kept on the nodes
        self.round_config = round_config
        self.step: LocalStep | None = train_config.step if train_config is not None else None
        if train_config is not None:
            self.loss_fn = train_config.loss_fn
        elif any(v is not None for v in (train_step, optimizer, optimizer_args, lr_scheduler, max_grad_norm)):
            self.step = local_step(
                loss_fn=loss_fn, train_step=train_step, optimizer=optimizer, optimizer_args=optimizer_args,
                lr_scheduler=lr_scheduler, max_grad_norm=max_grad_norm,
                default_lr=self.config.lr, default_momentum=self.config.momentum,
            )
        if aggregator is not None:
            connect_aggregator(aggregator, self.workers)

    # -- the run ----------------------------------------------------------------------

    def fit(self, *, resume: bool = False) -> History:
        """Run the remaining rounds; returns the :class:`History` of the whole run.

        Args:
            resume: load the checkpoint in ``checkpoint_dir`` (if any) and continue after
                its round, with its model and history.

        Raises:
            RoundFailedError: a round had fewer than ``min_nodes`` answers, or the aggregator
                failed.
        """
        first = 1
        if resume:
            if self.checkpoint_dir is None:
                raise ValueError("resume=True needs checkpoint_dir")
            ck = load_checkpoint(self.checkpoint_dir)
            if ck is not None:
                self.model.load_state_dict(ck.state)
                self.history = ck.history
                first = ck.round + 1
                log.info("resuming after round %d from %s", ck.round, self.checkpoint_dir)
        rounds = range(first, self.config.rounds + 1)
        bar = progress_bar(rounds, show=self.progress, desc="fedavg", unit="round")
        with bar:
            for r in bar:
                metrics = self.run_round(r)
                self.history.append(metrics)
                if self.checkpoint_dir is not None:
                    save_checkpoint(
                        self.checkpoint_dir, self.model.state_dict(), r, self.history, self.config.to_dict()
                    )
                bar.set_postfix(loss=metrics.train_loss, acc=metrics.test_accuracy, nodes=len(metrics.nodes))
                if self.on_round is not None:
                    self.on_round(metrics)
        return self.history

    def run_round(self, round_number: int) -> RoundMetrics:
        """One round: select, train everywhere at once, wait, average, score."""
        cfg = self.config
        t0 = time.perf_counter()
        selected = sample_nodes(
            self.workers, cfg.nodes_to_select(len(self.workers)), seed=cfg.seed, round_number=round_number
        )
        deadline = Deadline(cfg.round_timeout)
        dropped: dict[str, str] = {}

        def drop(worker_id: str, exc: BaseException) -> None:
            dropped[worker_id] = _why(exc)
            self._data.pop(worker_id, None)  # look the shard up afresh next time
            self._plans.forget(worker_id)  # and send it the plan again
            log.warning("round %d: dropped node %r: %s", round_number, worker_id, _why(exc))

        self._discover([w for w in selected if w.id not in self._data], deadline, drop)
        runs: dict[str, LocalRun] = {}
        for w in selected:
            if w.id in dropped:
                continue
            try:
                runs[w.id] = start_local_training(
                    self.model,
                    self._data[w.id],
                    cfg,
                    round_number=round_number,
                    loss_fn=self.loss_fn,
                    fetch_state=self.aggregator is None,
                    plans=self._plans,
                    step=self.step,
                    round_config=self.round_config(w.id, round_number) if self.round_config else None,
                )
            except PlanError:  # the user's step breaks the plan contract: no node is at fault
                raise
            except Exception as exc:  # a node that fails while we queue work (link lost)
                drop(w.id, exc)
        results, failures = wait_all({wid: run.futures for wid, run in runs.items()}, deadline)
        for wid, failure in failures.items():
            drop(wid, failure)
        answered: list[str] = []
        for wid in list(results):
            run = runs[wid]
            err = first_error(run.data.worker, run.start_seq, run.end_seq)
            if err is not None:
                drop(wid, err)
            else:
                answered.append(wid)
        if len(answered) < cfg.min_nodes:
            reasons = "; ".join(f"{k}: {v}" for k, v in dropped.items()) or "none selected"
            raise RoundFailedError(
                f"round {round_number}: only {len(answered)} of {len(selected)} selected nodes answered, "
                f"min_nodes is {cfg.min_nodes} ({reasons})",
                round=round_number,
                answered=[str(a) for a in answered],
                min_nodes=cfg.min_nodes,
                dropped={str(k): str(v) for k, v in dropped.items()},
            )
        ok_runs = [runs[wid] for wid in answered]
        state = self._aggregate(ok_runs, {wid: results[wid] for wid in answered}, round_number)
        self.model.load_state_dict(state)
        seen = sum(r.examples_seen for r in ok_runs)
        train_loss = sum(float(results[r.node_id][1]) for r in ok_runs) / seen
        metrics = RoundMetrics(
            round=round_number,
            train_loss=train_loss,
            nodes=answered,
            dropped=dropped,
            num_examples=sum(r.data.num_examples for r in ok_runs),
        )
        if self.test_data is not None:
            metrics.test_loss, metrics.test_accuracy = evaluate(self.model, *self.test_data, self.loss_fn)
        metrics.seconds = time.perf_counter() - t0
        log.info(
            "round %d: %d nodes, train loss %.4f, test accuracy %s",
            round_number, len(answered), train_loss, metrics.test_accuracy,
        )
        return metrics

    # -- steps ------------------------------------------------------------------------

    def _discover(
        self, workers: Sequence[Worker], deadline: Deadline, drop: Callable[[str, BaseException], None]
    ) -> None:
        searches: dict[str, list[Any]] = {}
        by_id = {w.id: w for w in workers}
        for w in workers:
            try:
                searches[w.id] = list(find_data(w, self.config))
            except Exception as exc:
                drop(w.id, exc)
        found, failures = wait_all(searches, deadline)
        for wid, failure in failures.items():
            drop(wid, failure)
        for wid, (xs, ys) in found.items():
            try:
                self._data[wid] = data_from_search(by_id[wid], self.config, xs, ys)
            except Exception as exc:
                drop(wid, exc)

    def _aggregate(
        self, runs: list[LocalRun], results: dict[str, list[Any]], round_number: int
    ) -> dict[str, torch.Tensor]:
        if self.aggregator is None:
            updates = [(dict(zip(r.state_keys, results[r.node_id][2:])), r.data.num_examples) for r in runs]
            return fedavg(updates)
        keys, futures = start_trusted_average(runs, self.aggregator)
        averaged, failed = wait_all({"average": futures}, Deadline(self.config.round_timeout))
        if failed:
            exc = failed["average"]
            raise RoundFailedError(
                f"round {round_number}: aggregator {self.aggregator.id!r} failed: {_why(exc)}",
                round=round_number,
            ) from exc
        return dict(zip(keys, averaged["average"]))


def train_federated(
    model: nn.Module, workers: Sequence[Worker], config: FedAvgConfig | None = None, **kwargs: Any
) -> History:
    """``FedAvg(model, workers, config, **kwargs).fit()``: the one-call form."""
    return FedAvg(model, workers, config, **kwargs).fit()
