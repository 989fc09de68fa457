"""Reader of the FM_UIA 2026 challenge layout, with validation before anything trains.

A root holds ``csv_files/*.csv`` (all read and concatenated); every path in a CSV is relative to
``csv_files/`` and is resolved with ``normpath(join(root/csv_files, path))``. Real paths contain
commas, spaces, parentheses, ``+`` and U+00A0, so the CSV strings are kept verbatim (they are
also the keys of the submission format). See ``../shared/fmuia.md`` section 2.

Every row is checked against the registry and its files before training starts: a bad row is an
error naming the CSV file, the row (the line number in that file, header = line 1) and the task.
With ``skip_bad=True`` each bad row is written to a report file instead, and the rest is used.
What a row must satisfy is listed in :func:`load_index`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from taskgroup.errors import DataError, did_you_mean
from taskgroup.tasks import TaskKind, TaskRegistry, TaskSpec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")
REQUIRED_COLUMNS = ("image_path", "task_id", "task_name", "num_classes")
#: the folder names of a dataset's splits (see :func:`find_roots`)
SPLIT_NAMES = ("train", "val", "test")
#: how many bad rows an error message lists before "and N more"
MAX_LISTED = 10
#: how far a keypoint may lie outside its image, as a fraction of the image's width (for x) or
#: height (for y). A point a pixel or two past the border is an edge landmark clicked at the
#: border, or the pixel-centre vs pixel-corner convention; a point further out is in another
#: frame (annotated at another resolution, x and y swapped on a non-square image) and would
#: train the regression head on a wrong target.
KEYPOINT_MARGIN = 0.05
#: what decoding a broken image file raises in Pillow (a truncated PNG raises OSError, a broken
#: chunk SyntaxError, an oversized image DecompressionBombError)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_INTEGER = re.compile(r"\s*[+-]?\d+(\.0*)?\s*")
_POINT_COLUMN = re.compile(r"point_([1-9]\d*)_xy")


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
    split: str | None = None  # "train", "val" or "test" when the root is one split of a dataset

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


def is_inside(root: Path, path: Path) -> bool:
    """Whether ``path`` lies under ``root``, judged on the normalised paths (``..`` collapsed,
    symbolic links *not* followed: a root whose folders are links elsewhere stays valid)."""
    base = os.path.normpath(os.path.abspath(root))
    target = os.path.normpath(os.path.abspath(path))
    try:
        return os.path.commonpath([base, target]) == base
    except ValueError:  # different drives
        return False


def find_roots(path: str | Path) -> dict[str, Path]:
    """The splits under a dataset folder: ``{"train": .., "val": ..}`` when it holds ``train/`` and
    ``val/`` (as the challenge release and ``taskgroup synth`` do), else ``{"train": path}``."""
    path = Path(path)
    if (path / "csv_files").is_dir():
        return {"train": path}
    roots = {name: path / name for name in SPLIT_NAMES if (path / name / "csv_files").is_dir()}
    if not roots:
        raise DataError(
            f"{path}: no csv_files/ folder here nor under train/ or val/ (expected the FM_UIA layout)"
        )
    return roots


def read_csvs(root: str | Path) -> pd.DataFrame:
    """All ``csv_files/*.csv`` of a root concatenated, as strings, with ``_source`` and ``_line``.

    A file that is not a CSV with the four required columns is an error naming it (line 1, the
    header). Blank lines are kept while numbering, then dropped, so ``_line`` is the row's line
    in its file (pandas would skip them and shift every later row's number)."""
    root = Path(root)
    folder = root / "csv_files"
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise DataError(f"{folder}: no CSV files (expected the FM_UIA layout: <root>/csv_files/*.csv)")
    frames = []
    for file in files:
        try:
            frame = pd.read_csv(
                file, dtype=str, keep_default_na=False, encoding="utf-8-sig", skip_blank_lines=False
            )
        except pd.errors.EmptyDataError:
            raise DataError(
                f"{file}:1: empty file, no header line (expected {', '.join(REQUIRED_COLUMNS)}, ...)"
            ) from None
        except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
            raise DataError(f"{file}: cannot parse as CSV: {exc}") from None
        missing = set(REQUIRED_COLUMNS) - set(frame.columns)
        if missing:
            raise DataError(f"{file}:1: missing column(s) {', '.join(sorted(missing))}")
        frame["_line"] = np.arange(len(frame)) + 2  # header is line 1
        blank = frame.drop(columns="_line").apply(lambda col: col.str.strip() == "").all(axis=1)
        frame = frame[~blank].copy()
        frame["_source"] = file.name
        frames.append(frame)
    return pd.concat(frames, ignore_index=True).fillna("")


def load_index(
    root: str | Path,
    registry: TaskRegistry,
    *,
    tasks: Iterable[str] | None = None,
    skip_bad: bool = False,
    report: str | Path | None = None,
    split: str | None = None,
    allow_outside_root: bool = False,
) -> FMUIAIndex:
    """Read and validate a root. Raises :class:`DataError` listing every bad row, unless
    ``skip_bad``, in which case the bad rows are left out and returned in ``bad_rows``. With
    ``report`` (a CSV file the caller names; nothing is written into the data) the bad rows are
    also written there, see :func:`write_bad_rows`.

    A row is bad when its ``task_id`` is not in the registry (also when ``tasks`` selects
    others: rows of known tasks outside ``tasks`` are not read further), its ``task_name`` or
    ``num_classes`` disagrees with the registry, its image or mask path resolves outside the
    root (unless ``allow_outside_root``), a file is missing or does not decode in full, a mask
    has another size than its image or a value >= ``num_classes``, a label is not an integer
    class, a box is inverted or outside its image, the keypoints are not ``point_1_xy`` ..
    ``point_K_xy`` each ``"[x, y]"`` within :data:`KEYPOINT_MARGIN` of the image, or the row
    repeats an earlier row's task and image (the first is kept: a repeated image would weigh
    twice in training and in the metrics, and two different targets for one image cannot both
    be right).

    ``split`` names the split the root is (default: the root's folder name when it is one of
    ``train``, ``val``, ``test``, as :func:`find_roots` returns them); it tags each bad row and
    makes ``report`` gather several splits in one file."""
    root = Path(root)
    if split is None and root.name in SPLIT_NAMES:
        split = root.name
    frame = read_csvs(root)
    wanted = set(tasks) if tasks is not None else None
    if wanted is not None:
        unknown = wanted - set(registry.ids)
        if unknown:
            name = sorted(unknown)[0]
            raise DataError(f"unknown task {name!r} requested; {did_you_mean(name, registry.ids)}")
    # an unknown task is bad whichever tasks are wanted: the same rule as without a selection
    rows = [
        row
        for row in frame.to_dict("records")
        if wanted is None or row["task_id"].strip() not in registry or row["task_id"].strip() in wanted
    ]
    decoded = _decode_files(_files_to_decode(root, rows, registry, allow_outside_root))
    records: dict[str, list[Record]] = defaultdict(list)
    bad: list[BadRow] = []
    first_seen: dict[tuple[str, Path], Record] = {}
    for row in rows:
        task_id = row["task_id"].strip()
        try:
            record = _parse_row(root, row, registry, decoded, allow_outside_root)
            earlier = first_seen.setdefault((task_id, record.image_file), record)
            if earlier is not record:
                raise _RowError(f"repeats {earlier.where} (the same task and image {record.image_path!r})")
        except _RowError as exc:
            bad.append(BadRow(row["_source"], int(row["_line"]), task_id or "<empty>", str(exc), split))
            continue
        records[task_id].append(record)
    # a split report is rewritten even without bad rows: this root's rows of a former run go
    if report is not None and (bad or (split is not None and Path(report).is_file())):
        write_bad_rows(bad, report, split=split, root=root)
    if bad and not skip_bad:
        listed = "\n  ".join(str(b) for b in bad[:MAX_LISTED])
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        hint = f" (all listed in {report})" if report is not None else ""
        raise DataError(
            f"{root}: {len(bad)} bad row(s){hint}:\n  {listed}{more}\n"
            "Fix them, or pass --skip-bad to leave them out (each is logged to a report file)."
        )
    ordered = {t.id: tuple(records[t.id]) for t in registry if t.id in records}
    return FMUIAIndex(root, registry, ordered, tuple(bad))


REPORT_COLUMNS = ("source", "line", "task_id", "reason")
#: the columns of a report that gathers several splits of a dataset
SPLIT_REPORT_COLUMNS = ("split", "source", "line", "task_id", "reason", "root")


def write_bad_rows(
    bad: Iterable[BadRow], path: str | Path, *, split: str | None = None, root: str | Path | None = None
) -> None:
    """Write bad rows as CSV.

    Without ``split``: the file holds these rows alone (columns source, line, task_id, reason).
    With ``split`` (and the ``root`` the rows come from): the file gathers every root written
    into it, with columns split, source, line, task_id, reason, root; the rows it already held
    for *other* roots are kept and those of ``root`` replaced, so loading train and then val
    into one report keeps both, and loading a root again does not repeat its rows. Hand-written:
    pandas appends (``mode="a"``) but cannot replace one root's rows of an earlier run.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if split is None:
        rows = [[b.source, b.line, b.task_id, b.reason] for b in bad]
        columns: tuple[str, ...] = REPORT_COLUMNS
    else:
        if root is None:
            raise ValueError("write_bad_rows: a split report needs the root the rows come from")
        root_text = os.path.normpath(os.path.abspath(root))
        rows = _kept_rows(path, root_text)
        rows += [[split, b.source, b.line, b.task_id, b.reason, root_text] for b in bad]
        columns = SPLIT_REPORT_COLUMNS
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


def _kept_rows(path: Path, root_text: str) -> list[list]:
    """The rows of an existing split report that come from other roots than ``root_text``
    (none when ``path`` is missing or is not a split report)."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        if tuple(next(reader, ())) != SPLIT_REPORT_COLUMNS:
            return []
        return [row for row in reader if len(row) == len(SPLIT_REPORT_COLUMNS) and row[-1] != root_text]


class _RowError(Exception):
    """What is wrong with one row (becomes a BadRow)."""


def _parse_int(raw: str, what: str) -> int:
    """An integer cell: ``2`` or ``2.0`` (pandas writes an integer column holding a gap as
    floats), never ``1.7``, ``inf`` or ``1e3``."""
    if not _INTEGER.fullmatch(raw):
        raise _RowError(f"{what} {raw!r} is not an integer")
    return int(raw.strip().split(".")[0])


def _outside_root(root: Path, csv_path: str, file: Path) -> str | None:
    """Why a CSV path may not be read, or None. The layout's paths are relative to
    ``csv_files/``, its own ``../`` leading into the root; an absolute path or ``../`` climbing
    past the root reads files outside the dataset, and a predicted mask, written at the same
    path under a prediction folder, would land outside that folder."""
    if os.path.isabs(csv_path):
        return "is absolute"
    if not is_inside(root, file):
        return f"resolves to {file}, outside the data root {root}"
    return None


def _resolve_inside(root: Path, csv_path: str, what: str, allow_outside_root: bool) -> Path:
    """A CSV path resolved against the root, refused (unless ``allow_outside_root``) when it
    leaves the root."""
    file = resolve_path(root, csv_path)
    problem = None if allow_outside_root else _outside_root(root, csv_path, file)
    if problem is not None:
        raise _RowError(
            f"{what} path {csv_path!r} {problem} (paths are relative to csv_files/ and stay under the root)"
        )
    return file


def _files_to_decode(
    root: Path, rows: Iterable[Mapping[str, str]], registry: TaskRegistry, allow_outside_root: bool
) -> set[tuple[Path, str]]:
    """The (file, "image" | "mask") pairs the rows name inside the root (a prefetch list: a file
    left out here is decoded when its row is parsed)."""
    files = set()
    for row in rows:
        task_id = row["task_id"].strip()
        if task_id not in registry:
            continue
        named = [(row["image_path"], "image")]
        if registry[task_id].kind is TaskKind.SEGMENTATION and row.get("mask_path"):
            named.append((row["mask_path"], "mask"))
        for csv_path, what in named:
            file = resolve_path(root, csv_path)
            if allow_outside_root or _outside_root(root, csv_path, file) is None:
                files.add((file, what))
    return files


#: decode results of this process by file, "image" | "mask" and the file's identity (inode,
#: size, modification and change times: a rewritten file has a new change time), so a worker or
#: a study that prepares the same data for several trainings decodes each file once
_DECODED: dict[tuple, object] = {}
_DECODED_MAX = 500_000


def _decode_files(files: Iterable[tuple[Path, str]]) -> dict[tuple[Path, str], object]:
    """:func:`_decode` of every file once (an image shared by several tasks or rows is decoded
    once, and a file unchanged since an earlier call of this process is not decoded again), in
    threads: Pillow releases the GIL while it decodes. At most 8 threads, and at most
    ``TASKGROUP_MAX_THREADS`` (see ``taskgroup.runtime``, not imported here: it loads torch)."""
    keys: dict[tuple[Path, str], tuple | None] = {}
    for file, what in sorted(files):
        try:
            st = file.stat()
            keys[(file, what)] = (file, what, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:  # missing: _decode says so
            keys[(file, what)] = None
    todo = [f for f, key in keys.items() if key is None or key not in _DECODED]
    workers = min(
        8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    cap = os.environ.get("TASKGROUP_MAX_THREADS", "").strip()
    if cap.isdigit() and int(cap) >= 1:
        workers = min(workers, int(cap))
    if workers <= 1 or len(todo) < 2:
        results = [_decode(*f) for f in todo]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda f: _decode(*f), todo))
    if len(_DECODED) > _DECODED_MAX:
        _DECODED.clear()
    decoded = dict(zip(todo, results, strict=True))
    for f, result in decoded.items():
        if keys[f] is not None:
            _DECODED[keys[f]] = result
    return {f: decoded[f] if f in decoded else _DECODED[key] for f, key in keys.items()}


def _decode(path: Path, what: str) -> tuple[int, int] | tuple[tuple[int, int], int] | str:
    """Decode a file in full: an image gives its (H, W), a mask ((H, W), its largest value); a
    file that is missing or does not decode gives the reason, as text.

    ``Image.open`` reads the header alone, so a truncated file would pass a check of its size
    and fail in training (``image file is truncated``). A JPEG is decoded with DCT scaling
    (``draft``, an eighth of the pixels): every byte of it is still entropy-decoded, so a
    truncated or broken one fails as in full, at half the time (measured)."""
    if not path.is_file():
        return f"{what} file not found: {path}"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"{what} {path} has extension {path.suffix!r}; expected one of {', '.join(IMAGE_EXTENSIONS)}"
    if what == "mask":
        try:
            mask = read_mask(path)
        except DataError as exc:
            return str(exc)
        return mask.shape[:2], int(mask.max()) if mask.size else 0
    try:
        with Image.open(path) as im:
            width, height = im.size
            if im.format == "JPEG":
                im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
            im.load()
    except DECODE_ERRORS as exc:
        return f"{what} {path} is unreadable: {exc}"
    return height, width


def _decoded(decoded: dict, path: Path, what: str):
    """The prefetched :func:`_decode` of a file (decoded now if it was not), or its reason."""
    result = decoded[(path, what)] if (path, what) in decoded else _decode(path, what)
    if isinstance(result, str):
        raise _RowError(result)
    return result


def _parse_row(
    root: Path, row: Mapping[str, str], registry: TaskRegistry, decoded: dict, allow_outside_root: bool
) -> Record:
    task_id = row["task_id"].strip()
    if task_id not in registry:
        raise _RowError(f"unknown task_id {task_id!r}; {did_you_mean(task_id, registry.ids)}")
    spec = registry[task_id]
    if row["task_name"].strip() != spec.kind.value:
        raise _RowError(
            f"task_name {row['task_name']!r} disagrees with the registry's type {spec.kind.value!r}"
        )
    num = _parse_int(row["num_classes"], "num_classes")
    if num != spec.num_classes:
        raise _RowError(f"num_classes {num} disagrees with the registry ({spec.num_classes})")
    image_path = row["image_path"]
    image_file = _resolve_inside(root, image_path, "image", allow_outside_root)
    size = _decoded(decoded, image_file, "image")
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
        mask_file = _resolve_inside(root, mask_path, "mask", allow_outside_root)
        mask_size, max_value = _decoded(decoded, mask_file, "mask")
        if mask_size != size:
            raise _RowError(
                f"mask {mask_path!r} is {mask_size[1]}x{mask_size[0]} (WxH) but its image is {size[1]}x{size[0]}"
            )
        if max_value >= spec.num_classes:
            raise _RowError(f"mask {mask_path!r} has value {max_value} >= num_classes {spec.num_classes}")
        return Record(**common, mask_path=mask_path, mask_file=mask_file)
    if spec.kind is TaskKind.CLASSIFICATION:
        label = _parse_int(row.get("mask", ""), "class label (column 'mask')")
        if not 0 <= label < spec.num_classes:
            raise _RowError(f"class label {label} is outside 0..{spec.num_classes - 1}")
        return Record(**common, label=label)
    if spec.kind is TaskKind.DETECTION:
        return Record(**common, box=_parse_box(row, size))
    return Record(**common, keypoints=_parse_keypoints(row, spec, size))


def read_mask(path: str | Path) -> np.ndarray:
    """A class-index mask as (H, W) int64. Single-channel PNGs are read as they are; an RGB mask
    whose three channels are equal is read from one channel; any other is an error."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im)
    except DECODE_ERRORS as exc:
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


def _parse_keypoints(
    row: Mapping[str, str], spec: TaskSpec, size: tuple[int, int]
) -> tuple[tuple[float, float], ...]:
    filled = [col for col, value in row.items() if col.startswith("point_") and str(value).strip()]
    unexpected = [col for col in filled if not _POINT_COLUMN.fullmatch(col)]
    if unexpected:
        raise _RowError(
            f"unexpected keypoint column {unexpected[0]!r} (keypoint columns are point_1_xy..point_{spec.num_keypoints}_xy)"
        )
    present = sorted((int(_POINT_COLUMN.fullmatch(col).group(1)), col) for col in filled)
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
        except (ValueError, OverflowError, RecursionError):  # JSONDecodeError is a ValueError
            ok = False
        if not ok:
            raise _RowError(f'{col} is {raw!r}; expected "[x, y]" with two finite numbers')
        x, y = float(value[0]), float(value[1])
        height, width = size
        mx, my = KEYPOINT_MARGIN * width, KEYPOINT_MARGIN * height
        if not (-mx <= x <= width + mx and -my <= y <= height + my):
            raise _RowError(
                f"{col} {raw!r} lies outside the {width}x{height} (WxH) image by more than "
                f"{KEYPOINT_MARGIN:.0%} of its size"
            )
        points.append((x, y))
    return tuple(points)
