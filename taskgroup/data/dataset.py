"""Torch datasets over validated FM_UIA records, one per task.

Each example is the image resized to ``image_size`` (square, aspect not kept, as the challenge
baseline does) and its target in that resized frame: a class-index mask (nearest-neighbour), a
class label, a box (xyxy) or keypoints (K, 2). The original size travels with every example so
predictions can be mapped back to original pixels (:func:`to_original_points`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from taskgroup.data.fmuia import Record, read_mask
from taskgroup.tasks import TaskKind, TaskSpec

#: ImageNet statistics, which DINOv3 (LVD-1689M) checkpoints also expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Example:
    """One image of one task, in the resized frame."""

    task_id: str
    image: torch.Tensor  # (3, S, S) float, normalised
    target: torch.Tensor  # seg (S, S) int64 | cls () int64 | det (4,) float | reg (K, 2) float
    original_size: tuple[int, int]  # (H, W) of the file on disk
    image_path: str  # the CSV string, the key of the submission format
    index: int  # position in the task's record list


@dataclasses.dataclass(frozen=True)
class Batch:
    """A batch of examples of one task (each multi-task step draws one task per batch)."""

    task_id: str
    images: torch.Tensor  # (B, 3, S, S)
    targets: torch.Tensor  # (B, ...) as in Example.target
    original_sizes: torch.Tensor  # (B, 2) int64, (H, W)
    image_paths: tuple[str, ...]
    indices: torch.Tensor  # (B,) int64

    def pin_memory(self) -> Batch:
        """The batch in pinned memory (a DataLoader with ``pin_memory`` calls it), so that its
        copy to the GPU can overlap the step."""
        return dataclasses.replace(self, images=self.images.pin_memory(), targets=self.targets.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return dataclasses.replace(
            self,
            images=self.images.to(device, non_blocking=non_blocking),
            targets=self.targets.to(device, non_blocking=non_blocking),
        )

    def __len__(self) -> int:
        return len(self.image_paths)


def collate_examples(examples: Sequence[Example]) -> Batch:
    """Stack examples of one task into a :class:`Batch`."""
    tasks = {e.task_id for e in examples}
    if len(tasks) != 1:
        raise ValueError(f"a batch must hold one task, got {sorted(tasks)}")
    return Batch(
        task_id=examples[0].task_id,
        images=torch.stack([e.image for e in examples]),
        targets=torch.stack([e.target for e in examples]),
        original_sizes=torch.tensor([e.original_size for e in examples], dtype=torch.int64),
        image_paths=tuple(e.image_path for e in examples),
        indices=torch.tensor([e.index for e in examples], dtype=torch.int64),
    )


def scale_points(points: np.ndarray | torch.Tensor, from_size: tuple[int, int], to_size: tuple[int, int]):
    """Map (..., 2) (x, y) coordinates from a (H, W) frame to another; boxes are 2 points."""
    sy = to_size[0] / from_size[0]
    sx = to_size[1] / from_size[1]
    if isinstance(points, torch.Tensor):
        scale = torch.tensor([sx, sy], dtype=points.dtype, device=points.device)
    else:
        scale = np.array([sx, sy], dtype=np.float64)
    return points * scale


def to_original_points(points, original_size: tuple[int, int], image_size: int):
    """Keypoints or a box (as (2, 2)) from the resized square frame back to original pixels."""
    return scale_points(points, (image_size, image_size), original_size)


class TaskDataset(Dataset):
    """The examples of one task, resized to ``image_size`` x ``image_size`` and normalised."""

    def __init__(
        self,
        spec: TaskSpec,
        records: Sequence[Record],
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        wrong = [r for r in records if r.task_id != spec.id]
        if wrong:
            raise ValueError(f"{wrong[0].where}: a {wrong[0].task_id} record given to the {spec.id} dataset")
        self.spec = spec
        self.records = tuple(records)
        self.image_size = int(image_size)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.records)

    def read_image(self, index: int) -> torch.Tensor:
        """(3, S, S) uint8: the image decoded as RGB and resized (what preloading keeps)."""
        size = (self.image_size, self.image_size)
        with Image.open(self.records[index].image_file) as im:
            rgb = im.convert("RGB").resize(size[::-1], Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, S, S) -> float, scaled to [0, 1] and normalised by mean and std."""
        mean, std = self._mean.to(images.device), self._std.to(images.device)
        return (images.float() / 255.0 - mean) / std

    def __getitem__(self, index: int) -> Example:
        record = self.records[index]
        return Example(
            task_id=self.spec.id,
            image=self.normalise(self.read_image(index)),
            target=self.target(record),
            original_size=record.size,
            image_path=record.image_path,
            index=index,
        )

    def target(self, record: Record) -> torch.Tensor:
        """The target of a record in the resized frame."""
        size = (self.image_size, self.image_size)
        kind = self.spec.kind
        if kind is TaskKind.SEGMENTATION:
            assert record.mask_file is not None
            mask = Image.fromarray(read_mask(record.mask_file).astype(np.uint8))
            mask = mask.resize(size[::-1], Image.Resampling.NEAREST)
            return torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())
        if kind is TaskKind.CLASSIFICATION:
            return torch.tensor(record.label, dtype=torch.int64)
        if kind is TaskKind.DETECTION:
            box = np.asarray(record.box, dtype=np.float64).reshape(2, 2)
            return torch.from_numpy(scale_points(box, record.size, size).reshape(4)).float()
        points = np.asarray(record.keypoints, dtype=np.float64)
        return torch.from_numpy(scale_points(points, record.size, size)).float()
