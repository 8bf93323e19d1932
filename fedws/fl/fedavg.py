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
from .aggregate import RunningAverage
from .checkpoint import load_checkpoint, restore_run_state, run_state, save_checkpoint
from .config import FedAvgConfig
from .dp import DPConfig, Privacy, check_dp_combination, secure_dp_aggregate, start_dp_release
from .federated_eval import FederatedEvaluator, score_round
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
from .metrics import Metric
from .progress import progress_bar
from .remote import Deadline, first_error, stream_all, wait_all
from .sampling import select_nodes
from .secagg import SecAggConfig, secure_sum
from .strategies import get_strategy
from .strategy import FitResult, Strategy, WeightedAverageStrategy
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
        dp: differential privacy (:class:`~fedws.fl.dp.DPConfig`): each node clips and
            noises its update itself (``mode="local"``) or the coordinator clips the
            updates and noises their average (``"central"``); epsilon per round in History.
        secure_aggregation: each node masks its ``num_examples``-scaled update (and its
            count) on the node and the coordinator unmasks only their sum
            (:mod:`fedws.fl.secagg`; threshold ``config.secagg_threshold``). A
            :class:`~fedws.fl.secagg.SecAggConfig` picks SecAgg+ (``neighbours=k``) and the
            threshold. With ``dp=``, the nodes clip and noise before masking (local or
            ``"distributed"`` DP, :mod:`fedws.fl.dp`).
        strategy: how answers become the next model (a name such as ``"fedadam"`` or a
            :class:`~fedws.fl.strategy.Strategy`); None: ``config.strategy``. With
            ``aggregator=`` only weighted-average strategies work (the average is all the
            coordinator gets).
        metrics: what to score, by name or :class:`~fedws.fl.metrics.Metric` (default
            ``config.metrics``, else by task); used centrally and on the nodes.
        evaluate_on_nodes: also evaluate on each node's held-out shard (default
            ``config.evaluate_on_nodes``); per-node figures go to the History.
        federated_eval: a :class:`~fedws.fl.federated_eval.FederatedEvaluator` of your own
            (another data location, bins, timeout); implies ``evaluate_on_nodes``.
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
        dp: DPConfig | None = None,
        secure_aggregation: bool | SecAggConfig = False,
        strategy: str | Strategy | None = None,
        metrics: Sequence[str | Metric] | None = None,
        evaluate_on_nodes: bool | None = None,
        federated_eval: FederatedEvaluator | None = None,
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
        self.secure_aggregation = bool(secure_aggregation)
        self.secagg = secure_aggregation if isinstance(secure_aggregation, SecAggConfig) else SecAggConfig()
        if secure_aggregation and aggregator is not None:
            raise ValueError("FedAvg: choose secure_aggregation or a trusted aggregator, not both")
        self.history = History()
        self._data: dict[str, NodeData] = {}
        self._plans = TrainingPlans()  # the training-step plan, traced once, kept on the nodes
        self.strategy = get_strategy(strategy if strategy is not None else self.config.strategy)
        #: per node id, the round config of the current round (``Strategy.configure_fit``).
        self.fit_configs: dict[str, dict[str, Any]] = {}
        if aggregator is not None and not isinstance(self.strategy, WeightedAverageStrategy):
            raise ValueError(
                f"strategy {self.strategy!r} needs every node's model, but with aggregator= the coordinator "
                "only receives their weighted average; use a weighted-average strategy (fedavg, fedprox, "
                "fedavgm, fedadam, fedyogi, fedadagrad) or drop aggregator="
            )
        if dp is not None and aggregator is not None:
            raise ValueError("FedAvg: dp= and aggregator= do not combine (the aggregator would see raw updates)")
        if dp is not None:
            check_dp_combination(dp, self.secure_aggregation)
        self.dp = Privacy(dp) if dp is not None else None
        if dp is not None and self.strategy.name != "fedavg":
            raise ValueError(f"FedAvg: dp= works with the fedavg strategy only, not {self.strategy.name!r}")
        if secure_aggregation and not isinstance(self.strategy, WeightedAverageStrategy):
            raise ValueError(
                f"strategy {self.strategy!r} needs every node's model; with secure_aggregation=True the "
                "coordinator learns only their weighted sum: use a weighted-average strategy"
            )
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
        cfg = self.config
        chosen: list[str | Metric] = list(metrics or cfg.metrics)
        self.score_metrics = chosen or None
        on_nodes = cfg.evaluate_on_nodes if evaluate_on_nodes is None else evaluate_on_nodes
        if federated_eval is None and on_nodes:
            federated_eval = FederatedEvaluator(
                self.score_metrics, loss_fn=loss_fn, tags=cfg.eval_tags, x_tag=cfg.x_tag, y_tag=cfg.y_tag,
                timeout=cfg.round_timeout,
            )
        self.federated_eval = federated_eval

    def _round_config(self, worker_id: str, round_number: int) -> dict[str, Any] | None:
        """What a node's local step reads this round: the strategy's ``configure_fit``
        (FedProx's ``proximal_mu``), overridden by the user's ``round_config`` (``lr``...)."""
        merged = dict(self.fit_configs.get(worker_id, {}))
        if self.round_config is not None:
            merged.update(self.round_config(worker_id, round_number))
        return merged or None

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
                restore_run_state(ck, self.strategy, self.dp)
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
                        self.checkpoint_dir, self.model.state_dict(), r, self.history, self.config.to_dict(),
                        **run_state(self.strategy, self.dp),
                    )
                bar.set_postfix(loss=metrics.train_loss, acc=metrics.test_accuracy, nodes=len(metrics.nodes))
                if self.on_round is not None:
                    self.on_round(metrics)
                stop = self.config.early_stopping
                if stop is not None and stop.update(metrics, self.model.state_dict(), self.history, self.config.to_dict()):
                    log.info("early stop after round %d: no better %s since round %s", r, stop.metric, stop.best_round)
                    break
        stop = self.config.early_stopping
        if stop is not None and stop.restore_best and stop.best_state is not None:
            self.model.load_state_dict(stop.best_state)
        return self.history

    def run_round(self, round_number: int) -> RoundMetrics:
        """One round: select, train everywhere at once, wait, average, score."""
        cfg = self.config
        t0 = time.perf_counter()
        selected = select_nodes(
            cfg.sampling, self.workers, cfg.nodes_to_select(len(self.workers)),
            seed=cfg.seed, round_number=round_number,
            weights=self._example_weights() if cfg.sampling == "weighted" else None,  # O(all nodes): only when used
        )
        self.fit_configs = self.strategy.configure_fit(round_number, [w.id for w in selected])
        deadline = Deadline(cfg.round_timeout)
        dropped: dict[str, str] = {}

        def drop(worker_id: str, exc: BaseException) -> None:
            dropped[worker_id] = _why(exc)
            self._data.pop(worker_id, None)  # look the shard up afresh next time
            self._plans.forget(worker_id)  # and send it the plan again
            log.warning("round %d: dropped node %r: %s", round_number, worker_id, _why(exc))

        self._discover([w for w in selected if w.id not in self._data], deadline, drop)
        runs: dict[str, LocalRun] = {}
        global_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
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
                    fetch_state=self.aggregator is None and not self.secure_aggregation
                    and (self.dp is None or self.dp.config.mode == "central"),
                    plans=self._plans,
                    step=self.step,
                    round_config=self._round_config(w.id, round_number),
                )
                if self.dp is not None and self.dp.config.mode == "local" and not self.secure_aggregation:
                    start_dp_release(runs[w.id], global_state, self.dp.config)
            except PlanError:  # the user's step breaks the plan contract: no node is at fault
                raise
            except Exception as exc:  # a node that fails while we queue work (link lost)
                drop(w.id, exc)
        # Updates are consumed as they arrive; a plain weighted mean folds each into a running
        # sum and frees it at once (memory: one model, whatever the number of nodes).
        running = RunningAverage() if self._streams() else None
        results: dict[str, list[Any]] = {}
        answered: list[str] = []

        def arrived(wid: str, got: list[Any]) -> None:
            run = runs[wid]
            err = first_error(run.data.worker, run.start_seq, run.end_seq)
            if err is not None:
                raise err
            if running is not None:
                running.add(dict(zip(run.state_keys, got[2:])), run.data.num_examples)
                got = got[:2]
                del run.futures[2:]
            results[wid] = got
            answered.append(wid)

        failures = stream_all({wid: run.futures for wid, run in runs.items()}, deadline, arrived)
        for wid, failure in failures.items():
            drop(wid, failure)
            runs.pop(wid, None)  # its futures are cancelled; its objects on the node are deleted
        order = {w.id: i for i, w in enumerate(selected)}
        answered.sort(key=order.__getitem__)
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
        if running is not None:
            current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            assert isinstance(self.strategy, WeightedAverageStrategy)  # checked by _streams
            state = self.strategy.apply_average(round_number, current, running.result())
        else:
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
        if self.dp is not None:
            metrics.epsilon = self.dp.account([w.id for w in selected], len(self.workers))
        score_round(
            metrics, self.model, test_data=self.test_data, chosen=self.score_metrics, loss_fn=self.loss_fn,
            evaluator=self.federated_eval, workers=self.workers,
        )
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

    def _streams(self) -> bool:
        """Whether this round's updates can be folded in as they arrive: the coordinator
        averages them itself, and the strategy needs nothing but their weighted mean (a
        median or Krum needs every update at once, so those are buffered)."""
        return (
            self.aggregator is None and not self.secure_aggregation and self.dp is None
            and isinstance(self.strategy, WeightedAverageStrategy)
            and type(self.strategy).aggregate_fit is WeightedAverageStrategy.aggregate_fit
        )

    def _example_weights(self) -> list[float]:
        """Each worker's example count for weighted sampling; one not yet seen weighs the mean."""
        known = [self._data[w.id].num_examples for w in self.workers if w.id in self._data]
        mean = sum(known) / len(known) if known else 1.0
        return [float(self._data[w.id].num_examples) if w.id in self._data else mean for w in self.workers]

    def _aggregate(
        self, runs: list[LocalRun], results: dict[str, list[Any]], round_number: int
    ) -> dict[str, torch.Tensor]:
        current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.dp is not None and self.secure_aggregation:
            return secure_dp_aggregate(
                self.dp, runs, current, neighbours=self.secagg.neighbours, timeout=self.config.round_timeout,
                threshold=self.secagg.threshold or self.config.secagg_threshold, round_number=round_number,
            )
        if self.dp is not None:
            got = [(dict(zip(r.state_keys, results[r.node_id][2:])), r.data.num_examples) for r in runs]
            return self.dp.aggregate(self.model.state_dict(), got)
        if self.secure_aggregation:
            assert isinstance(self.strategy, WeightedAverageStrategy)  # checked in __init__
            return self.strategy.apply_average(round_number, current, self._secure_average(runs, round_number))
        if self.aggregator is None:
            answers = [
                FitResult(
                    r.node_id,
                    dict(zip(r.state_keys, results[r.node_id][2:])),
                    r.data.num_examples,
                    {"train_loss": float(results[r.node_id][1]) / max(r.examples_seen, 1)},
                )
                for r in runs
            ]
            return self.strategy.aggregate_fit(round_number, answers, current)
        keys, futures = start_trusted_average(runs, self.aggregator)
        averaged, failed = wait_all({"average": futures}, Deadline(self.config.round_timeout))
        if failed:
            exc = failed["average"]
            raise RoundFailedError(
                f"round {round_number}: aggregator {self.aggregator.id!r} failed: {_why(exc)}",
                round=round_number,
            ) from exc
        assert isinstance(self.strategy, WeightedAverageStrategy)  # checked in __init__
        return self.strategy.apply_average(round_number, current, dict(zip(keys, averaged["average"])))

    def _secure_average(self, runs: list[LocalRun], round_number: int) -> dict[str, torch.Tensor]:
        """Sum of ``num_examples * state`` and of the counts, unmasked only as sums."""
        if len(runs) < 2:
            raise RoundFailedError(f"round {round_number}: secure aggregation needs at least 2 nodes", round=round_number)
        states = {r.data.worker: r.model.state_dict(keep_vars=True) for r in runs}
        total = secure_sum(
            {w: list(s.values()) for w, s in states.items()},
            self.secagg.threshold or self.config.secagg_threshold,
            neighbours=self.secagg.neighbours,
            weights={r.data.worker: r.data.num_examples for r in runs},
            timeout=self.config.round_timeout,
            round_number=round_number,
        )
        current = self.model.state_dict()
        averaged = {k: v / total.total_weight for k, v in zip(current, total.tensors)}
        return {k: (v if current[k].is_floating_point() else v.round()).to(current[k].dtype) for k, v in averaged.items()}


def train_federated(
    model: nn.Module, workers: Sequence[Worker], config: FedAvgConfig | None = None, **kwargs: Any
) -> History:
    """``FedAvg(model, workers, config, **kwargs).fit()``: the one-call form."""
    return FedAvg(model, workers, config, **kwargs).fit()
