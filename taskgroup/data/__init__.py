"""Data: the FM_UIA reader and validation, datasets, split, samplers, submission format and the
embedded synthetic benchmark.

The names below are loaded from their module when first used (PEP 562), so that importing one
torch-free module of the package (the reader, the split) does not import torch through
:mod:`taskgroup.data.dataset`."""

from __future__ import annotations

import importlib
from typing import Any

#: name -> the module of this package that defines it
_EXPORTS = {
    "BadRow": "fmuia",
    "Batch": "dataset",
    "ClassificationPrediction": "submission",
    "DetectionPrediction": "submission",
    "Example": "dataset",
    "FMUIAIndex": "fmuia",
    "MultiTaskBatchSampler": "sampler",
    "PredictionSet": "submission",
    "Record": "fmuia",
    "RegressionPrediction": "submission",
    "SamplingStrategy": "sampler",
    "SegmentationPrediction": "submission",
    "Split": "split",
    "TaskDataset": "dataset",
    "collate_examples": "dataset",
    "find_roots": "fmuia",
    "ground_truth_as_predictions": "submission",
    "load_index": "fmuia",
    "read_csvs": "fmuia",
    "read_mask": "fmuia",
    "read_predictions": "submission",
    "resolve_path": "fmuia",
    "scale_points": "dataset",
    "split_index": "split",
    "task_probabilities": "sampler",
    "to_original_points": "dataset",
    "write_predictions": "submission",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
