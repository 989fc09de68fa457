"""Training: the one loop (engine), its callbacks, data preparation, and network runs (a grouping's
run, ``taskgroup train``, is the stage :mod:`taskgroup.stages.train`)."""

from __future__ import annotations

from taskgroup.training.callbacks import CheckpointCallback, EvaluationCallback, ProgressCallback
from taskgroup.training.data import TrainingData, data_tasks, prepare_data, synthetic_root
from taskgroup.training.engine import Callback, Engine, StepOutput, TrainingDiverged, build_optimiser
from taskgroup.training.run import NetworkResult, RunResult, serve_tasks, train_network

__all__ = [
    "Callback",
    "CheckpointCallback",
    "Engine",
    "EvaluationCallback",
    "NetworkResult",
    "ProgressCallback",
    "RunResult",
    "StepOutput",
    "TrainingData",
    "TrainingDiverged",
    "build_optimiser",
    "data_tasks",
    "prepare_data",
    "serve_tasks",
    "synthetic_root",
    "train_network",
]
