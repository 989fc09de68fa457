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

Each file is decoded at most once per process: validation keeps the images and masks resized
for preloading (``load_index(keep_size=...)``), and records the files that decoded without
error in ``<cache_dir>/decoded/`` (by absolute path, inode, size and times), so a later process
(the next training, each compare or affinity worker) does not decode them again to validate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from taskgroup.config import DataConfig, record_dir
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
from taskgroup.data.fmuia import KEEP_BYTES, read_csvs
from taskgroup.data.synthetic import generate
from taskgroup.errors import DataError
from taskgroup.locks import hold_lock
from taskgroup.tasks import TaskRegistry

log = logging.getLogger("taskgroup")


#: how long a process waits for another one to build a cache entry (the synthetic benchmark,
#: a pretrained encoder: minutes, an hour for a large one on a slow CPU) before giving up
BUILD_TIMEOUT = 3 * 3600.0


@contextlib.contextmanager
def build_lock(target: Path, timeout: float = BUILD_TIMEOUT) -> Iterator[None]:
    """Hold the lock beside ``target`` (``.<name>.lock``) that one builder of it holds: others
    wait for it instead of building it again. An ``flock`` lock, never a soft one (a file whose
    presence locks, which a kill would leave behind): the operating system frees it when its
    holder dies, and a file system without ``flock`` is a
    :class:`~taskgroup.runtime.LockUnavailable` (as :func:`taskgroup.runtime.lock_folder`). A
    wait longer than ``timeout`` seconds is a :class:`~taskgroup.runtime.FolderLocked` naming
    the lock file and its holder (pid, host, start, in ``.<name>.lock.json``)."""
    path = target.parent / f".{target.name}.lock"
    with hold_lock(
        path,
        wait=timeout,
        waiting=lambda holder: log.info("waiting for %s to build %s", holder, target),
        busy=lambda holder: (
            f"{path}: still held after {_duration(timeout)} by {holder}, which builds {target}; if "
            "that process hangs, end it (its lock goes with it), or point data.cache_dir elsewhere"
        ),
        unavailable=lambda why: (
            f"{path}: cannot be locked ({why}): the file system of {target.parent} does not lock "
            "files (flock), so two processes could build it at once; put data.cache_dir on a local disk"
        ),
    ):
        yield


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def generate_once(target: Path, make: Callable[[Path], object]) -> Path:
    """Build a folder once: ``make`` writes into a private temporary folder that is then renamed
    to ``target``, so a killed build never leaves a half-written ``target``; concurrent callers
    (workers on a fresh cache) wait for the one that builds it (see :func:`build_lock`)."""
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
    resized: Mapping[tuple[Path, str], np.ndarray] | None = None,
) -> SplitData:
    """The datasets of a split; with ``preload`` their images and targets in memory, taken from
    ``resized`` (what validation kept, see ``load_index(keep_size=...)``) where it has them,
    decoded here otherwise."""
    datasets = {t: TaskDataset(registry[t], recs, image_size) for t, recs in index_records.items()}
    if not preload:
        return SplitData(datasets, None, None)
    resized = resized or {}

    def image(dataset: TaskDataset, i: int) -> torch.Tensor:
        kept = resized.get((dataset.records[i].image_file, "image"))
        if kept is None or kept.shape != (image_size, image_size, 3):
            return dataset.read_image(i)
        return torch.from_numpy(kept).permute(2, 0, 1)

    def target(dataset: TaskDataset, record: Record) -> torch.Tensor:
        kept = resized.get((record.mask_file, "mask")) if record.mask_file is not None else None
        if kept is None or kept.shape != (image_size, image_size):
            return dataset.target(record)
        return torch.from_numpy(kept.astype(np.int64))

    images: dict[str, torch.Tensor] = {}
    targets: dict[str, torch.Tensor] = {}
    total = sum(len(d) for d in datasets.values())
    with Progress(transient=True) as progress:
        bar = progress.add_task(f"decoding {label}", total=total)
        for task, dataset in datasets.items():
            images[task] = torch.stack([image(dataset, i) for i in range(len(dataset))])
            targets[task] = torch.stack([target(dataset, r) for r in dataset.records])
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


def data_tasks(
    cfg: DataConfig,
    registry: TaskRegistry,
    tasks: Sequence[str] | None = None,
    console: Console | None = None,
) -> list[str]:
    """The tasks a command runs on: ``tasks`` when given; on the synthetic benchmark every task
    of the registry; on a data root (``data.root``) the registry's tasks, in its order, that
    have rows in the root's training split and, when it has one, in its ``val/`` (a root of 3
    of the 27 tasks runs those 3). Nothing is decoded: only the CSVs are read. The tasks found,
    and those with rows on one side only, are logged and printed on ``console``."""
    if tasks is not None:
        return list(tasks)
    if cfg.root is None:
        return list(registry.ids)
    roots = find_roots(cfg.root)
    found = {
        split: set(read_csvs(roots[split])["task_id"].str.strip()) & set(registry.ids)
        for split in ("train", "val")
        if split in roots
    }
    if "train" not in found:  # as prepare_data says it
        raise DataError(
            f"{cfg.root}: no train/csv_files/ (found only {', '.join(f'{s}/' for s in roots)}): a data "
            "root needs its training split"
        )
    both = set.intersection(*found.values())
    chosen = [t for t in registry.ids if t in both]
    if not chosen:
        raise DataError(
            f"{cfg.root}: no task of the registry has rows in "
            + (" and ".join(f"{split}/" for split in found) if len(found) > 1 else "its CSVs")
            + f" (tasks: {', '.join(registry.ids[:3])}, ...; see `taskgroup tasks`)"
        )
    lines = [f"tasks found in {cfg.root} ({len(chosen)} of {len(registry.ids)}): {', '.join(chosen)}"]
    one_side = [t for t in registry.ids if t in set.union(*found.values()) - both]
    if one_side:
        lines.append(f"left out, with rows in only one of train/ and val/: {', '.join(one_side)}")
    for line in lines:
        log.info(line)
        if console is not None:
            console.print(line, highlight=False, soft_wrap=True)
    return chosen


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

    # the resized images and masks validation keeps for preloading, within one budget for
    # every split
    resized: dict[tuple[Path, str], np.ndarray] = {}

    def load(split_root: Path, split: str) -> FMUIAIndex:
        index = load_index(
            split_root,
            registry,
            tasks=tasks,
            skip_bad=cfg.skip_bad,
            report=report,
            split=split,
            allow_outside_root=cfg.allow_outside_root,
            record_dir=record_dir(cfg),
            keep_size=cfg.image_size if cfg.preload else None,
            keep_bytes=max(0, KEEP_BYTES - sum(a.nbytes for a in resized.values())),
        )
        resized.update(index.resized)
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
        log.info(
            "%s: no val/ split; validation is a stratified, image-aware %s (seed 0)",
            roots["train"],
            source,
        )
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
        return _split_data(records, registry, cfg.image_size, cfg.preload, label, resized)

    data = TrainingData(
        train=decoded(train_records, "train"),
        val=decoded(val_records, "val"),
        root=root,
        val_source=source,
        test=decoded(test_records, "test") if test_records is not None else None,
        test_source=test_source,
    )
    resized.clear()  # held by the preloaded tensors now
    return data


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
