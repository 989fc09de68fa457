"""Classification metrics as the FM_UIA 2026 evaluator computes them, with scikit-learn.

accuracy; F1 macro and weighted (zero_division=0); MCC (multiclass); AUC: binary
``roc_auc_score(y, p[:, 1])``, multiclass one-vs-rest macro. The official scorer turns any AUC
failure (e.g. a class absent from the ground truth) into 0: that is reported as the official
value, and ``auc_note`` says why (empty when the AUC is a real one).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score


@dataclasses.dataclass(frozen=True)
class ClassificationScores:
    accuracy: float
    auc: float
    f1_macro: float
    f1_weighted: float
    mcc: float
    auc_note: str = ""  # why the official AUC is 0, when it failed

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "auc_note"}


def official_auc(y_true: np.ndarray, probs: np.ndarray) -> tuple[float, str]:
    """(AUC, note): the official AUC, and a note saying why it is 0 when it failed."""
    problem = ""
    with warnings.catch_warnings():
        # recent scikit-learn returns NaN with a warning where older versions raised
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        try:
            if probs.shape[1] == 2:
                auc = float(roc_auc_score(y_true, probs[:, 1]))
            else:
                auc = float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro"))
        except ValueError as exc:
            auc, problem = math.nan, str(exc)
    if math.isfinite(auc):
        return auc, ""
    absent = sorted(set(range(probs.shape[1])) - set(np.unique(y_true).tolist()))
    why = f"class(es) {absent} absent from the ground truth" if absent else problem or "not finite"
    return 0.0, f"AUC undefined ({why}); the official scorer reports 0"


def classification_metrics(y_true, probs, y_pred=None) -> ClassificationScores:
    """Scores from true labels (N,), class probabilities (N, C) and predicted labels (N,)
    (default: the argmax of ``probs``; a label outside 0..C-1, such as -1 for a missing
    prediction, is never right)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != y_true.shape[0]:
        raise ValueError(f"probs must be (N, C) with N={y_true.shape[0]}, got {probs.shape}")
    y_pred = probs.argmax(axis=1) if y_pred is None else np.asarray(y_pred, dtype=np.int64)
    auc, note = official_auc(y_true, probs)
    return ClassificationScores(
        accuracy=float(accuracy_score(y_true, y_pred)),
        auc=auc,
        f1_macro=float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        f1_weighted=float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        mcc=float(matthews_corrcoef(y_true, y_pred)),
        auc_note=note,
    )


class ClassificationMetric:
    """Accumulates labels and probabilities; aggregates with :func:`classification_metrics`."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self._true: list[int] = []
        self._pred: list[int] = []
        self._probs: list[np.ndarray] = []

    def update(self, probs: np.ndarray, label: int, predicted: int | None = None) -> None:
        probs = np.asarray(probs, dtype=np.float64).reshape(-1)
        if probs.shape[0] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} probabilities, got {probs.shape[0]}")
        self._true.append(int(label))
        self._pred.append(int(probs.argmax()) if predicted is None else int(predicted))
        self._probs.append(probs)

    def add_failure(self, label: int) -> None:
        """A missing prediction counted as a failure: uniform probabilities, never right."""
        self.update(np.full(self.num_classes, 1.0 / self.num_classes), label, predicted=-1)

    def scores(self) -> ClassificationScores:
        if not self._true:
            raise ValueError("no images were scored")
        return classification_metrics(np.array(self._true), np.stack(self._probs), np.array(self._pred))

    def aggregate(self) -> dict[str, float]:
        return self.scores().as_dict()
