"""Official FM_UIA 2026 metrics, one module per task kind, and the type-level summary."""

from __future__ import annotations

from taskgroup.metrics.classification import (
    ClassificationMetric,
    ClassificationScores,
    classification_metrics,
    official_auc,
)
from taskgroup.metrics.detection import DetectionMetric, paired_box_iou
from taskgroup.metrics.regression import RegressionMetric, radial_errors
from taskgroup.metrics.segmentation import (
    SegmentationMetric,
    dice_per_class,
    hausdorff_per_class,
    resize_nearest,
    segmentation_metrics,
)
from taskgroup.metrics.summary import LEADERBOARD_COLUMNS, relative_gain, type_level_summary
from taskgroup.tasks import TaskSpec

TaskMetric = SegmentationMetric | ClassificationMetric | DetectionMetric | RegressionMetric


def build_task_metric(spec: TaskSpec) -> TaskMetric:
    """The accumulator of a task's official metrics: the metric of its kind's entry in
    :mod:`taskgroup.kinds` (which sits above the metrics and imports them)."""
    from taskgroup.kinds import kind_entry

    return kind_entry(spec).metric(spec)


__all__ = [
    "LEADERBOARD_COLUMNS",
    "ClassificationMetric",
    "ClassificationScores",
    "DetectionMetric",
    "RegressionMetric",
    "SegmentationMetric",
    "TaskMetric",
    "build_task_metric",
    "classification_metrics",
    "dice_per_class",
    "hausdorff_per_class",
    "official_auc",
    "paired_box_iou",
    "radial_errors",
    "relative_gain",
    "resize_nearest",
    "segmentation_metrics",
    "type_level_summary",
]
