"""Federated training on top of fedws: FedAvg across worker nodes.

The data stays on the nodes; the model travels. :class:`FedAvg` runs the rounds,
:mod:`fedws.fl.aggregate` holds the pure averaging arithmetic, :mod:`fedws.fl.trusted`
averages on a trusted worker so the coordinator sees only the average.

Example:
    >>> from fedws.fl import FedAvg, FedAvgConfig
    >>> history = FedAvg(model, [alice, bob], FedAvgConfig(rounds=3), test_data=(x, y)).fit()
"""

from __future__ import annotations

from .aggregate import fedavg, fedavg_weights, validate_updates
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import FedAvgConfig
from .dp import DPConfig, dp_sgd_step
from .early_stopping import EarlyStopping
from .evaluate import evaluate, evaluate_metrics
from .fedavg import FedAvg, train_federated
from .federated_eval import (
    EvaluationResult,
    FederatedEvaluator,
    evaluate_federated,
    evaluate_on,
    evaluation_plan_digest,
)
from .fit import async_fit, fit
from .history import History, RoundMetrics
from .local_training import step_plan_digest, training_plan_digest
from .metrics import Metric
from .sampling import sample_nodes
from .secagg import SecAggConfig
from .strategies import (
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedAvgStrategy,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    get_strategy,
)
from .strategy import EvaluateResult, FitResult, Strategy, WeightedAverageStrategy
from .train_config import TrainConfig, local_step
from .train_step import FunctionalOptimizer, LocalStep, OptimizerSpec, default_train_step

__all__ = [
    "FedAvg",
    "FedAvgConfig",
    "History",
    "RoundMetrics",
    "train_federated",
    "fedavg",
    "fedavg_weights",
    "validate_updates",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "evaluate",
    "sample_nodes",
    "training_plan_digest",
    "DPConfig",
    "dp_sgd_step",
    "SecAggConfig",
    "EarlyStopping",
    "Strategy",
    "WeightedAverageStrategy",
    "FitResult",
    "EvaluateResult",
    "get_strategy",
    "FedAvgStrategy",
    "FedProx",
    "FedAvgM",
    "FedAdam",
    "FedYogi",
    "FedAdagrad",
    "FedMedian",
    "FedTrimmedAvg",
    "Krum",
    "evaluate_metrics",
    "evaluate_federated",
    "evaluate_on",
    "evaluation_plan_digest",
    "FederatedEvaluator",
    "EvaluationResult",
    "Metric",
    "step_plan_digest",
    "TrainConfig",
    "local_step",
    "LocalStep",
    "OptimizerSpec",
    "FunctionalOptimizer",
    "default_train_step",
    "fit",
    "async_fit",
]
