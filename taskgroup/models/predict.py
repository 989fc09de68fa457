"""Model outputs -> predictions in original pixels, in the challenge's submission format."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from taskgroup.data.dataset import Batch
from taskgroup.data.fmuia import Record
from taskgroup.data.submission import (
    ClassificationPrediction,
    DetectionPrediction,
    Prediction,
    RegressionPrediction,
    SegmentationPrediction,
)
from taskgroup.metrics import resize_nearest
from taskgroup.tasks import TaskKind, TaskSpec


@torch.no_grad()
def decode_outputs(
    spec: TaskSpec, output: torch.Tensor, batch: Batch, records: Sequence[Record]
) -> list[Prediction]:
    """One prediction per example of ``batch``; ``records`` are the task's records (indexed by
    ``batch.indices``) and give each image's original size and mask path."""
    output = output.detach().float().cpu()
    out: list[Prediction] = []
    for i, position in enumerate(batch.indices.tolist()):
        record = records[position]
        height, width = record.size
        if spec.kind is TaskKind.SEGMENTATION:
            mask = output[i].argmax(dim=0).numpy()
            out.append(
                SegmentationPrediction(
                    record.image_path, spec.id, record.mask_path or "", resize_nearest(mask, (height, width))
                )
            )
        elif spec.kind is TaskKind.CLASSIFICATION:
            probs = output[i].softmax(dim=0).numpy().astype(np.float64)
            out.append(
                ClassificationPrediction(
                    record.image_path, spec.id, int(probs.argmax()), tuple(probs.tolist())
                )
            )
        elif spec.kind is TaskKind.DETECTION:
            box = output[i, :4].numpy().astype(np.float64) * [width, height, width, height]
            out.append(DetectionPrediction(record.image_path, spec.id, tuple(box.tolist()), (height, width)))  # type: ignore[arg-type]
        else:
            points = output[i].numpy().astype(np.float64) * [width, height]
            out.append(
                RegressionPrediction(
                    record.image_path, spec.id, tuple(map(tuple, points.tolist())), (height, width)
                )
            )
    return out
