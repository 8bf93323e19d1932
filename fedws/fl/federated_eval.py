"""Federated evaluation: score a model on every node's held-out shard; only sums leave.

The evaluation runs as a plan on each node — forward pass and every metric's sums
(:mod:`fedws.fl.metrics`) in one RUN_PLAN message per node — and the coordinator fetches
the sums alone: correct counts, summed losses and errors, per-bin counts. It adds them up,
which weights each node by its number of examples exactly as one evaluation over the union
of the shards would, and keeps each node's own figures too.

On a private node (the default of ``fedws worker``) what the plan computes from the served
data leaves only if the operator approved the plan: give them
:func:`evaluation_plan_digest` to put in ``[release] approved_plans``, as for
:func:`~fedws.fl.training_plan_digest`. Any other plan — another metric, one that returns
per-example values — stays on the node (:class:`~fedws.exceptions.PermissionDeniedError`).

The held-out shard is found by tags (``#test`` with ``#x`` / ``#y``, FedAvg's convention),
by a served dataset's key (``dataset_key="mnist_testing"``: ``#mnist_testing`` with
``#data`` / ``#target``) or given as a :class:`~fedws.datasets.FederatedDataset`.

Example:
    >>> result = evaluate_federated(model, [alice, bob], metrics=["loss", "accuracy", "auc"])
    >>> result.metrics["accuracy"], result.per_node["alice"]["accuracy"]
    >>> evaluate_on(bob, model, dataset_key="mnist_testing", return_histograms=True, nr_bins=10)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..client.worker import Worker
from ..exceptions import FedwsError, ObjectNotFoundError
from ..plans import Plan, PointerPlan
from ..pointers import PointerTensor
from .evaluate import evaluate_metrics
from .history import RoundMetrics
from .local_training import LossFn, NodeData, _architecture
from .metrics import Metric, MetricValue, combine, default_metric_names, resolve_metrics
from .remote import Deadline, barrier_nowait, fetch_nowait, first_error, mark, search_nowait, wait_all

__all__ = [
    "EvaluationResult",
    "FederatedEvaluator",
    "build_evaluation_plan",
    "evaluation_plan_digest",
    "evaluate_federated",
    "evaluate_on",
    "score_round",
]

log = logging.getLogger("fedws.fl")

Like = tuple[tuple[int, ...], torch.dtype]

# A served dataset's tags (``fedws.datasets.DATA_TAG`` / ``TARGET_TAG``; fl/ sits beside
# datasets, not above it, so the names are repeated here and a test keeps them equal).
DATA_TAG, TARGET_TAG = "#data", "#target"


class _Shards(Protocol):
    """What evaluation needs of a :class:`~fedws.datasets.FederatedDataset`."""

    @property
    def workers(self) -> list[str]: ...

    def __getitem__(self, worker: str) -> Any: ...


@dataclass
class EvaluationResult:
    """What a federated evaluation found.

    Attributes:
        metrics: every metric over all the nodes that answered (their sums added).
        per_node: node id -> its own figures, plus ``num_examples``.
        num_examples: held-out examples behind ``metrics``.
        dropped: node id -> why it is not in ``metrics`` (no test data, refused, timed out).
    """

    metrics: dict[str, MetricValue] = field(default_factory=dict)
    per_node: dict[str, dict[str, MetricValue]] = field(default_factory=dict)
    num_examples: int = 0
    dropped: dict[str, str] = field(default_factory=dict)


def build_evaluation_plan(model: nn.Module, metrics: Sequence[Metric], *, x_like: Like, y_like: Like) -> Plan:
    """Trace the evaluation of ``model`` as a plan: ``evaluate(x, y, params, buffers)``.

    The plan runs the model in eval mode without gradients on the whole shard ``x`` / ``y``
    and returns one tensor per metric: its sums (never a per-example value, unless a user
    metric returns one — and then the plan is another plan, with another digest).

    Args:
        model: the architecture (traced on a copy in eval mode; its values are arguments).
        metrics: what to compute, in order.
        x_like, y_like: ``(shape of one row, dtype)`` of the features and targets.
    """
    if not metrics:
        raise ValueError("an evaluation needs at least one metric")
    net = copy.deepcopy(model).eval()
    params = list(net.parameters())
    buffers = list(net.buffers())

    def evaluate(x: torch.Tensor, y: torch.Tensor, params: list[torch.Tensor], buffers: list[torch.Tensor]) -> Any:
        # ``params`` and ``buffers`` are ``net``'s own tensors while tracing: net(x) reads them.
        with torch.no_grad():
            out = net(x)
            return tuple(m.sums(out, y) for m in metrics)

    example = (
        torch.zeros((2, *x_like[0]), dtype=x_like[1]),
        torch.zeros((2, *y_like[0]), dtype=y_like[1]),
        params,
        buffers,
    )
    plan = Plan(evaluate, name="evaluate")
    plan.build(*example)
    return plan


def evaluation_plan_digest(
    model: nn.Module,
    metrics: Sequence[str | Metric] | None = None,
    *,
    x_like: Like,
    y_like: Like,
    loss_fn: LossFn | None = None,
    nr_bins: int = 10,
    auc_bins: int = 100,
) -> str:
    """The digest a private node must approve for federated evaluation of ``model`` on it.

    One plan per architecture, metric list and data signature: what it returns is the
    metrics' sums, which is all the coordinator fetches. Pass the same ``metrics``,
    ``loss_fn`` and bins as the evaluation (None: the defaults for the targets' dtype).
    """
    chosen = resolve_metrics(
        metrics, loss_fn=loss_fn or F.cross_entropy, target_dtype=y_like[1], nr_bins=nr_bins, auc_bins=auc_bins
    )
    plan = build_evaluation_plan(model, chosen, x_like=x_like, y_like=y_like)
    return plan.signature.code.digest(plan.state_tensors)


class _EvaluationPlans:
    """Evaluation plans traced once per architecture, metrics and data signature, and sent
    to each node once."""

    def __init__(self) -> None:
        self._built: dict[Hashable, Plan] = {}
        self._sent: dict[str, tuple[Hashable, PointerPlan]] = {}

    def for_node(self, model: nn.Module, data: NodeData, metrics: Sequence[Metric]) -> PointerPlan:
        x_like = (tuple(data.x.shape[1:]), data.x.dtype)
        y_like = (tuple(data.y.shape[1:]), data.y.dtype)
        key = (_architecture(model), tuple(metrics), x_like, y_like)
        worker = data.worker
        sent = self._sent.get(worker.id)
        if sent is not None and sent[0] == key and sent[1].location is worker:
            return sent[1]
        plan = self._built.get(key)
        if plan is None:
            plan = self._built[key] = build_evaluation_plan(model, metrics, x_like=x_like, y_like=y_like)
        pointer = plan.send(worker)
        self._sent[worker.id] = (key, pointer)
        used = {k for k, _ in self._sent.values()}
        for k in [k for k in self._built if k not in used]:
            del self._built[k]
        return pointer

    def forget(self, worker_id: str) -> None:
        self._sent.pop(worker_id, None)


@dataclass
class _Pending:
    data: NodeData
    model: nn.Module  # the copy on the node: kept until the sums are fetched
    start_seq: int
    end_seq: int
    futures: list[Future[Any]]


def _check_shard(worker: Worker, xs: list[PointerTensor], ys: list[PointerTensor], what: str) -> NodeData:
    for found, role in ((xs, "features"), (ys, "targets")):
        if len(found) != 1:
            raise ObjectNotFoundError(
                f"worker {worker.id!r} holds {len(found)} {role} tensors tagged {what}, expected exactly 1",
                worker=worker.id,
            )
    x, y = xs[0], ys[0]
    n = x.shape[0] if x.dim() else 0
    if y.dim() == 0 or y.shape[0] != n or n == 0:
        raise ObjectNotFoundError(
            f"worker {worker.id!r}: held-out features have {n} rows, targets shape {tuple(y.shape)}",
            worker=worker.id,
        )
    return NodeData(worker, x, y, int(n))


class FederatedEvaluator:
    """Evaluates models on the nodes' held-out shards, round after round.

    It remembers where each node's shard is and which plan each node holds, so a second
    evaluation sends only the model and one plan call per node.

    Args:
        metrics: names (``"loss"``, ``"accuracy"``, ``"mse"``, ``"mae"``, ``"auc"``,
            ``"histograms"``) and :class:`~fedws.fl.metrics.Metric` objects. None: by task
            (float targets: loss, MSE, MAE; integer labels: loss, accuracy).
        loss_fn: the loss the ``"loss"`` metric reports (mean-reduced).
        tags: tags every held-out tensor carries (with ``x_tag`` / ``y_tag``).
        x_tag, y_tag: the extra tag of the features and of the targets.
        dataset_key: instead of tags, a served dataset's key (``#<key>`` with ``#data`` /
            ``#target``, as :func:`~fedws.datasets.dataset_on` finds it).
        data: instead of tags, the shards as a :class:`~fedws.datasets.FederatedDataset`.
        timeout: seconds an evaluation waits for the nodes; slower nodes are dropped.
        nr_bins: classes counted by ``"histograms"``.
        auc_bins: score bins of ``"auc"``.
    """

    def __init__(
        self,
        metrics: Sequence[str | Metric] | None = None,
        *,
        loss_fn: LossFn = F.cross_entropy,
        tags: Sequence[str] = ("#test",),
        x_tag: str = "#x",
        y_tag: str = "#y",
        dataset_key: str | None = None,
        data: _Shards | None = None,
        timeout: float = 60.0,
        nr_bins: int = 10,
        auc_bins: int = 100,
    ) -> None:
        if dataset_key is not None:
            tags = (dataset_key if dataset_key.startswith("#") else f"#{dataset_key}",)
            x_tag, y_tag = DATA_TAG, TARGET_TAG
        self.requested = list(metrics) if metrics else None
        self.loss_fn = loss_fn
        self.tags, self.x_tag, self.y_tag = list(tags), x_tag, y_tag
        self.dataset = data
        self.timeout = timeout
        self.nr_bins, self.auc_bins = nr_bins, auc_bins
        self.metrics: list[Metric] | None = None  # resolved at the first evaluation (task from the targets)
        self._data: dict[str, NodeData] = {}
        self._plans = _EvaluationPlans()
        self.errors: dict[str, BaseException] = {}
        """Node id -> the exception that dropped it from the last evaluation."""
        if self.requested is not None:
            self.metrics = self._resolve(torch.int64)

    def _resolve(self, target_dtype: torch.dtype) -> list[Metric]:
        return resolve_metrics(
            self.requested, loss_fn=self.loss_fn, target_dtype=target_dtype, nr_bins=self.nr_bins,
            auc_bins=self.auc_bins,
        )

    def metrics_for(self, target_dtype: torch.dtype) -> list[Metric]:
        """The metrics used (chosen by task from ``target_dtype`` unless named)."""
        if self.metrics is None:
            self.metrics = self._resolve(target_dtype)
        return self.metrics

    def evaluate(self, model: nn.Module, workers: Sequence[Worker]) -> EvaluationResult:
        """Evaluate ``model`` (local) on every worker's held-out shard at once.

        Nodes that fail are dropped and named in the result; the others are aggregated.
        """
        deadline = Deadline(self.timeout)
        result = EvaluationResult()
        self.errors = {}

        def drop(wid: str, exc: BaseException) -> None:
            self.errors[wid] = exc
            result.dropped[wid] = f"{type(exc).__name__}: {exc}"
            self._data.pop(wid, None)
            self._plans.forget(wid)
            log.warning("evaluation: dropped node %r: %s", wid, result.dropped[wid])

        self._discover([w for w in workers if w.id not in self._data], deadline, drop)
        pending: dict[str, _Pending] = {}
        for w in workers:
            data = self._data.get(w.id)
            if data is None:
                continue
            try:
                pending[w.id] = self._start(model, data)
            except Exception as exc:  # a link lost while queueing
                drop(w.id, exc)
        results, failures = wait_all({wid: p.futures for wid, p in pending.items()}, deadline)
        for wid, failure in failures.items():
            drop(wid, failure)
        totals: list[list[torch.Tensor]] = []
        counts: list[int] = []
        metrics = self.metrics or []
        for wid, values in results.items():
            p = pending[wid]
            err = first_error(p.data.worker, p.start_seq, p.end_seq)
            if err is not None:
                drop(wid, err)
                continue
            sums = [torch.as_tensor(v) for v in values[1:]]
            totals.append(sums)
            counts.append(p.data.num_examples)
            figures = combine(metrics, [sums], [p.data.num_examples])
            figures["num_examples"] = p.data.num_examples
            result.per_node[wid] = figures
        if totals:
            result.metrics = combine(metrics, totals, counts)
            result.num_examples = sum(counts)
        return result

    def _discover(self, workers: Sequence[Worker], deadline: Deadline, drop: Any) -> None:
        if self.dataset is not None:
            for w in workers:
                if w.id not in self.dataset.workers:
                    drop(w.id, ObjectNotFoundError(f"the FederatedDataset has no part on worker {w.id!r}"))
                    continue
                ds = self.dataset[w.id]
                try:
                    self._data[w.id] = _check_shard(w, [ds.data], [ds.targets], "in the FederatedDataset")
                except Exception as exc:
                    drop(w.id, exc)
            return
        searches: dict[str, list[Future[Any]]] = {}
        by_id = {w.id: w for w in workers}
        for w in workers:
            try:
                searches[w.id] = [
                    search_nowait(w, [*self.tags, self.x_tag]),
                    search_nowait(w, [*self.tags, self.y_tag]),
                ]
            except Exception as exc:
                drop(w.id, exc)
        found, failures = wait_all(searches, deadline)
        for wid, failure in failures.items():
            drop(wid, failure)
        what = " ".join([*self.tags, f"{self.x_tag}/{self.y_tag}"])
        for wid, (xs, ys) in found.items():
            try:
                self._data[wid] = _check_shard(by_id[wid], xs, ys, what)
            except Exception as exc:
                drop(wid, exc)

    def _start(self, model: nn.Module, data: NodeData) -> _Pending:
        worker = data.worker
        metrics = self.metrics_for(data.y.dtype)
        start = mark(worker)
        step = self._plans.for_node(model, data, metrics)
        remote = copy.deepcopy(model)
        remote.send(worker)  # type: ignore[operator]  # Module.send is installed by the hook
        outs = step(data.x, data.y, list(remote.parameters()), list(remote.buffers()))
        outputs = outs if isinstance(outs, tuple) else (outs,)
        end, done = barrier_nowait(worker)
        return _Pending(data, remote, start, end, [done, *(fetch_nowait(o) for o in outputs)])


def evaluate_federated(model: nn.Module, workers: Sequence[Worker], **kwargs: Any) -> EvaluationResult:
    """``FederatedEvaluator(**kwargs).evaluate(model, workers)``: the one-call form."""
    return FederatedEvaluator(**kwargs).evaluate(model, workers)


def evaluate_on(
    worker: Worker,
    model: nn.Module,
    *,
    dataset_key: str | None = None,
    metrics: Sequence[str | Metric] | None = None,
    loss_fn: LossFn = F.cross_entropy,
    return_histograms: bool = False,
    nr_bins: int = 10,
    return_loss: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """PySyft's ``worker.evaluate(dataset_key=..., return_histograms=True, nr_bins=...)``.

    Evaluates ``model`` on the held-out shard of one worker and returns its figures with
    PySyft's keys too: ``nr_predictions``, ``nr_correct_predictions`` (with accuracy),
    ``loss``, ``histogram_predictions``, ``histogram_target``.

    Args:
        worker: the node holding the data.
        model: a local model (a copy is sent; the data stays).
        dataset_key: the served dataset's key; None: FedAvg's ``#test`` ``#x`` / ``#y`` tags
            (or ``tags=``, ``data=`` as in :class:`FederatedEvaluator`).
        metrics: as :class:`FederatedEvaluator`; None: by task.
        return_histograms: add ``"histograms"`` over ``nr_bins`` classes.
        return_loss: report the loss (PySyft's ``return_loss``).

    Raises:
        ObjectNotFoundError: the worker holds no such held-out shard.
        PermissionDeniedError: the node's policy keeps the results (a plan not approved).
        FedwsTimeoutError: no answer within ``timeout``.
    """
    names: list[str | Metric] | None = list(metrics) if metrics else None
    if return_histograms or not return_loss:
        if names is None:
            names = list(_defaults_for(worker, dataset_key, kwargs))
        if return_histograms and "histograms" not in names:
            names.append("histograms")
        if not return_loss:
            names = [m for m in names if m != "loss"]
    evaluator = FederatedEvaluator(names, loss_fn=loss_fn, dataset_key=dataset_key, nr_bins=nr_bins, **kwargs)
    result = evaluator.evaluate(model, [worker])
    if worker.id not in result.per_node:
        cause = evaluator.errors.get(worker.id)
        if cause is not None:
            raise cause
        raise FedwsError(f"evaluation on worker {worker.id!r} failed")
    out: dict[str, Any] = dict(result.per_node[worker.id])
    n = int(out["num_examples"])
    out["nr_predictions"] = n
    if isinstance(out.get("accuracy"), float):
        out["nr_correct_predictions"] = int(round(out["accuracy"] * n))
    return out


def _defaults_for(worker: Worker, dataset_key: str | None, kwargs: dict[str, Any]) -> tuple[str, ...]:
    """The default metric names for the targets this worker holds."""
    probe = FederatedEvaluator(["loss"], dataset_key=dataset_key, **kwargs)
    probe._discover([worker], Deadline(probe.timeout), lambda wid, exc: None)
    data = probe._data.get(worker.id)
    return default_metric_names(data.y.dtype if data is not None else torch.int64)



def score_round(
    metrics: RoundMetrics,
    model: nn.Module,
    *,
    test_data: tuple[torch.Tensor, torch.Tensor] | None,
    chosen: Sequence[str | Metric] | None,
    loss_fn: LossFn,
    evaluator: FederatedEvaluator | None,
    workers: Sequence[Worker],
) -> None:
    """Fill a round's scores: central on ``test_data``, federated with ``evaluator``.

    ``test_accuracy`` / ``test_loss`` keep meaning the central figures; a task without
    accuracy (float targets) leaves ``test_accuracy`` None rather than reporting 0.0.
    """
    if test_data is not None:
        central = resolve_metrics(chosen, loss_fn=loss_fn, target_dtype=test_data[1].dtype)
        metrics.test_metrics = evaluate_metrics(model, *test_data, central)
        loss, acc = metrics.test_metrics.get("loss"), metrics.test_metrics.get("accuracy")
        metrics.test_loss = loss if isinstance(loss, float) else None
        metrics.test_accuracy = acc if isinstance(acc, float) else None
    if evaluator is not None:
        found = evaluator.evaluate(model, workers)
        metrics.federated_metrics = found.metrics
        metrics.node_metrics = found.per_node
        metrics.eval_dropped = found.dropped
