"""Score a prediction folder against a ground-truth root with the official FM_UIA metrics.

The official scorer skips a missing prediction; here a missing prediction counts as a failure
(DSC 0 and HD the diagonal; a never-right class with uniform probabilities; IoU 0; MRE the image
diagonal) unless ``official_skip`` is set. Either way the number missing is reported per task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from taskgroup.data.fmuia import FMUIAIndex, Record, record_target
from taskgroup.data.submission import PredictionSet
from taskgroup.kinds import kind_entry, prediction_entry
from taskgroup.metrics import type_level_summary
from taskgroup.tasks import TaskKind, TaskRegistry


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Per-task scores (one row per task) and the 9 type-level columns."""

    per_task: pd.DataFrame
    summary: dict[str, float]

    def metric_values(self) -> dict[str, dict[str, float]]:
        """{task: {metric: value}} for the metrics each task has."""
        out: dict[str, dict[str, float]] = {}
        for row in self.per_task.to_dict("records"):
            out[row["task_id"]] = {k: v for k, v in row.items() if k in METRIC_COLUMNS and not pd.isna(v)}
        return out


METRIC_COLUMNS = ("dsc", "hd", "accuracy", "auc", "f1_macro", "f1_weighted", "mcc", "iou", "mre")


def evaluate_predictions(
    index: FMUIAIndex, predictions: PredictionSet, official_skip: bool = False
) -> Evaluation:
    """Score every task of ``index`` (the ground truth) with the predictions."""
    rows = []
    per_task_values: dict[str, dict[str, float]] = {}
    for task_id, records in index.records.items():
        spec = index.registry[task_id]
        entry = kind_entry(spec)
        metric = entry.metric(spec)
        missing = 0
        for r in records:
            pred = predictions.get(task_id, r.image_path)
            if pred is None:
                missing += 1
                if not official_skip:
                    entry.add_failure(metric, r)
                continue
            entry.update(metric, pred, record_target(r))
        row: dict = {
            "task_id": task_id,
            "type": spec.kind.short,
            "clinical_group": spec.clinical_group,
            "n_images": len(records),
            "n_missing": missing,
            "auc_note": "",
        }
        if len(records) > missing or not official_skip:
            values = metric.aggregate()
            row.update(values)
            per_task_values[task_id] = values
            row["auc_note"] = entry.note(metric)
        rows.append(row)
    frame = pd.DataFrame(rows)
    for col in METRIC_COLUMNS:
        if col not in frame.columns:
            frame[col] = np.nan
    frame = frame[["task_id", "type", "clinical_group", "n_images", "n_missing", *METRIC_COLUMNS, "auc_note"]]
    return Evaluation(frame, type_level_summary(per_task_values, index.registry))


def update_metric(metric, pred, gt) -> None:
    """Score one prediction against its ground truth (mask (H, W), label, box or keypoints):
    the ``update`` of the prediction's kind in :mod:`taskgroup.kinds`."""
    prediction_entry(pred).update(metric, pred, gt)


def baseline_scores(
    train: Mapping[str, Sequence[Record]], val: Mapping[str, Sequence[Record]], registry: TaskRegistry
) -> dict[str, dict[str, float]]:
    """Official metrics of data-only predictors, the "chance level" a trained model must beat:
    classification, the training set's class frequencies (so the majority class); segmentation,
    background everywhere; detection and regression, the mean training box or keypoints
    (normalised by image size, mapped to each image)."""
    out: dict[str, dict[str, float]] = {}
    for task, records in val.items():
        spec = registry[task]
        metric = kind_entry(spec).metric(spec)
        if spec.kind is TaskKind.CLASSIFICATION:
            counts = np.bincount([r.label for r in train[task]], minlength=spec.num_classes).astype(float)
            probs = counts / counts.sum()
            for r in records:
                metric.update(probs, r.label, int(probs.argmax()))
        elif spec.kind is TaskKind.SEGMENTATION:
            for r in records:
                truth = record_target(r)
                metric.update(np.zeros_like(truth), truth)
        else:
            mean = np.mean([_normalised_points(r) for r in train[task]], axis=0)
            for r in records:
                guess = mean * [r.size[1], r.size[0]]
                if spec.kind is TaskKind.DETECTION:
                    metric.update(guess.reshape(4), r.box)
                else:
                    metric.update(guess, r.keypoints)
        out[task] = metric.aggregate()
    return out


def _normalised_points(record: Record) -> np.ndarray:
    """A box (as 2 points) or keypoints divided by the image's width and height."""
    points = np.asarray(record.box if record.box is not None else record.keypoints, dtype=float).reshape(
        -1, 2
    )
    return points / [record.size[1], record.size[0]]


def against_baseline(
    values: Mapping[str, float], baselines: Mapping[str, Mapping[str, float]], registry: TaskRegistry
) -> pd.DataFrame:
    """Each task's primary-metric value next to its data-only baseline, with the gain signed by
    the metric's direction (absolute for scores in [0, 1], relative for errors in pixels)."""
    rows = []
    for task, value in values.items():
        primary = registry[task].primary_metric
        base = baselines[task][primary.name]
        gain = value - base if primary.higher_is_better else (base - value) / base
        rows.append(
            {
                "task": task,
                "type": registry[task].kind.short,
                "metric": primary.name,
                "value": value,
                "baseline": base,
                "gain": gain,
            }
        )
    return pd.DataFrame(rows)


def clear_margin(kind: TaskKind, baseline: float, n_val: int) -> float:
    """How far above its data-only baseline a task's primary metric must be to count as clearly
    learnt: classification, two binomial standard errors of the baseline accuracy on ``n_val``
    images (0.1 for a balanced binary task on 100 images); segmentation and detection, 0.1 of
    DSC or IoU; regression, an MRE at least 20 % below the baseline's (the gain is relative)."""
    if kind is TaskKind.CLASSIFICATION:
        return 2.0 * float(np.sqrt(baseline * (1 - baseline) / max(1, n_val)))
    return 0.2 if kind is TaskKind.REGRESSION else 0.1


def learnability(
    values: Mapping[str, float],
    baselines: Mapping[str, Mapping[str, float]],
    val_counts: Mapping[str, int],
    registry: TaskRegistry,
) -> pd.DataFrame:
    """:func:`against_baseline` with each task's margin and whether it is clearly above."""
    table = against_baseline(values, baselines, registry)
    table["margin"] = [
        clear_margin(registry[t].kind, b, val_counts[t])
        for t, b in zip(table.task, table.baseline, strict=True)
    ]
    table["clear"] = table["gain"] > table["margin"]
    return table
