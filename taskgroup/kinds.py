"""The task-kind registry: one frozen :class:`KindEntry` per :class:`TaskKind`, holding all that
is done differently per kind, so that no other module dispatches on a kind itself.

An entry holds:

- ``head``: the head factory ``(spec, in_channels, patch_size, image_size, hidden) -> nn.Module``
  (:data:`taskgroup.models.heads.HEADS`; models sit below this module and build heads alone);
- ``loss``: ``(output, target, image_size) -> scalar`` (:mod:`taskgroup.losses`);
- ``decode``: one image's raw head output (float, on the CPU) and its record (``image_path``,
  ``size`` (H, W), ``mask_path``) -> a prediction of type ``prediction`` in original pixels;
- ``metric``: ``spec -> accumulator`` of the official metrics (:mod:`taskgroup.metrics`), with
  ``update`` (score a prediction against its ground truth), ``add_failure`` (a missing
  prediction, from the record) and ``note`` (the ``auc_note`` column of an evaluation);
- ``score``: the label-free score of a head's output whose attribution map says where the head
  looks (segmentation, the predicted foreground mass; classification, the log-probability of the
  predicted class; detection, the box coordinates; regression, the keypoint coordinates, whose
  soft-argmax gradient sits where the heatmap is);
- ``output``: a head's output per image as a vector whose L1 change says how much an occlusion
  moved it (class probabilities, per pixel for segmentation; box or keypoint coordinates);
- ``pooled``: whether the head pools the whole feature map (the ``hybrid`` attribution maps
  occlude pooled heads and take gradient times input of the dense ones).

The torch modules (heads, losses) are imported when first used: reading or scoring predictions
does not build a network. ``tests/test_kinds.py`` checks every entry against this contract.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from taskgroup.data.submission import (
    ClassificationPrediction,
    DetectionPrediction,
    Prediction,
    RegressionPrediction,
    SegmentationPrediction,
)
from taskgroup.errors import ConfigError, did_you_mean
from taskgroup.metrics import (
    ClassificationMetric,
    DetectionMetric,
    RegressionMetric,
    SegmentationMetric,
    resize_nearest,
)
from taskgroup.tasks import TaskKind, TaskSpec

if TYPE_CHECKING:
    import torch


class _Lazy:
    """A callable found by module and name (and key of a mapping) when first called."""

    def __init__(self, module: str, name: str, key: Any = None) -> None:
        self.module, self.name, self.key = module, name, key
        self._target: Callable | None = None

    def __call__(self, *args: Any) -> Any:
        if self._target is None:
            target = getattr(importlib.import_module(self.module), self.name)
            self._target = target if self.key is None else target[self.key]
        return self._target(*args)

    def __repr__(self) -> str:
        key = "" if self.key is None else f"[{self.key!r}]"
        return f"<{self.module}.{self.name}{key}>"


@dataclasses.dataclass(frozen=True)
class KindEntry:
    """What is done per task kind (see the module docstring for each field's contract)."""

    kind: TaskKind
    head: Callable[..., Any]
    loss: Callable[..., Any]
    prediction: type
    decode: Callable[[TaskSpec, Any, Any], Prediction]
    metric: Callable[[TaskSpec], Any]
    update: Callable[[Any, Any, Any], None]
    add_failure: Callable[[Any, Any], None]
    score: Callable[[Any], Any]
    output: Callable[[Any], Any]
    pooled: bool = False
    note: Callable[[Any], str] = lambda metric: ""


# -- decode: one image's output -> a prediction in original pixels ------------------------------
def _decode_segmentation(spec: TaskSpec, output, record) -> SegmentationPrediction:
    mask = output.argmax(dim=0).numpy()
    return SegmentationPrediction(
        record.image_path, spec.id, record.mask_path or "", resize_nearest(mask, record.size)
    )


def _decode_classification(spec: TaskSpec, output, record) -> ClassificationPrediction:
    probs = output.softmax(dim=0).numpy().astype(np.float64)
    return ClassificationPrediction(record.image_path, spec.id, int(probs.argmax()), tuple(probs.tolist()))


def _decode_detection(spec: TaskSpec, output, record) -> DetectionPrediction:
    height, width = record.size
    box = output[:4].numpy().astype(np.float64) * [width, height, width, height]
    return DetectionPrediction(record.image_path, spec.id, tuple(box.tolist()), (height, width))  # type: ignore[arg-type]


def _decode_regression(spec: TaskSpec, output, record) -> RegressionPrediction:
    height, width = record.size
    points = output.numpy().astype(np.float64) * [width, height]
    return RegressionPrediction(
        record.image_path, spec.id, tuple(map(tuple, points.tolist())), (height, width)
    )


# -- attribution scores and occlusion outputs -------------------------------------------------
def _foreground_mass(output: torch.Tensor) -> torch.Tensor:
    return output.float().softmax(dim=1)[:, 1:].sum()


def _predicted_class(output: torch.Tensor) -> torch.Tensor:
    return output.float().log_softmax(dim=1).amax(dim=1).sum()


def _box(output: torch.Tensor) -> torch.Tensor:
    return output[:, :4].float().sum()  # the xyxy box, not the confidence logit


def _points(output: torch.Tensor) -> torch.Tensor:
    return output.float().sum()


def _class_probabilities(output: torch.Tensor) -> torch.Tensor:
    return output.float().softmax(dim=1).flatten(1)  # (N, classes) or (N, classes * H * W)


def _box_coordinates(output: torch.Tensor) -> torch.Tensor:
    return output[:, :4].float()


def _point_coordinates(output: torch.Tensor) -> torch.Tensor:
    return output.float().flatten(1)


def _sized_failure(metric, record) -> None:
    metric.add_failure(record.size)


def _head(kind: TaskKind) -> _Lazy:
    return _Lazy("taskgroup.models.heads", "HEADS", kind)


def _loss(name: str) -> _Lazy:
    return _Lazy("taskgroup.losses", name)


KINDS: dict[TaskKind, KindEntry] = {
    TaskKind.SEGMENTATION: KindEntry(
        kind=TaskKind.SEGMENTATION,
        head=_head(TaskKind.SEGMENTATION),
        loss=_loss("segmentation_loss"),
        prediction=SegmentationPrediction,
        decode=_decode_segmentation,
        metric=lambda spec: SegmentationMetric(spec.num_classes),
        update=lambda metric, pred, gt: metric.update(pred.mask, gt),
        add_failure=_sized_failure,
        score=_foreground_mass,
        output=_class_probabilities,
    ),
    TaskKind.CLASSIFICATION: KindEntry(
        kind=TaskKind.CLASSIFICATION,
        head=_head(TaskKind.CLASSIFICATION),
        loss=_loss("classification_loss"),
        prediction=ClassificationPrediction,
        decode=_decode_classification,
        metric=lambda spec: ClassificationMetric(spec.num_classes),
        update=lambda metric, pred, gt: metric.update(np.asarray(pred.probs), gt, pred.predicted_class),
        add_failure=lambda metric, record: metric.add_failure(record.label),
        score=_predicted_class,
        output=_class_probabilities,
        pooled=True,
        note=lambda metric: metric.scores().auc_note,
    ),
    TaskKind.DETECTION: KindEntry(
        kind=TaskKind.DETECTION,
        head=_head(TaskKind.DETECTION),
        loss=_loss("detection_loss"),
        prediction=DetectionPrediction,
        decode=_decode_detection,
        metric=lambda spec: DetectionMetric(),
        update=lambda metric, pred, gt: metric.update(pred.box, gt),
        add_failure=lambda metric, record: metric.add_failure(),
        score=_box,
        output=_box_coordinates,
    ),
    TaskKind.REGRESSION: KindEntry(
        kind=TaskKind.REGRESSION,
        head=_head(TaskKind.REGRESSION),
        loss=_loss("regression_loss"),
        prediction=RegressionPrediction,
        decode=_decode_regression,
        metric=lambda spec: RegressionMetric(),
        update=lambda metric, pred, gt: metric.update(pred.points, gt),
        add_failure=_sized_failure,
        score=_points,
        output=_point_coordinates,
    ),
}

_BY_PREDICTION = {entry.prediction: entry for entry in KINDS.values()}


def kind_entry(kind: TaskKind | TaskSpec) -> KindEntry:
    """The entry of a kind (or of a task's kind); an unknown one lists the registered kinds."""
    kind = kind.kind if isinstance(kind, TaskSpec) else kind
    try:
        return KINDS[kind]
    except KeyError:
        raise ConfigError(
            f"no entry for task kind {kind!r}; {did_you_mean(str(kind), [k.value for k in KINDS])}"
        ) from None


def prediction_entry(prediction: Prediction) -> KindEntry:
    """The entry whose decode makes predictions of this type."""
    return _BY_PREDICTION[type(prediction)]


def decode_outputs(spec: TaskSpec, output: torch.Tensor, batch, records: Sequence) -> list[Prediction]:
    """One prediction per example of ``batch`` (its ``indices`` index ``records``, the task's
    records, which give each image's path, original size and mask path), in original pixels."""
    decode = kind_entry(spec).decode
    output = output.detach().float().cpu()
    return [decode(spec, output[i], records[position]) for i, position in enumerate(batch.indices.tolist())]
