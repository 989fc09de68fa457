"""Detection metric of FM_UIA 2026: IoU of the one predicted box with the one true box.

Continuous coordinates, 0 when the union is 0; task IoU = mean over images (not mAP). The boxes
are paired one to one: ``torchvision.ops.box_iou`` computes all N x M pairs and gives NaN for a
zero union, so the paired form is written here (a test checks it against box_iou's diagonal).
"""

from __future__ import annotations

import numpy as np


def paired_box_iou(pred, gt) -> np.ndarray:
    """(N,) IoU of pred[i] with gt[i], boxes (N, 4) xyxy; an inverted predicted box has area 0."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(pred[:, 2], gt[:, 2]) - np.maximum(pred[:, 0], gt[:, 0]), 0, None)
    ih = np.clip(np.minimum(pred[:, 3], gt[:, 3]) - np.maximum(pred[:, 1], gt[:, 1]), 0, None)
    inter = iw * ih

    def area(b: np.ndarray) -> np.ndarray:
        return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)

    union = area(pred) + area(gt) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


class DetectionMetric:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._iou: list[float] = []

    def update(self, pred_box, gt_box) -> None:
        self._iou.append(float(paired_box_iou(pred_box, gt_box)[0]))

    def add_failure(self) -> None:
        """A missing prediction counted as a failure: IoU 0."""
        self._iou.append(0.0)

    def aggregate(self) -> dict[str, float]:
        if not self._iou:
            raise ValueError("no images were scored")
        return {"iou": float(np.mean(self._iou))}
