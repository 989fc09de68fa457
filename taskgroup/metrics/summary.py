"""The type-level summary of FM_UIA 2026: the 9 leaderboard columns.

Unweighted means over tasks of Seg DSC, Seg HD, Cls accuracy, AUC, F1 macro, F1 weighted, MCC,
Det IoU and Reg MRE. The challenge does not publish how it ranks on them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from taskgroup.tasks import TaskKind, TaskRegistry

#: (column, task kind, metric) of the leaderboard, in its order
LEADERBOARD_COLUMNS: tuple[tuple[str, TaskKind, str], ...] = (
    ("seg_dsc", TaskKind.SEGMENTATION, "dsc"),
    ("seg_hd", TaskKind.SEGMENTATION, "hd"),
    ("cls_accuracy", TaskKind.CLASSIFICATION, "accuracy"),
    ("cls_auc", TaskKind.CLASSIFICATION, "auc"),
    ("cls_f1_macro", TaskKind.CLASSIFICATION, "f1_macro"),
    ("cls_f1_weighted", TaskKind.CLASSIFICATION, "f1_weighted"),
    ("cls_mcc", TaskKind.CLASSIFICATION, "mcc"),
    ("det_iou", TaskKind.DETECTION, "iou"),
    ("reg_mre", TaskKind.REGRESSION, "mre"),
)


def type_level_summary(
    per_task: Mapping[str, Mapping[str, float]], registry: TaskRegistry
) -> dict[str, float]:
    """The 9 columns from per-task metric values; NaN for a type with no scored task."""
    summary = {}
    for column, kind, metric in LEADERBOARD_COLUMNS:
        values = [
            per_task[t.id][metric]
            for t in registry.of_kind(kind)
            if t.id in per_task and metric in per_task[t.id]
        ]
        summary[column] = float(np.mean(values)) if values else float("nan")
    return summary


def relative_gain(value: float, reference: float, higher_is_better: bool) -> float:
    """Relative change of ``value`` against ``reference``, signed so that positive is better
    whatever the metric's direction: (v - r) / |r| for DSC, AUC, IoU...; (r - v) / |r| for MRE, HD.
    NaN when the reference is 0 (no relative change is defined)."""
    if reference == 0:
        return float("nan")
    change = (value - reference) / abs(reference)
    return change if higher_is_better else -change
