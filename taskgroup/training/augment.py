"""Training-time augmentation (``data.augment``), per task kind, drawn per step.

``hflip``: each training example is mirrored left-right with probability 1/2, its target with
it: a segmentation mask mirrored, a box ``(x1, y1, x2, y2)`` -> ``(S - x2, y1, S - x1, y2)``,
keypoints ``x -> S - x`` (in the resized S x S frame, pixel edges at 0 and S), a class label
unchanged. A task whose label a flip changes or whose meaning it breaks (``hflip_changes_label``
in the registry: laterality, positions, fetal planes, keypoints in a fixed order) is never
flipped. The draws come from a generator seeded by (train seed, step, rank), so a resumed run
flips exactly as the uninterrupted one did. Validation and test are never augmented.

Hand-written: a flip of image and target together, per kind, on already batched tensors (the
batch is one task's; torchvision's v2 transforms work per sample on tv_tensors, which this
batch layout does not use).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from taskgroup.data import Batch
from taskgroup.tasks import TaskKind, TaskSpec

AUGMENTATIONS = ("none", "hflip")


def flips(seed: int, step: int, rank: int, size: int) -> np.ndarray:
    """Which of a step's ``size`` examples are mirrored (the same on every resume)."""
    return np.random.default_rng([seed, 13, step, rank]).random(size) < 0.5


def hflip(batch: Batch, spec: TaskSpec, flip: np.ndarray, image_size: int) -> Batch:
    """``batch`` with the examples where ``flip`` is true mirrored, targets with them."""
    if spec.hflip_changes_label or not flip.any():
        return batch
    idx = torch.from_numpy(np.flatnonzero(flip))
    images = batch.images.clone()
    images[idx] = images[idx].flip(-1)
    targets = batch.targets.clone()
    chosen = targets[idx]
    if spec.kind is TaskKind.SEGMENTATION:
        targets[idx] = chosen.flip(-1)
    elif spec.kind is TaskKind.DETECTION:
        targets[idx] = torch.stack(
            [image_size - chosen[:, 2], chosen[:, 1], image_size - chosen[:, 0], chosen[:, 3]], dim=1
        )
    elif spec.kind is TaskKind.REGRESSION:
        chosen[..., 0] = image_size - chosen[..., 0]
        targets[idx] = chosen
    return dataclasses.replace(batch, images=images, targets=targets)
