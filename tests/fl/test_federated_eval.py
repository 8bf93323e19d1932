"""Federated evaluation: metrics computed as sums on each node's held-out shard.

What a node returns is sums (correct counts, summed losses and errors, per-bin counts), so
the federated figures must equal one central computation over the union of the shards,
and each node's own figures one over its shard. On a private node the evaluation plan
must be approved, and a metric that would return per-example values is another plan.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import fedws as sy
from fedws.fl import (
    FedAvg,
    FedAvgConfig,
    FederatedEvaluator,
    History,
    Metric,
    evaluate_federated,
    evaluate_metrics,
    evaluate_on,
    evaluation_plan_digest,
    load_checkpoint,
)
from fedws.fl.metrics import auc_from_histograms, resolve_metrics
from fedws.launch import start_node
from fedws.protocol.messages import Kind

FEATURES = 6
MakeWorker = Callable[..., sy.Worker]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def binary(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).long()
    return x, y


def regression(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    y = x @ torch.arange(1.0, FEATURES + 1).unsqueeze(1) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def classifier(seed: int = 0, classes: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.ReLU(), nn.Linear(8, classes))


def put(worker: sy.Worker, x: torch.Tensor, y: torch.Tensor, *tags: str, x_tag: str = "#x", y_tag: str = "#y") -> list[Any]:
    """Send a tagged shard; the returned owning pointers keep it on the node."""
    return [x.clone().tag(*tags, x_tag).send(worker), y.clone().tag(*tags, y_tag).send(worker)]


def exact_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


# -- federated == central on the union ------------------------------------------------------


def test_federated_metrics_equal_a_central_computation_on_the_union(make_worker: MakeWorker) -> None:
    shards = {"bob": binary(37, 1), "alice": binary(81, 2)}
    keep, workers = [], []
    for name, (x, y) in shards.items():
        w = make_worker(name)
        keep += put(w, x, y, "#test")
        workers.append(w)
    model = classifier()
    names = ["loss", "accuracy", "auc", "histograms"]
    result = evaluate_federated(model, workers, metrics=names, nr_bins=2, auc_bins=50)
    assert result.dropped == {} and result.num_examples == 118

    union_x = torch.cat([x for x, _ in shards.values()])
    union_y = torch.cat([y for _, y in shards.values()])
    central = evaluate_metrics(model, union_x, union_y, resolve_metrics(names, nr_bins=2, auc_bins=50))
    assert result.metrics["accuracy"] == central["accuracy"]
    assert result.metrics["histogram_predictions"] == central["histogram_predictions"]
    assert result.metrics["histogram_target"] == central["histogram_target"] == torch.bincount(union_y).tolist()
    assert result.metrics["loss"] == pytest.approx(central["loss"], rel=1e-6)
    with torch.no_grad():
        out = model(union_x)
    assert result.metrics["loss"] == pytest.approx(float(F.cross_entropy(out, union_y)), rel=1e-5)
    assert result.metrics["accuracy"] == float((out.argmax(1) == union_y).double().mean())
    # AUC from histograms: within the binning error of the exact AUC (pairs in one bin count 1/2)
    scores = torch.softmax(out, 1)[:, 1]
    bins = (scores * 50).floor().clamp(0, 49).long()
    pos, neg = torch.bincount(bins[union_y == 1], minlength=50), torch.bincount(bins[union_y == 0], minlength=50)
    bound = 0.5 * float((pos * neg).sum()) / float(pos.sum() * neg.sum())
    assert abs(result.metrics["auc"] - exact_auc(scores, union_y)) <= bound + 1e-12  # type: ignore[operator]
    assert result.metrics["auc"] == pytest.approx(central["auc"])
    # each node's own figures are its shard's
    for name, (x, y) in shards.items():
        own = evaluate_metrics(model, x, y, resolve_metrics(names, nr_bins=2, auc_bins=50))
        node = result.per_node[name]
        assert node["num_examples"] == len(y)
        assert node["accuracy"] == own["accuracy"] and node["histogram_target"] == own["histogram_target"]
        assert node["loss"] == pytest.approx(own["loss"], rel=1e-6)


def test_evaluation_is_one_plan_message_per_node_and_only_sums_come_back(
    make_worker: MakeWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = make_worker("bob")
    keep = put(bob, *binary(200, 3), "#test")
    evaluator = FederatedEvaluator(["loss", "accuracy"])
    model = classifier()
    evaluator.evaluate(model, [bob])  # the plan is sent once, the data found once
    sent: list[Kind] = []
    real = bob.submit

    def spy(kind: Kind, *fields: object, want_value: bool = False) -> Any:
        sent.append(kind)
        return real(kind, *fields, want_value=want_value)

    monkeypatch.setattr(bob, "submit", spy)
    again = evaluator.evaluate(model, [bob])
    assert sent.count(Kind.RUN_PLAN) == 1 and Kind.SEARCH not in sent and Kind.STORE_PLAN not in sent
    assert sent.count(Kind.GET) == 2  # one 0-dim sum per metric, never a per-example tensor
    assert again.per_node["bob"]["num_examples"] == 200
    assert len(keep) == 2


def test_a_federated_dataset_and_a_served_dataset_key(make_worker: MakeWorker) -> None:
    bob, alice = make_worker("bob"), make_worker("alice")
    x, y = binary(60, 4)
    fd = sy.BaseDataset(x, y).federate((bob, alice))
    model = classifier()
    result = evaluate_federated(model, [bob, alice], data=fd, metrics=["accuracy"])
    assert result.metrics["accuracy"] == evaluate_metrics(model, x, y, resolve_metrics(["accuracy"]))["accuracy"]
    assert set(result.per_node) == {"bob", "alice"} and result.num_examples == 60
    # PySyft's worker.evaluate(dataset_key=..., return_histograms=True, nr_bins=...)
    keep = put(bob, x, y, "#mnist_testing", x_tag="#data", y_tag="#target")
    got = evaluate_on(bob, model, dataset_key="mnist_testing", return_histograms=True, nr_bins=2)
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert got["nr_predictions"] == 60 and got["nr_correct_predictions"] == int((pred == y).sum())
    assert got["histogram_predictions"] == torch.bincount(pred, minlength=2).tolist()
    assert got["histogram_target"] == torch.bincount(y, minlength=2).tolist()
    assert got["loss"] == pytest.approx(float(F.cross_entropy(model(x).detach(), y)), rel=1e-5)
    assert "loss" not in evaluate_on(bob, model, dataset_key="mnist_testing", return_loss=False)
    assert len(keep) == 2


# -- FedAvg and the History --------------------------------------------------------------------


def test_regression_reports_mse_not_accuracy_centrally_and_per_node(make_worker: MakeWorker) -> None:
    keep, workers, shards = [], [], []
    for i, name in enumerate(["alice", "bob"]):
        w = make_worker(name)
        train, test = regression(80, i), regression(30 + 10 * i, 10 + i)
        keep += put(w, *train, "#train") + put(w, *test, "#test")
        workers.append(w)
        shards.append(test)
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, 1)
    cfg = FedAvgConfig(rounds=2, batch_size=16, lr=0.05, evaluate_on_nodes=True)
    central_test = regression(50, 99)
    history = FedAvg(model, workers, cfg, loss_fn=F.mse_loss, test_data=central_test, progress=False).fit()
    last = history[-1]
    assert last.test_accuracy is None  # not 0.0: a regression has no accuracy
    assert set(last.test_metrics) == set(last.federated_metrics) == {"loss", "mse", "mae"}
    assert history.metric("mse")[0] > history.metric("mse")[1]  # it learns
    union_x = torch.cat([x for x, _ in shards])
    union_y = torch.cat([y for _, y in shards])
    with torch.no_grad():
        out = model(union_x)
    assert last.federated_metrics["mse"] == pytest.approx(float(F.mse_loss(out, union_y)), rel=1e-6)
    assert last.federated_metrics["mae"] == pytest.approx(float(F.l1_loss(out, union_y)), rel=1e-6)
    assert last.test_loss == pytest.approx(last.test_metrics["mse"], rel=1e-6)
    assert {k: v["num_examples"] for k, v in last.node_metrics.items()} == {"alice": 30, "bob": 40}
    assert history.node_metric("bob", "mse")[-1] == pytest.approx(
        float(F.mse_loss(model(shards[1][0]).detach(), shards[1][1])), rel=1e-6
    )
    assert len(keep) == 8


def test_fedavg_history_keeps_both_evaluations_through_a_checkpoint(hook: sy.TorchHook, tmp_path: Path) -> None:
    workers = []
    for i, name in enumerate(["alice", "bob", "charlie"]):
        train, test = binary(60, i), binary(20, 20 + i)
        data = [t.tag("#train", tag) for t, tag in zip(train, ("#x", "#y"))]
        if name != "charlie":  # charlie has no held-out shard: left out of the evaluation, not of training
            data += [t.tag("#test", tag) for t, tag in zip(test, ("#x", "#y"))]
        workers.append(sy.VirtualWorker(hook, id=name, data=data))
    seen: list[dict[str, Any]] = []
    history = FedAvg(
        classifier(), workers, FedAvgConfig(rounds=2, batch_size=16), test_data=binary(50, 9),
        metrics=["loss", "accuracy", "auc"], evaluate_on_nodes=True, checkpoint_dir=tmp_path, progress=False,
        on_round=lambda m: seen.append(m.federated_metrics),
    ).fit()
    last = history[-1]
    assert last.test_accuracy == last.test_metrics["accuracy"] and last.nodes == ["alice", "bob", "charlie"]
    assert set(last.node_metrics) == {"alice", "bob"} and "ObjectNotFoundError" in last.eval_dropped["charlie"]
    assert set(last.federated_metrics) == {"loss", "accuracy", "auc"}
    assert seen == [r.federated_metrics for r in history]
    assert len(history.metric("auc", federated=True)) == 2
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.history.to_dict() == history.to_dict()
    assert loaded.config["eval_tags"] == ["#test"] and loaded.config["evaluate_on_nodes"] is False
    # a checkpoint written before these fields still loads
    old = json.loads(json.dumps(history.to_dict()))
    for r in old["rounds"]:
        for key in ("test_metrics", "federated_metrics", "node_metrics", "eval_dropped"):
            del r[key]
    again = History.from_dict(old)
    assert again.test_accuracies == history.test_accuracies and again[-1].node_metrics == {}


def test_a_user_metric_and_bad_names(hook: sy.TorchHook) -> None:
    x, y = binary(40, 5)
    bob = sy.VirtualWorker(hook, id="bob", data=[x.tag("#test", "#x"), y.tag("#test", "#y")])
    positives = Metric("predicted_positive", lambda out, t: (out.argmax(1) == 1).sum())
    model = classifier()
    got = evaluate_federated(model, [bob], metrics=[positives])
    with torch.no_grad():
        assert got.metrics["predicted_positive"] == float((model(x).argmax(1) == 1).double().mean())
    with pytest.raises(ValueError, match="unknown metric"):
        FederatedEvaluator(["f1"])
    with pytest.raises(ValueError, match="unknown metrics"):
        FedAvgConfig(metrics=("f1",))


def test_served_dataset_tags_match_the_datasets_module() -> None:
    from fedws import datasets
    from fedws.fl import federated_eval

    assert (federated_eval.DATA_TAG, federated_eval.TARGET_TAG) == (datasets.DATA_TAG, datasets.TARGET_TAG)


def test_auc_from_histograms() -> None:
    assert auc_from_histograms([0, 0, 3], [2, 0, 0]) == 1.0
    assert auc_from_histograms([2, 0, 0], [0, 0, 3]) == 0.0
    assert auc_from_histograms([1, 1], [1, 1]) == 0.5
    assert auc_from_histograms([0, 0], [1, 1]) != auc_from_histograms([0, 0], [1, 1])  # NaN: one class only


# -- a private node ----------------------------------------------------------------------------

TOKEN = "eval-token"


def test_private_node_releases_only_an_approved_evaluation(tmp_path: Path) -> None:
    x, y = binary(40, 7)
    save_file({"x": x, "y": y}, str(tmp_path / "dana.safetensors"))
    model = classifier()
    digest = evaluation_plan_digest(model, ["loss", "accuracy"], x_like=((FEATURES,), torch.float32),
                                    y_like=((), torch.int64))
    lines = ['id = "dana"', "port = 0"]  # private: the default of fedws worker
    for key, tag in (("x", "#x"), ("y", "#y")):
        lines += ["[[data]]", 'file = "dana.safetensors"', f'key = "{key}"', f'tags = ["#test", "{tag}"]']
    lines += ["[release]", f'approved_plans = ["{digest}"]']
    (tmp_path / "dana.toml").write_text("\n".join(lines) + "\n")
    node = start_node(tmp_path / "dana.toml", extra_args=["--threads", "1", "--token", TOKEN])

    def connect() -> sy.Worker:
        return sy.connect(node.url, TOKEN, hook=sy.TorchHook(torch, federation=sy.Federation()), timeout=30.0)

    try:
        with connect() as owner, connect() as attacker:
            got = evaluate_on(owner, model, metrics=["loss", "accuracy"])
            with torch.no_grad():
                assert got["accuracy"] == float((model(x).argmax(1) == y).double().mean())
            # a metric that would return per-example values is another plan: nothing leaves
            leak = Metric("scores", lambda out, t: out)
            with pytest.raises(sy.PermissionDeniedError, match="private"):
                evaluate_on(attacker, model, metrics=[leak])
            with pytest.raises(sy.PermissionDeniedError):  # nor with other built-ins, unapproved
                evaluate_on(owner, model, metrics=["loss", "accuracy", "histograms"])
            # in FedAvg the refusal drops the node from the federated figures, with the reason
            evaluator = FederatedEvaluator([leak])
            refused = evaluator.evaluate(model, [attacker])
            assert refused.metrics == {} and "PermissionDeniedError" in refused.dropped["dana"]
            # and the served shard itself never leaves
            with pytest.raises(sy.PermissionDeniedError):
                attacker.search("#test", "#x")[0].get()
    finally:
        node.stop()
