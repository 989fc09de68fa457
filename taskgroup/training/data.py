"""The data a training run needs: where it is, its splits, and batches by (task, positions).

``prepare_data`` resolves the data (a user's FM_UIA root, or the embedded synthetic benchmark
generated once into a cache folder), validates it, and picks the evaluation split: the root's
``val/`` when it has one, else an image-level stratified split of ``train`` (an error when it
leaves a task without rows on one side). A held-out test split (the root's ``test/``, or
``data.test_root``) is loaded too when there is one: networks are chosen and tasks served on
validation, and reported on test (Standley et al. 2020). The bad rows of every split go to one
report. With
``preload`` every image is decoded and resized once into memory as uint8 (a few hundred MB for the synthetic
benchmark at 64 px), so a step spends almost no time on data; ground truth for evaluation is
kept at the original resolution, as the official metrics need it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from rich.progress import Progress

from taskgroup.config import DataConfig
from taskgroup.data import (
    Batch,
    FMUIAIndex,
    Record,
    TaskDataset,
    collate_examples,
    find_roots,
    load_index,
    split_index,
)
from taskgroup.data.synthetic import generate
from taskgroup.errors import DataError
from taskgroup.tasks import TaskRegistry

log = logging.getLogger("taskgroup")


def build_lock(target: Path) -> FileLock:
    """The lock beside ``target`` that one builder of it holds (others wait instead of building
    it again); the operating system frees it when the holder dies."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(target.parent / f".{target.name}.lock"))


def generate_once(target: Path, make: Callable[[Path], object]) -> Path:
    """Build a folder once: ``make`` writes into a private temporary folder that is then renamed
    to ``target``, so a killed build never leaves a half-written ``target``; concurrent callers
    (workers on a fresh cache) wait for the one that builds it."""
    if target.is_dir():
        return target
    with build_lock(target):
        if target.is_dir():  # built while this process waited
            return target
        tmp = target.parent / f".{target.name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp)
        tmp.rename(target)
    return target


def synthetic_root(cfg: DataConfig, registry: TaskRegistry) -> Path:
    """The synthetic benchmark in the cache folder, generated on first use."""
    name = f"synthetic-v{cfg.synthetic_version}-{cfg.synthetic_scale}-seed{cfg.synthetic_seed}"
    root = Path(os.path.expanduser(cfg.cache_dir)) / name
    if not root.is_dir():
        log.info("generating the synthetic benchmark (%s) into %s", cfg.synthetic_scale, root)
    return generate_once(
        root,
        lambda tmp: generate(
            tmp, registry, cfg.synthetic_scale, cfg.synthetic_seed, version=cfg.synthetic_version
        ),
    )


@dataclasses.dataclass
class SplitData:
    """The examples of one split for some tasks: datasets, preloaded images, ground truth."""

    datasets: dict[str, TaskDataset]
    images: dict[str, torch.Tensor] | None  # task -> (N, 3, S, S) uint8 when preloaded
    targets: dict[str, torch.Tensor] | None

    def size(self, task: str) -> int:
        return len(self.datasets[task])

    def records(self, task: str) -> tuple[Record, ...]:
        return self.datasets[task].records

    def batch(self, task: str, positions: Sequence[int]) -> Batch:
        dataset = self.datasets[task]
        if self.images is None or self.targets is None:
            return collate_examples([dataset[i] for i in positions])
        idx = torch.as_tensor(list(positions), dtype=torch.long)
        records = dataset.records
        return Batch(
            task_id=task,
            images=dataset.normalise(self.images[task][idx]),
            targets=self.targets[task][idx],
            original_sizes=torch.tensor([records[i].size for i in positions], dtype=torch.int64),
            image_paths=tuple(records[i].image_path for i in positions),
            indices=idx,
        )


@dataclasses.dataclass
class TrainingData:
    train: SplitData
    val: SplitData
    root: Path
    val_source: str  # "val/ root" or "split of train"
    test: SplitData | None = None  # the held-out test split, None when the data has none
    test_source: str | None = None  # "test/ root" or "data.test_root <path>", None without one

    def split(self, name: str) -> SplitData:
        """The split called ``name`` ("train", "val" or "test")."""
        found = {"train": self.train, "val": self.val, "test": self.test}.get(name)
        if found is None:
            raise ValueError(f"no {name!r} split here (splits: train, val{', test' if self.test else ''})")
        return found


def _split_data(
    index_records: dict[str, Sequence[Record]],
    registry: TaskRegistry,
    image_size: int,
    preload: bool,
    label: str,
) -> SplitData:
    datasets = {t: TaskDataset(registry[t], recs, image_size) for t, recs in index_records.items()}
    if not preload:
        return SplitData(datasets, None, None)
    images: dict[str, torch.Tensor] = {}
    targets: dict[str, torch.Tensor] = {}
    total = sum(len(d) for d in datasets.values())
    with Progress(transient=True) as progress:
        bar = progress.add_task(f"decoding {label}", total=total)
        for task, dataset in datasets.items():
            images[task] = torch.stack([dataset.read_image(i) for i in range(len(dataset))])
            targets[task] = torch.stack([dataset.target(r) for r in dataset.records])
            progress.advance(bar, len(dataset))
    return SplitData(datasets, images, targets)


def subsample(records: Sequence[Record], fraction: float, task: str) -> tuple[Record, ...]:
    """``fraction`` of a task's records (at least one), chosen by a permutation seeded by the task
    name, so smaller fractions are nested in larger ones; the records keep their order."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data.train_fraction must be in (0, 1], got {fraction}")
    records = tuple(records)
    if fraction == 1.0:
        return records
    keep = max(1, round(fraction * len(records)))
    order = np.random.default_rng(zlib.crc32(task.encode())).permutation(len(records))
    return tuple(records[i] for i in sorted(order[:keep]))


def prepare_data(
    cfg: DataConfig, registry: TaskRegistry, tasks: Sequence[str], report_dir: Path | None = None
) -> TrainingData:
    """Resolve, validate and (optionally) preload the data of some tasks."""
    root = Path(cfg.root) if cfg.root is not None else synthetic_root(cfg, registry)
    roots = find_roots(root)
    if "train" not in roots:
        raise DataError(
            f"{root}: no train/csv_files/ (found only {', '.join(f'{s}/' for s in roots)}): a data "
            "root needs its training split"
        )
    # one report for every split, each row naming its split and root (see write_bad_rows):
    # data.bad_report when set (written also without skip_bad: an error lists only a few rows)
    if cfg.bad_report is not None:
        report: Path | None = Path(cfg.bad_report).expanduser()
    else:
        report = (report_dir / "bad_rows.csv") if report_dir is not None and cfg.skip_bad else None

    def load(split_root: Path, split: str) -> FMUIAIndex:
        index = load_index(
            split_root, registry, tasks=tasks, skip_bad=cfg.skip_bad, report=report, split=split
        )
        _check_tasks(index, tasks)
        return index

    train_index = load(roots["train"], "train")
    if "val" in roots:
        val_index = load(roots["val"], "val")
        train_records, val_records, source = dict(train_index.records), dict(val_index.records), "val/ root"
    else:
        if not 0.0 < cfg.val_fraction < 1.0:
            raise DataError(
                f"{root}: no val/ split, and data.val_fraction is {cfg.val_fraction}: "
                "a validation split of train needs a fraction in (0, 1)"
            )
        split = split_index(train_index, cfg.val_fraction, seed=0)
        train_records, val_records = split.records(train_index, "train"), split.records(train_index, "val")
        source = f"{cfg.val_fraction:.0%} split of train"
        _check_split(train_records, val_records, tasks, roots["train"], cfg.val_fraction)
    order = list(tasks)
    train_records = {t: subsample(train_records[t], cfg.train_fraction, t) for t in order}
    val_records = {t: val_records[t] for t in order}
    test_records = None
    test_root, test_source = _test_root(cfg, roots)
    if test_root is not None:  # validated as val/ is (before anything is decoded), never subsampled
        test_index = load(test_root, "test")
        test_records = {t: tuple(test_index.records[t]) for t in order}

    def decoded(records: dict[str, Sequence[Record]], label: str) -> SplitData:
        return _split_data(records, registry, cfg.image_size, cfg.preload, label)

    return TrainingData(
        train=decoded(train_records, "train"),
        val=decoded(val_records, "val"),
        root=root,
        val_source=source,
        test=decoded(test_records, "test") if test_records is not None else None,
        test_source=test_source,
    )


def _test_root(cfg: DataConfig, roots: dict[str, Path]) -> tuple[Path | None, str | None]:
    """The root of the held-out test split and how it was found: ``data.test_root`` when set,
    else the data root's ``test/``, else none."""
    if cfg.test_root is not None:
        path = Path(cfg.test_root).expanduser()
        if not (path / "csv_files").is_dir():
            raise DataError(f"data.test_root {path}: no csv_files/ folder (expected an FM_UIA root)")
        return path, f"data.test_root {path}"
    if "test" in roots:
        return roots["test"], "test/ root"
    return None, None


def train_sizes(cfg: DataConfig, registry: TaskRegistry, tasks: Sequence[str]) -> tuple[dict[str, int], Path]:
    """Training examples per task after the validation split (nothing decoded), and the root."""
    data = prepare_data(dataclasses.replace(cfg, preload=False), registry, tasks)
    return {t: data.train.size(t) for t in tasks}, data.root


def _check_split(
    train: dict[str, Sequence[Record]],
    val: dict[str, Sequence[Record]],
    tasks: Sequence[str],
    root: Path,
    val_fraction: float,
) -> None:
    """Every task needs rows on both sides of a split of ``train/``: a task with none in
    validation can be neither evaluated nor served (and stacking its empty batch fails)."""
    empty = [
        (t, side) for t in tasks for side, records in (("val", val), ("train", train)) if not records.get(t)
    ]
    if empty:
        listed = ", ".join(
            f"{t} ({len(train.get(t, ())) + len(val.get(t, ()))} rows, none in {side})" for t, side in empty
        )
        raise DataError(
            f"{root}: a {val_fraction:.0%} validation split leaves task(s) without rows on one side: {listed}. "
            "Validation takes round(val_fraction x rows) images per task and class, and an image shared "
            "by several tasks goes to one side for all of them. Give the data a val/ split, add rows, "
            "change data.val_fraction, or leave the task(s) out."
        )


def _check_tasks(index: FMUIAIndex, tasks: Sequence[str]) -> None:
    missing = [t for t in tasks if not index.records.get(t)]
    if missing:
        raise DataError(f"{index.root}: no rows for task(s) {', '.join(missing)}")
