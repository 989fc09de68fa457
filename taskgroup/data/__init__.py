"""Data: the FM_UIA reader and validation, datasets, split, samplers, submission format and the
embedded synthetic benchmark."""

from __future__ import annotations

from taskgroup.data.dataset import (
    Batch,
    Example,
    TaskDataset,
    collate_examples,
    scale_points,
    to_original_points,
)
from taskgroup.data.fmuia import (
    BadRow,
    FMUIAIndex,
    Record,
    find_roots,
    load_index,
    read_csvs,
    read_mask,
    resolve_path,
)
from taskgroup.data.sampler import MultiTaskBatchSampler, SamplingStrategy, task_probabilities
from taskgroup.data.split import Split, split_index
from taskgroup.data.submission import (
    ClassificationPrediction,
    DetectionPrediction,
    PredictionSet,
    RegressionPrediction,
    SegmentationPrediction,
    ground_truth_as_predictions,
    read_predictions,
    write_predictions,
)

__all__ = [
    "BadRow",
    "Batch",
    "ClassificationPrediction",
    "DetectionPrediction",
    "Example",
    "FMUIAIndex",
    "MultiTaskBatchSampler",
    "PredictionSet",
    "Record",
    "RegressionPrediction",
    "SamplingStrategy",
    "SegmentationPrediction",
    "Split",
    "TaskDataset",
    "collate_examples",
    "find_roots",
    "ground_truth_as_predictions",
    "load_index",
    "read_csvs",
    "read_mask",
    "read_predictions",
    "resolve_path",
    "scale_points",
    "split_index",
    "task_probabilities",
    "to_original_points",
    "write_predictions",
]
