"""Predictions in the FM_UIA 2026 submission format: typed records, writer and reader.

- segmentation: a class-index mask at the original size, at ``<out>/<mask_path minus every "../">``
- ``classification_predictions.json``: ``{image_path, task_id, predicted_class, predicted_probs}``
- ``detection_predictions.json``: ``{image_path, task_id, bbox_normalized, bbox_pixels}`` (xyxy)
- ``regression_predictions.json``: ``{image_path, task_id, predicted_points_normalized,
  predicted_points_pixels}`` (x1, y1, x2, y2, ...)
``image_path`` is the CSV string exactly, ``../`` included. Only pixel coordinates are scored.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from taskgroup.data.fmuia import FMUIAIndex, read_mask
from taskgroup.errors import DataError
from taskgroup.tasks import TaskKind

FILES = {
    TaskKind.CLASSIFICATION: "classification_predictions.json",
    TaskKind.DETECTION: "detection_predictions.json",
    TaskKind.REGRESSION: "regression_predictions.json",
}


@dataclasses.dataclass(frozen=True)
class SegmentationPrediction:
    image_path: str
    task_id: str
    mask_path: str  # the ground truth's mask_path string: where the mask is written
    mask: np.ndarray  # (H, W) class indices at the original size


@dataclasses.dataclass(frozen=True)
class ClassificationPrediction:
    image_path: str
    task_id: str
    predicted_class: int
    probs: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class DetectionPrediction:
    image_path: str
    task_id: str
    box: tuple[float, float, float, float]  # xyxy, original pixels
    size: tuple[int, int] | None = None  # (H, W), for the normalised copy


@dataclasses.dataclass(frozen=True)
class RegressionPrediction:
    image_path: str
    task_id: str
    points: tuple[tuple[float, float], ...]  # (K, 2) (x, y), original pixels
    size: tuple[int, int] | None = None


Prediction = SegmentationPrediction | ClassificationPrediction | DetectionPrediction | RegressionPrediction


def mask_prediction_path(out_dir: str | Path, mask_path: str) -> Path:
    """Where a predicted mask goes: the CSV mask path with every ``../`` removed, under out."""
    return Path(out_dir) / mask_path.replace("../", "")


def _normalised(values: np.ndarray, size: tuple[int, int] | None) -> list[float]:
    if size is None:
        return []
    height, width = size
    flat = values.reshape(-1, 2) / np.array([width, height], dtype=np.float64)
    return flat.reshape(-1).tolist()


def write_predictions(out_dir: str | Path, predictions: Iterable[Prediction]) -> None:
    """Write predictions in the submission format (JSON files are written whole)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: dict[TaskKind, list[dict]] = {kind: [] for kind in FILES}
    for p in predictions:
        if isinstance(p, SegmentationPrediction):
            path = mask_prediction_path(out_dir, p.mask_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if p.mask.max(initial=0) > 255 or p.mask.min(initial=0) < 0:
                raise DataError(f"task {p.task_id}: {p.image_path}: mask values must be 0..255")
            Image.fromarray(p.mask.astype(np.uint8), mode="L").save(path)
        elif isinstance(p, ClassificationPrediction):
            entries[TaskKind.CLASSIFICATION].append(
                {
                    "image_path": p.image_path,
                    "task_id": p.task_id,
                    "predicted_class": int(p.predicted_class),
                    "predicted_probs": [float(v) for v in p.probs],
                }
            )
        elif isinstance(p, DetectionPrediction):
            box = np.asarray(p.box, dtype=np.float64)
            entries[TaskKind.DETECTION].append(
                {
                    "image_path": p.image_path,
                    "task_id": p.task_id,
                    "bbox_normalized": _normalised(box, p.size),
                    "bbox_pixels": box.tolist(),
                }
            )
        else:
            points = np.asarray(p.points, dtype=np.float64)
            entries[TaskKind.REGRESSION].append(
                {
                    "image_path": p.image_path,
                    "task_id": p.task_id,
                    "predicted_points_normalized": _normalised(points, p.size),
                    "predicted_points_pixels": points.reshape(-1).tolist(),
                }
            )
    for kind, items in entries.items():
        if items:
            (out_dir / FILES[kind]).write_text(
                json.dumps(items, indent=1, ensure_ascii=False), encoding="utf-8"
            )


@dataclasses.dataclass(frozen=True)
class PredictionSet:
    """Predictions keyed by (task_id, image_path); masks are read lazily from ``root``."""

    root: Path
    entries: Mapping[tuple[str, str], Prediction]

    def get(self, task_id: str, image_path: str) -> Prediction | None:
        return self.entries.get((task_id, image_path))


def read_predictions(pred_dir: str | Path, index: FMUIAIndex) -> PredictionSet:
    """Read a prediction folder for the tasks of a ground-truth index. A malformed entry is an
    error naming the file, the entry and the task; a missing one is simply absent."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: prediction folder not found")
    entries: dict[tuple[str, str], Prediction] = {}
    registry = index.registry
    for kind, name in FILES.items():
        file = pred_dir / name
        if not file.exists():
            continue
        try:
            items = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}: not valid JSON: {exc}") from None
        if not isinstance(items, list):
            raise DataError(f"{file}: expected a JSON list of predictions")
        for i, item in enumerate(items):
            task_id = str(item.get("task_id", "")) if isinstance(item, dict) else ""
            where = f"{file} entry {i}: task {task_id or '<none>'}"
            if task_id not in registry or registry[task_id].kind is not kind:
                raise DataError(f"{where}: not a {kind.value} task of the registry")
            spec = registry[task_id]
            try:
                image_path = str(item["image_path"])
                if kind is TaskKind.CLASSIFICATION:
                    probs = tuple(float(v) for v in item["predicted_probs"])
                    if len(probs) != spec.num_classes:
                        raise ValueError(f"{len(probs)} probabilities for {spec.num_classes} classes")
                    pred: Prediction = ClassificationPrediction(
                        image_path, task_id, int(item["predicted_class"]), probs
                    )
                elif kind is TaskKind.DETECTION:
                    box = [float(v) for v in item["bbox_pixels"]]
                    if len(box) != 4:
                        raise ValueError(f"bbox_pixels has {len(box)} values, expected 4")
                    pred = DetectionPrediction(image_path, task_id, tuple(box))  # type: ignore[arg-type]
                else:
                    flat = [float(v) for v in item["predicted_points_pixels"]]
                    if len(flat) != 2 * spec.num_keypoints:
                        raise ValueError(
                            f"{len(flat)} values in predicted_points_pixels, expected {2 * spec.num_keypoints}"
                        )
                    pred = RegressionPrediction(
                        image_path, task_id, tuple(zip(flat[0::2], flat[1::2], strict=True))
                    )
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{where}: malformed prediction: {exc}") from None
            entries[(task_id, image_path)] = pred
    for task_id, records in index.records.items():
        if registry[task_id].kind is not TaskKind.SEGMENTATION:
            continue
        for r in records:
            assert r.mask_path is not None
            path = mask_prediction_path(pred_dir, r.mask_path)
            if path.exists():
                entries[(task_id, r.image_path)] = SegmentationPrediction(
                    r.image_path, task_id, r.mask_path, read_mask(path)
                )
    return PredictionSet(pred_dir, entries)


def ground_truth_as_predictions(index: FMUIAIndex) -> list[Prediction]:
    """The ground truth written as predictions (one-hot probabilities): a perfect submission."""
    out: list[Prediction] = []
    for task_id, records in index.records.items():
        spec = index.registry[task_id]
        for r in records:
            if spec.kind is TaskKind.SEGMENTATION:
                assert r.mask_file is not None and r.mask_path is not None
                out.append(SegmentationPrediction(r.image_path, task_id, r.mask_path, read_mask(r.mask_file)))
            elif spec.kind is TaskKind.CLASSIFICATION:
                assert r.label is not None
                probs = tuple(1.0 if c == r.label else 0.0 for c in range(spec.num_classes))
                out.append(ClassificationPrediction(r.image_path, task_id, r.label, probs))
            elif spec.kind is TaskKind.DETECTION:
                assert r.box is not None
                out.append(DetectionPrediction(r.image_path, task_id, r.box, r.size))
            else:
                assert r.keypoints is not None
                out.append(RegressionPrediction(r.image_path, task_id, r.keypoints, r.size))
    return out
