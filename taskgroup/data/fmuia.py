"""Reader of the FM_UIA 2026 challenge layout, with validation before anything trains.

A root holds ``csv_files/*.csv`` (all read and concatenated); every path in a CSV is relative to
``csv_files/`` and is resolved with ``normpath(join(root/csv_files, path))``. Real paths contain
commas, spaces, parentheses, ``+`` and U+00A0, so the CSV strings are kept verbatim (they are
also the keys of the submission format). See ``../shared/fmuia.md`` section 2.

Every row is checked against the registry and its files before training starts: a bad row is an
error naming the CSV file, the row (the line number in that file, header = line 1) and the task.
With ``skip_bad=True`` each bad row is written to a report file instead, and the rest is used.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from taskgroup.errors import DataError, did_you_mean
from taskgroup.tasks import TaskKind, TaskRegistry, TaskSpec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")
#: how many bad rows an error message lists before "and N more"
MAX_LISTED = 10


@dataclasses.dataclass(frozen=True)
class Record:
    """One labelled image of one task; the target lives in the field of the task's kind.

    Coordinates are original-image pixels; ``size`` is (height, width) of the image.
    """

    task_id: str
    image_path: str  # the CSV string, verbatim (``../`` included)
    image_file: Path  # resolved on disk
    source: str  # the CSV file it came from
    line: int  # its line in that CSV (header = 1)
    size: tuple[int, int]
    label: int | None = None  # classification
    mask_path: str | None = None  # segmentation (CSV string)
    mask_file: Path | None = None
    box: tuple[float, float, float, float] | None = None  # detection, xyxy
    keypoints: tuple[tuple[float, float], ...] | None = None  # regression, (K, 2) as (x, y)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclasses.dataclass(frozen=True)
class BadRow:
    """A row that failed validation: file, line, task and what is wrong."""

    source: str
    line: int
    task_id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: task {self.task_id}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class FMUIAIndex:
    """The validated rows of one root, per task in registry order."""

    root: Path
    registry: TaskRegistry
    records: Mapping[str, tuple[Record, ...]]
    bad_rows: tuple[BadRow, ...] = ()

    @property
    def task_ids(self) -> tuple[str, ...]:
        return tuple(self.records)

    def counts(self) -> dict[str, int]:
        return {t: len(r) for t, r in self.records.items()}

    def __getitem__(self, task_id: str) -> tuple[Record, ...]:
        try:
            return self.records[task_id]
        except KeyError:
            raise KeyError(
                f"task {task_id!r} has no rows under {self.root}; {did_you_mean(task_id, self.records)}"
            ) from None


def resolve_path(root: Path, csv_path: str) -> Path:
    """Resolve a CSV path (relative to ``csv_files/``) against a root, as the challenge does."""
    return Path(os.path.normpath(os.path.join(root, "csv_files", csv_path)))


def find_roots(path: str | Path) -> dict[str, Path]:
    """The splits under a dataset folder: ``{"train": .., "val": ..}`` when it holds ``train/`` and
    ``val/`` (as the challenge release and ``taskgroup synth`` do), else ``{"train": path}``."""
    path = Path(path)
    if (path / "csv_files").is_dir():
        return {"train": path}
    roots = {name: path / name for name in ("train", "val", "test") if (path / name / "csv_files").is_dir()}
    if not roots:
        raise DataError(
            f"{path}: no csv_files/ folder here nor under train/ or val/ (expected the FM_UIA layout)"
        )
    return roots


def read_csvs(root: str | Path) -> pd.DataFrame:
    """All ``csv_files/*.csv`` of a root concatenated, as strings, with ``_source`` and ``_line``."""
    root = Path(root)
    folder = root / "csv_files"
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise DataError(f"{folder}: no CSV files (expected the FM_UIA layout: <root>/csv_files/*.csv)")
    frames = []
    for file in files:
        try:
            frame = pd.read_csv(file, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise DataError(f"{file}: cannot parse as CSV: {exc}") from None
        missing = {"image_path", "task_id", "task_name", "num_classes"} - set(frame.columns)
        if missing:
            raise DataError(f"{file}: missing column(s) {', '.join(sorted(missing))}")
        frame["_source"] = file.name
        frame["_line"] = np.arange(len(frame)) + 2  # header is line 1
        frames.append(frame)
    return pd.concat(frames, ignore_index=True).fillna("")


def load_index(
    root: str | Path,
    registry: TaskRegistry,
    *,
    tasks: Iterable[str] | None = None,
    skip_bad: bool = False,
    report: str | Path | None = None,
) -> FMUIAIndex:
    """Read and validate a root. Raises :class:`DataError` listing every bad row, unless
    ``skip_bad``, in which case bad rows go to ``report`` (CSV; default
    ``<root>/bad_rows.csv`` is *not* written into the data: the caller names a file) and are
    returned in ``bad_rows``."""
    root = Path(root)
    frame = read_csvs(root)
    wanted = set(tasks) if tasks is not None else None
    if wanted is not None:
        unknown = wanted - set(registry.ids)
        if unknown:
            name = sorted(unknown)[0]
            raise DataError(f"unknown task {name!r} requested; {did_you_mean(name, registry.ids)}")
    records: dict[str, list[Record]] = defaultdict(list)
    bad: list[BadRow] = []
    mask_cache: dict[Path, tuple[tuple[int, int], int]] = {}
    for row in frame.to_dict("records"):
        task_id = row["task_id"].strip()
        if wanted is not None and task_id not in wanted:
            continue
        try:
            record = _parse_row(root, row, registry, mask_cache)
        except _RowError as exc:
            bad.append(BadRow(row["_source"], int(row["_line"]), task_id or "<empty>", str(exc)))
            continue
        records[task_id].append(record)
    if bad:
        if report is not None:
            write_bad_rows(bad, report)
        if not skip_bad:
            listed = "\n  ".join(str(b) for b in bad[:MAX_LISTED])
            more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
            hint = f" (all listed in {report})" if report is not None else ""
            raise DataError(
                f"{root}: {len(bad)} bad row(s){hint}:\n  {listed}{more}\n"
                "Fix them, or pass --skip-bad to leave them out (each is logged to a report file)."
            )
    ordered = {t.id: tuple(records[t.id]) for t in registry if t.id in records}
    return FMUIAIndex(root, registry, ordered, tuple(bad))


def write_bad_rows(bad: Iterable[BadRow], path: str | Path) -> None:
    """Write bad rows as CSV (source, line, task_id, reason)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "line", "task_id", "reason"])
        for b in bad:
            writer.writerow([b.source, b.line, b.task_id, b.reason])


class _RowError(Exception):
    """What is wrong with one row (becomes a BadRow)."""


def _parse_row(root: Path, row: Mapping[str, str], registry: TaskRegistry, mask_cache: dict) -> Record:
    task_id = row["task_id"].strip()
    if task_id not in registry:
        raise _RowError(f"unknown task_id {task_id!r}; {did_you_mean(task_id, registry.ids)}")
    spec = registry[task_id]
    if row["task_name"].strip() != spec.kind.value:
        raise _RowError(
            f"task_name {row['task_name']!r} disagrees with the registry's type {spec.kind.value!r}"
        )
    try:
        num = int(float(row["num_classes"]))
    except ValueError:
        raise _RowError(f"num_classes {row['num_classes']!r} is not an integer") from None
    if num != spec.num_classes:
        raise _RowError(f"num_classes {num} disagrees with the registry ({spec.num_classes})")
    image_path = row["image_path"]
    image_file = resolve_path(root, image_path)
    size = _image_size(image_file, "image")
    common = dict(
        task_id=task_id,
        image_path=image_path,
        image_file=image_file,
        source=row["_source"],
        line=int(row["_line"]),
        size=size,
    )
    if spec.kind is TaskKind.SEGMENTATION:
        mask_path = row.get("mask_path", "")
        if not mask_path:
            raise _RowError("no mask_path")
        mask_file = resolve_path(root, mask_path)
        if mask_file not in mask_cache:
            mask_cache[mask_file] = _mask_size_and_max(mask_file)
        mask_size, max_value = mask_cache[mask_file]
        if mask_size != size:
            raise _RowError(
                f"mask {mask_path!r} is {mask_size[1]}x{mask_size[0]} (WxH) but its image is {size[1]}x{size[0]}"
            )
        if max_value >= spec.num_classes:
            raise _RowError(f"mask {mask_path!r} has value {max_value} >= num_classes {spec.num_classes}")
        return Record(**common, mask_path=mask_path, mask_file=mask_file)
    if spec.kind is TaskKind.CLASSIFICATION:
        raw = row.get("mask", "")
        try:
            label = int(float(raw))
        except ValueError:
            raise _RowError(f"class label (column 'mask') {raw!r} is not an integer") from None
        if not 0 <= label < spec.num_classes:
            raise _RowError(f"class label {label} is outside 0..{spec.num_classes - 1}")
        return Record(**common, label=label)
    if spec.kind is TaskKind.DETECTION:
        return Record(**common, box=_parse_box(row, size))
    return Record(**common, keypoints=_parse_keypoints(row, spec))


def _image_size(path: Path, what: str) -> tuple[int, int]:
    if not path.is_file():
        raise _RowError(f"{what} file not found: {path}")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise _RowError(
            f"{what} {path} has extension {path.suffix!r}; expected one of {', '.join(IMAGE_EXTENSIONS)}"
        )
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise _RowError(f"{what} {path} is unreadable: {exc}") from None
    return height, width


def _mask_size_and_max(path: Path) -> tuple[tuple[int, int], int]:
    size = _image_size(path, "mask")
    try:
        mask = read_mask(path)
    except DataError as exc:
        raise _RowError(str(exc)) from None
    return size, int(mask.max()) if mask.size else 0


def read_mask(path: str | Path) -> np.ndarray:
    """A class-index mask as (H, W) int64. Single-channel PNGs are read as they are; an RGB mask
    whose three channels are equal is read from one channel; any other is an error."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"mask {path} is unreadable: {exc}") from None
    if array.ndim == 3:
        if not (array[..., :3] == array[..., :1]).all():
            raise DataError(
                f"mask {path} has {array.shape[2]} different channels; expected a single-channel class-index mask"
            )
        array = array[..., 0]
    return array.astype(np.int64)


def record_target(record: Record):
    """A record's ground truth at the original resolution: the class-index mask (read from
    disk), the label, the box or the keypoints."""
    if record.mask_file is not None:
        return read_mask(record.mask_file)
    if record.label is not None:
        return record.label
    return record.box if record.box is not None else record.keypoints


def _parse_box(row: Mapping[str, str], size: tuple[int, int]) -> tuple[float, float, float, float]:
    values = []
    for col in BOX_COLUMNS:
        raw = row.get(col, "")
        try:
            v = float(raw)
        except ValueError:
            raise _RowError(f"box column {col} is {raw!r}, not a number") from None
        if not math.isfinite(v):
            raise _RowError(f"box column {col} is {raw!r}, not finite")
        values.append(v)
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise _RowError(f"inverted or empty box {values} (need x_min < x_max and y_min < y_max)")
    height, width = size
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise _RowError(f"box {values} lies outside the {width}x{height} (WxH) image")
    return x0, y0, x1, y1


def _parse_keypoints(row: Mapping[str, str], spec: TaskSpec) -> tuple[tuple[float, float], ...]:
    present = sorted(
        (int(col[len("point_") : -len("_xy")]), col)
        for col, value in row.items()
        if col.startswith("point_") and col.endswith("_xy") and str(value).strip()
    )
    numbers = [n for n, _ in present]
    if numbers != list(range(1, spec.num_keypoints + 1)):
        raise _RowError(
            f"{len(present)} keypoint column(s) {numbers} but the task has {spec.num_keypoints} (point_1_xy..point_{spec.num_keypoints}_xy)"
        )
    points = []
    for _, col in present:
        raw = row[col]
        try:
            value = json.loads(raw)
            ok = (
                isinstance(value, list)
                and len(value) == 2
                and all(
                    isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
                )
            )
        except json.JSONDecodeError:
            ok = False
        if not ok:
            raise _RowError(f'{col} is {raw!r}; expected "[x, y]" with two finite numbers')
        points.append((float(value[0]), float(value[1])))
    return tuple(points)
