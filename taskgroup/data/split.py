"""Train/validation split that is stratified per task and keeps every image on one side.

Images are shared between tasks in the real data (breast classification images also sit under
breast segmentation; lung_2cls under lung; cervix_multi and FUGC share the FUGC set), so a split
per task would leak: the same picture would be trained on for one task and validated on for
another. This split assigns *images* (resolved files) to a side, for all their tasks at once.

Strata are (task, class label) for classification and (task,) otherwise. Images are visited in
a seeded random order, images used by several tasks first (they are the hard constraints), and
an image goes to validation while every stratum it belongs to is still below its quota
``round(val_fraction * n)``. Hand-written: scikit-learn's ``StratifiedGroupKFold`` stratifies one
label per sample, not several tasks' strata per group, and gives folds, not a fraction.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from taskgroup.data.fmuia import FMUIAIndex, Record


@dataclasses.dataclass(frozen=True)
class Split:
    """Record positions per task on each side."""

    train: dict[str, tuple[int, ...]]
    val: dict[str, tuple[int, ...]]

    def records(self, index: FMUIAIndex, side: str) -> dict[str, tuple[Record, ...]]:
        chosen = self.train if side == "train" else self.val
        return {t: tuple(index[t][i] for i in positions) for t, positions in chosen.items()}


def _stratum(record: Record) -> tuple[str, int]:
    return (record.task_id, record.label if record.label is not None else -1)


def split_index(index: FMUIAIndex, val_fraction: float = 0.2, seed: int = 0) -> Split:
    """Split a validated index into train and validation, per task and per image."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    by_image: dict[Path, list[tuple[str, int]]] = defaultdict(list)
    sizes: Counter = Counter()
    for task_id, records in index.records.items():
        for pos, record in enumerate(records):
            by_image[record.image_file].append((task_id, pos))
            sizes[_stratum(record)] += 1
    quota = {s: round(val_fraction * n) for s, n in sizes.items()}
    taken: Counter = Counter()
    images = sorted(by_image)  # a stable order before the seeded shuffle
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    # images shared by several rows first: they are the constraints that are hard to meet late
    order = sorted(order, key=lambda i: -len(by_image[images[i]]))
    val_images: set[Path] = set()
    for i in order:
        image = images[i]
        need: Counter = Counter(_stratum(index[t][p]) for t, p in by_image[image])
        if all(taken[s] + n <= quota[s] for s, n in need.items()):
            val_images.add(image)
            taken.update(need)
    train: dict[str, tuple[int, ...]] = {}
    val: dict[str, tuple[int, ...]] = {}
    for task_id, records in index.records.items():
        val[task_id] = tuple(p for p, r in enumerate(records) if r.image_file in val_images)
        train[task_id] = tuple(p for p, r in enumerate(records) if r.image_file not in val_images)
    return Split(train, val)
