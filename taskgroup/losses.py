"""Per-task losses, one per task kind (M2DINO: Dice, cross-entropy, L1, detection loss).

- segmentation: cross-entropy + soft Dice over the foreground classes (per image, smoothed);
- classification: cross-entropy;
- regression: L1 on keypoints normalised by the image size;
- detection: L1 on the normalised box + generalised IoU loss (``torchvision.ops``) + binary
  cross-entropy of the confidence logit against the (detached) IoU of the predicted box.
Targets come in the resized frame's pixels (as the datasets give them); outputs as the heads do.
The total of a multi-task step is ``sum_t lambda_t L_t`` plus the MoE auxiliary loss.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou_loss

from taskgroup.tasks import TaskSpec


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, mean over images and foreground classes. logits (B, C, H, W), target (B, H, W)."""
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    inter = (probs * onehot).sum(dim=(2, 3))
    denom = probs.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3))
    dice = (2 * inter + smooth) / (denom + smooth)  # (B, C)
    return 1 - dice[:, 1:].mean()


def segmentation_loss(output: torch.Tensor, target: torch.Tensor, image_size: int) -> torch.Tensor:
    return F.cross_entropy(output, target) + dice_loss(output, target)


def classification_loss(output: torch.Tensor, target: torch.Tensor, image_size: int) -> torch.Tensor:
    return F.cross_entropy(output, target)


def regression_loss(output: torch.Tensor, target: torch.Tensor, image_size: int) -> torch.Tensor:
    return F.l1_loss(output, target / image_size)


def detection_loss(output: torch.Tensor, target: torch.Tensor, image_size: int) -> torch.Tensor:
    box, confidence = output[:, :4], output[:, 4]
    true = target / image_size
    giou = generalized_box_iou_loss(box, true, reduction="mean")
    with torch.no_grad():
        iou = box_iou(box, true).diagonal()
    return F.l1_loss(box, true) + giou + F.binary_cross_entropy_with_logits(confidence, iou)


def task_loss(spec: TaskSpec, output: torch.Tensor, target: torch.Tensor, image_size: int) -> torch.Tensor:
    """The loss of one task's batch: the loss of its kind's entry in :mod:`taskgroup.kinds`."""
    from taskgroup.kinds import kind_entry  # the registry finds these losses when first used

    return kind_entry(spec).loss(output, target, image_size)


def total_loss(
    losses: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None
) -> torch.Tensor:
    """``sum_t lambda_t L_t`` over the tasks of a step (lambda_t = 1 unless given)."""
    if not losses:
        raise ValueError("no task losses to combine")
    weights = weights or {}
    return torch.stack([weights.get(t, 1.0) * loss for t, loss in losses.items()]).sum()
