"""Regression (keypoint) metric of FM_UIA 2026: mean radial error in original pixels.

MRE of an image = mean Euclidean distance over its keypoints; task MRE = mean over images;
lower is better.
"""

from __future__ import annotations

import numpy as np


def radial_errors(pred, gt) -> np.ndarray:
    """(K,) Euclidean distance per keypoint, points (K, 2) as (x, y)."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 2)
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 2)
    if pred.shape != gt.shape:
        raise ValueError(f"{pred.shape[0]} predicted keypoints for {gt.shape[0]} true ones")
    return np.linalg.norm(pred - gt, axis=1)


class RegressionMetric:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._mre: list[float] = []

    def update(self, pred_points, gt_points) -> None:
        self._mre.append(float(radial_errors(pred_points, gt_points).mean()))

    def add_failure(self, shape: tuple[int, int]) -> None:
        """A missing prediction counted as a failure: the error is the image diagonal."""
        self._mre.append(float(np.hypot(*shape)))

    def aggregate(self) -> dict[str, float]:
        if not self._mre:
            raise ValueError("no images were scored")
        return {"mre": float(np.mean(self._mre))}
