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

import contextlib
import csv
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import re
import reprlib
import stat
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout
from PIL import Image

from taskgroup.errors import ConfigError, DataError, did_you_mean
from taskgroup.files import WriteError, atomic_write_text, thread_cap
from taskgroup.tasks import TaskKind, TaskRegistry, TaskSpec

log = logging.getLogger("taskgroup")

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
    #: rows left out as identical repeats of an earlier row (same task, image and target)
    repeats: tuple[BadRow, ...] = ()
    #: (file, "image" | "mask") -> the file resized for preloading, filled by ``keep_size``
    #: (see :func:`load_index`)
    resized: Mapping[tuple[Path, str], np.ndarray] = dataclasses.field(
        default_factory=dict, repr=False, compare=False
    )

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


def shown_path(path: str | Path) -> str:
    r"""A path as text that can be printed and written: a name that is not valid UTF-8 (which
    Python reads with surrogate escapes, ``caf\udce9.csv``) shows its bytes (``caf\xe9.csv``);
    any other path is itself."""
    try:
        data = os.fsencode(path)
    except UnicodeEncodeError:  # a surrogate that no byte was decoded to: shown as \udXXX
        return os.fspath(path).encode("utf-8", "backslashreplace").decode("utf-8")
    return data.decode("utf-8", "backslashreplace")


def read_csvs(root: str | Path) -> pd.DataFrame:
    """All ``csv_files/*.csv`` of a root concatenated, as strings, with ``_source`` (the file's
    name, as :func:`shown_path` gives it), ``_line`` and ``_fields``.

    A file that is not a CSV with the four required columns is an error naming it (line 1, the
    header). Blank lines are kept while numbering, then dropped, so ``_line`` is the row's line
    in its file (pandas would skip them and shift every later row's number). ``_fields`` is
    empty, or says that the row has another number of cells than the header (see
    :func:`_field_counts`): such a row is bad, its cells may lie under the wrong columns."""
    root = Path(root)
    folder = root / "csv_files"
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise DataError(
            f"{shown_path(folder)}: no CSV files (expected the FM_UIA layout: <root>/csv_files/*.csv)"
        )
    frames = []
    for file in files:
        name, where = shown_path(file.name), shown_path(file)
        counts = _field_counts(file, where)
        try:
            # index_col=False and usecols: a row of more cells than the header is read up to the
            # header's width (pandas would otherwise take the first column as the index when
            # the first row is longer, and refuse any later longer row); _fields marks it bad
            frame = pd.read_csv(
                file,
                dtype=str,
                keep_default_na=False,
                encoding="utf-8-sig",
                skip_blank_lines=False,
                index_col=False,
                usecols=None if counts is None else range(counts[0]),
            )
        except pd.errors.EmptyDataError:
            raise DataError(
                f"{where}:1: empty file, no header line (expected {', '.join(REQUIRED_COLUMNS)}, ...)"
            ) from None
        except (ValueError, OSError) as exc:  # ParserError and UnicodeDecodeError are ValueErrors
            raise DataError(f"{where}: cannot parse as CSV: {exc}") from None
        missing = set(REQUIRED_COLUMNS) - set(frame.columns)
        if missing:
            raise DataError(f"{where}:1: missing column(s) {', '.join(sorted(missing))}")
        frame["_line"] = np.arange(len(frame)) + 2  # header is line 1
        fields = [""] * len(frame)
        if counts is not None and counts[2]:
            width, records, wrong = counts
            if records != len(frame):  # the two readers disagree on the rows: no row to mark
                listed = ", ".join(f"line {line} has {n}" for line, n in list(wrong.items())[:MAX_LISTED])
                raise DataError(
                    f"{where}: rows of another number of fields than the header ({width}): {listed}"
                )
            for line, n in wrong.items():
                quote = " (a cell holding a comma must be quoted)" if n > width else ""
                fields[line - 2] = f"{n} fields, header has {width}{quote}"
        frame["_fields"] = fields
        blank = frame.drop(columns=["_line", "_fields"]).apply(lambda col: col.str.strip() == "").all(axis=1)
        frame = frame[~blank].copy()
        frame["_source"] = name
        frames.append(frame)
    return pd.concat(frames, ignore_index=True).fillna("")


def _field_counts(file: Path, where: str) -> tuple[int, int, dict[int, int]] | None:
    """The header's number of cells, the number of rows after it and ``{line: number of cells}``
    of the rows (not blank) that have another number, read with the csv module: pandas pads a
    short row with empty cells and cuts (or refuses) a long one, so it cannot tell. Lines are
    numbered as in :func:`read_csvs` (header = 1, a row per line). None when the file has no
    header or does not decode (pandas then says why)."""
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                return None
            wrong = {}
            records = 0
            for line, cells in enumerate(reader, start=2):
                records += 1
                if len(cells) != len(header) and any(cell.strip() for cell in cells):
                    wrong[line] = len(cells)
    except (UnicodeDecodeError, OSError):
        return None
    except csv.Error as exc:  # a cell of more than csv.field_size_limit() characters
        raise DataError(f"{where}:{reader.line_num}: cannot parse as CSV: {exc}") from None
    return len(header), records, wrong


def load_index(
    root: str | Path,
    registry: TaskRegistry,
    *,
    tasks: Iterable[str] | None = None,
    skip_bad: bool = False,
    report: str | Path | None = None,
    split: str | None = None,
    allow_outside_root: bool = False,
    record_dir: str | Path | None = None,
    keep_size: int | None = None,
    keep_bytes: int | None = None,
) -> FMUIAIndex:
    """Read and validate a root. Raises :class:`DataError` listing every bad row, unless
    ``skip_bad``, in which case the bad rows are left out and returned in ``bad_rows``. With
    ``report`` (a CSV file the caller names; nothing is written into the data) the bad rows are
    also written there, see :func:`write_bad_rows`.

    A row is bad when it has another number of cells than the header, its ``task_id`` is not
    in the registry (also when ``tasks`` selects others: rows of known tasks outside ``tasks``
    are not read further), its ``task_name`` or
    ``num_classes`` disagrees with the registry, its image or mask path resolves outside the
    root (unless ``allow_outside_root``), a file is missing, cannot be named (a NUL byte, a name
    too long) or does not decode in full, a mask
    has another size than its image or a value >= ``num_classes``, a label is not an integer
    class, a box is inverted or outside its image, the keypoints are not ``point_1_xy`` ..
    ``point_K_xy`` each ``"[x, y]"`` within :data:`KEYPOINT_MARGIN` of the image, or the row
    repeats an earlier row's task and image with another target (label, box, keypoints or mask
    file): two different targets for one image cannot both be right, and the first is kept.
    A repeat with the *same* target (organiser data repeats rows, also across the CSV files of
    a task) is not an error: it is left out (an image counted twice would weigh twice in
    training and in the metrics), logged as a warning, returned in ``repeats`` and listed in
    ``report``.

    ``split`` names the split the root is (default: the root's folder name when it is one of
    ``train``, ``val``, ``test``, as :func:`find_roots` returns them); it tags each bad row and
    makes ``report`` gather several splits in one file.

    Decoding every file is most of the time this takes (tens of ms for an 800x600 PNG), so:

    - a file is decoded once per process (while its inode, size, modification and change
      times stay the same), however many rows, tasks and calls name it;
    - with ``record_dir`` (a cache folder), the files that decoded without error are recorded
      there by absolute path and the same identity (one JSON file per root, written
      atomically), and a later process does not decode them again;
    - with ``keep_size``, every image is also kept resized to ``keep_size`` x ``keep_size``
      RGB uint8 and every mask resized (nearest) to the same size, exactly as
      :class:`~taskgroup.data.TaskDataset` reads them, in ``resized`` (at most ``keep_bytes``
      of them, default :data:`KEEP_BYTES`; the rest is read again when used), so preloading
      does not decode them a second time."""
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
    paths = _Paths(root, allow_outside_root)
    decoded, resized = _decode_files(
        _files_to_decode(rows, registry, paths),
        _DecodeRecord(record_dir, root) if record_dir is not None else None,
        keep_size,
        KEEP_BYTES if keep_bytes is None else keep_bytes,
    )
    records: dict[str, list[Record]] = defaultdict(list)
    bad: list[BadRow] = []
    repeats: list[BadRow] = []
    first_seen: dict[tuple[str, Path], Record] = {}
    for row in rows:
        task_id = row["task_id"].strip()
        try:
            record = _parse_row(row, registry, decoded, paths)
        except _RowError as exc:
            bad.append(BadRow(row["_source"], int(row["_line"]), task_id or "<empty>", str(exc), split))
            continue
        earlier = first_seen.setdefault((task_id, record.image_file), record)
        if earlier is not record:
            conflict = _conflict(earlier, record)
            if conflict is None:
                reason = f"identical repeat of {earlier.where} (the same task, image and target): left out"
                repeats.append(BadRow(record.source, record.line, task_id, reason, split))
            else:
                reason = (
                    f"repeats {earlier.where} (the same task and image {record.image_path!r}) with "
                    f"another {conflict}"
                )
                bad.append(BadRow(record.source, record.line, task_id, reason, split))
            continue
        records[task_id].append(record)
    if repeats:
        log.warning(
            "%s: %d identical repeated row(s) left out (the same task, image and target as an earlier "
            "row), e.g. %s%s",
            root,
            len(repeats),
            repeats[0],
            f"; all listed in {report}" if report is not None else "",
        )
    # a split report is rewritten even without bad rows: this root's rows of a former run go
    listed_rows = bad + repeats
    if report is not None and (listed_rows or (split is not None and Path(report).is_file())):
        write_bad_rows(listed_rows, report, split=split, root=root)
    if bad and not skip_bad:
        listed = "\n  ".join(str(b) for b in bad[:MAX_LISTED])
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        hint = f" (all listed in {report})" if report is not None else ""
        raise DataError(
            f"{root}: {len(bad)} bad row(s){hint}:\n  {listed}{more}\n"
            "Fix them, or pass --skip-bad to leave them out (each is logged to a report file)."
        )
    ordered = {t.id: tuple(records[t.id]) for t in registry if t.id in records}
    return FMUIAIndex(root, registry, ordered, tuple(bad), tuple(repeats), resized)


def _conflict(earlier: Record, record: Record) -> str | None:
    """How a repeat's target differs from the earlier row's (None: the same target)."""
    for field, a, b in (
        ("class label", earlier.label, record.label),
        ("mask", earlier.mask_file, record.mask_file),
        ("box", earlier.box, record.box),
        ("keypoints", earlier.keypoints, record.keypoints),
    ):
        if a != b:
            if field == "mask":
                a, b = earlier.mask_path, record.mask_path
            return f"{field}: {b!r} here, {a!r} there"
    return None


REPORT_COLUMNS = ("source", "line", "task_id", "reason")
#: the columns of a report that gathers several splits of a dataset
SPLIT_REPORT_COLUMNS = ("split", "source", "line", "task_id", "reason", "root")


def write_bad_rows(
    bad: Iterable[BadRow], path: str | Path, *, split: str | None = None, root: str | Path | None = None
) -> None:
    """Write bad rows as CSV, atomically (a temporary file in the same folder renamed over
    ``path``), a file lock beside it (``.<name>.lock``) making concurrent writers (workers
    loading their data into one report) take turns. A file that cannot be written is a
    :class:`DataError` naming it.

    Without ``split``: the file holds these rows alone (columns source, line, task_id, reason).
    With ``split`` (and the ``root`` the rows come from): the file gathers every root written
    into it, with columns split, source, line, task_id, reason, root; the rows it already held
    for *other* roots are kept and those of ``root`` replaced, so loading train and then val
    into one report keeps both, and loading a root again does not repeat its rows.
    """
    path = Path(path)
    if split is not None and root is None:
        raise ValueError("write_bad_rows: a split report needs the root the rows come from")
    bad = list(bad)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.parent / f".{path.name}.lock")):
            if split is None:
                rows = [[b.source, b.line, b.task_id, b.reason] for b in bad]
                frame = pd.DataFrame(rows, columns=list(REPORT_COLUMNS))
            else:
                root_text = os.path.normpath(os.path.abspath(root))
                rows = [[split, b.source, b.line, b.task_id, b.reason, root_text] for b in bad]
                frame = pd.DataFrame(rows, columns=list(SPLIT_REPORT_COLUMNS))
                former = _split_report(path)
                if former is not None:
                    frame = pd.concat([former[former["root"] != root_text], frame], ignore_index=True)
            atomic_write_text(path, frame.to_csv(index=False))
    except (OSError, WriteError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DataError(f"bad-row report {path}: cannot be written ({reason})") from None


def _split_report(path: Path) -> pd.DataFrame | None:
    """An existing split report's rows (None when ``path`` is missing or is not one: it is then
    replaced)."""
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        return None
    return frame if tuple(frame.columns) == SPLIT_REPORT_COLUMNS else None


class _RowError(Exception):
    """What is wrong with one row (becomes a BadRow)."""


def _parse_int(raw: str, what: str) -> int:
    """An integer cell: ``2`` or ``2.0`` (pandas writes an integer column holding a gap as
    floats), never ``1.7``, ``inf`` or ``1e3``."""
    if not _INTEGER.fullmatch(raw):
        raise _RowError(f"{what} {raw!r} is not an integer")
    digits = raw.strip().split(".")[0]
    try:
        return int(digits)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits(): 4300)
        raise _RowError(
            f"{what} {reprlib.repr(raw)} is out of range (an integer of {len(digits.lstrip('+-'))} digits)"
        ) from None


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


class _Paths:
    """The CSV paths of a root, each resolved and checked against the root once (rows of
    several tasks name the same image)."""

    def __init__(self, root: Path, allow_outside_root: bool) -> None:
        self.root = root
        self.allow_outside_root = allow_outside_root
        self._resolved: dict[str, Path | str] = {}  # the file, or why it may not be read

    def __call__(self, csv_path: str, what: str) -> Path:
        """The file of a CSV path; a :class:`_RowError` (unless ``allow_outside_root``) when
        it leaves the root."""
        found = self._resolved.get(csv_path)
        if found is None:
            file = resolve_path(self.root, csv_path)
            problem = None if self.allow_outside_root else _outside_root(self.root, csv_path, file)
            found = self._resolved[csv_path] = file if problem is None else problem
        if isinstance(found, str):
            raise _RowError(
                f"{what} path {csv_path!r} {found} (paths are relative to csv_files/ and stay under the root)"
            )
        return found


def _files_to_decode(
    rows: Iterable[Mapping[str, str]], registry: TaskRegistry, paths: _Paths
) -> set[tuple[Path, str]]:
    """The (file, "image" | "mask") pairs the rows name inside the root (a prefetch list: a file
    left out here is decoded when its row is parsed)."""
    files = set()
    for row in rows:
        task_id = row["task_id"].strip()
        if task_id not in registry or row["_fields"]:
            continue
        named = [(row["image_path"], "image")]
        if registry[task_id].kind is TaskKind.SEGMENTATION and row.get("mask_path"):
            named.append((row["mask_path"], "mask"))
        for csv_path, what in named:
            with contextlib.suppress(_RowError):  # its row says so when parsed
                files.add((paths(csv_path, what), what))
    return files


# -- decoding, once per file ------------------------------------------------------------------
#: what decoding a file gives: an image's (H, W), a mask's ((H, W), largest value), or the
#: reason the file is bad, as text
Decoded = tuple[int, int] | tuple[tuple[int, int], int] | str
#: at most this many bytes of resized images and masks kept by one :func:`load_index` call for
#: preloading (an image at 64 px is 12 KiB: 2 GiB holds 170 000 of them)
KEEP_BYTES = 2 * 1024**3
#: OS errors that say the file system failed, not that the file is bad (NFS: EIO, ESTALE,
#: ETIMEDOUT; a loaded machine: EAGAIN, EINTR, ENOMEM, too many open files): retried, and never
#: recorded as a bad file
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EIO", "EAGAIN", "EINTR", "ETIMEDOUT", "ESTALE", "EBUSY", "ENOMEM", "ENOBUFS", "EMFILE",
        "ENFILE", "ENOLCK", "ECONNRESET", "ECONNABORTED", "EHOSTDOWN", "EHOSTUNREACH", "EREMOTEIO",
    )
    if hasattr(errno, name)
)  # fmt: skip
#: files one decoding thread takes at a time
DECODE_CHUNK = 16
#: seconds to wait before each retry of a transient error
RETRY_DELAYS = (0.2, 1.0, 3.0)


class _LRU:
    """A bounded map, least recently used entry dropped first, safe across threads (the
    decoding threads of :func:`_decode_files` fill it). ``functools.lru_cache`` would not do:
    a file decoded with its pixels kept for preloading is decoded by another function, whose
    result must fill the same cache."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[tuple, Decoded] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Decoded | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: tuple, value: Decoded) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


#: decode results of this process by (file, "image" | "mask", inode, size, modification and
#: change times): a rewritten file has a new change time, so it is decoded again. A worker or a
#: study that prepares the same data for several trainings decodes each file once.
_DECODED = _LRU(500_000)

#: the persistent record of decoded files (see :class:`_DecodeRecord`)
RECORD_FORMAT = "taskgroup-decoded-files"
RECORD_VERSION = 1
#: records (one per root) a record folder keeps; the least recently written go first
MAX_RECORDS = 64


def _identity(file: Path, what: str, st: os.stat_result) -> tuple:
    return (file, what, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _DecodeRecord:
    """The files of one root that decoded without error in an earlier process, by absolute
    path, "image" | "mask" and identity (inode, size, modification and change times), in
    ``<record_dir>/<hash of the root>.json``. Written atomically under a file lock (workers
    loading the same root merge their entries); a missing, unreadable or foreign file is an
    empty record, and a record that cannot be written costs the next process the decoding it
    would have saved, nothing else (a warning). JSON, never pickle: reading it runs no code.
    Bad files are never recorded (they are decoded again, and few)."""

    def __init__(self, folder: str | Path, root: Path) -> None:
        self.folder = Path(folder).expanduser()
        self.root = os.path.normpath(os.path.abspath(root))
        digest = hashlib.sha256(self.root.encode("utf-8", "surrogateescape")).hexdigest()[:20]
        self.path = self.folder / f"{digest}.json"
        self.entries = self._read()
        self.added: dict[str, list] = {}
        self.stale: set[str] = set()

    def _read(self) -> dict[str, list]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if (
            not isinstance(data, dict)
            or data.get("format") != RECORD_FORMAT
            or data.get("version") != RECORD_VERSION
            or data.get("root") != self.root
            or not isinstance(data.get("files"), dict)
        ):
            return {}
        return data["files"]

    @staticmethod
    def _name(key: tuple) -> str:
        return f"{key[1]}:{os.path.abspath(key[0])}"

    def get(self, key: tuple) -> Decoded | None:
        name = self._name(key)
        entry = self.entries.get(name)
        if entry is None:
            return None
        try:
            if list(entry[:4]) != list(key[2:]):
                self.stale.add(name)  # rewritten since: decoded again
                return None
            values = [int(v) for v in entry[4:]]
            if key[1] == "image" and len(values) == 2:
                return values[0], values[1]
            if key[1] == "mask" and len(values) == 3:
                return (values[0], values[1]), values[2]
        except (TypeError, ValueError):
            pass
        self.stale.add(name)  # malformed
        return None

    def add(self, key: tuple, result: Decoded) -> None:
        if isinstance(result, str):
            return
        flat = list(result) if key[1] == "image" else [*result[0], result[1]]
        self.added[self._name(key)] = [*key[2:], *flat]

    def save(self) -> None:
        if not self.added and not self.stale:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.folder / f".{self.path.name}.lock"), timeout=60):
                files = self._read()  # what other processes recorded meanwhile
                for name in self.stale - set(self.added):
                    files.pop(name, None)
                files.update(self.added)
                data = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "root": self.root, "files": files}
                atomic_write_text(self.path, json.dumps(data, separators=(",", ":")))
            self._prune()
        except (OSError, WriteError, Timeout) as exc:
            log.warning(
                "%s: the record of decoded files was not written (%s): the next process decodes them again",
                self.path,
                exc,
            )
        self.entries.update(self.added)
        self.added, self.stale = {}, set()

    def _prune(self) -> None:
        """Keep the :data:`MAX_RECORDS` most recently written records of the folder."""
        found = []
        for path in self.folder.glob("*.json"):
            try:
                found.append((path.stat().st_mtime_ns, path))
            except OSError:
                continue
        for _, path in sorted(found, reverse=True)[MAX_RECORDS:]:
            with contextlib.suppress(OSError):
                path.unlink()


def _workers() -> int:
    """Decoding threads: at most 8, the cores this process may use, and ``TASKGROUP_MAX_THREADS``."""
    workers = min(
        8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    try:
        cap = thread_cap()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return min(workers, cap) if cap is not None else workers


def _decode_files(
    files: Iterable[tuple[Path, str]],
    record: _DecodeRecord | None = None,
    keep_size: int | None = None,
    keep_bytes: int = KEEP_BYTES,
) -> tuple[dict[tuple[Path, str], Decoded], dict[tuple[Path, str], np.ndarray]]:
    """:func:`_decode` of every file once (an image shared by several tasks or rows is decoded
    once; a file unchanged since an earlier call of this process, or recorded in ``record``,
    is not decoded again), in threads: Pillow releases the GIL while it decodes. Returns the
    results and, with ``keep_size``, the files resized for preloading (see :func:`load_index`):
    those are decoded whether or not they were before, within ``keep_bytes``."""
    jobs: list[tuple[Path, str, int | None]] = []
    budget = keep_bytes
    for file, what in sorted(files):  # sorted: the files kept resized do not depend on threads
        size = None
        if (
            keep_size is not None
            and (cost := keep_size * keep_size * (3 if what == "image" else 1)) <= budget
        ):
            budget -= cost
            size = keep_size
        jobs.append((file, what, size))

    def work(job: tuple[Path, str, int | None]) -> tuple[Decoded, np.ndarray | None, tuple | None, bool]:
        """The file's result, its pixels, its identity (None: not to be cached) and whether it
        was decoded now."""
        file, what, size = job
        st = _retrying(file, lambda: _stat(file))
        key = None if isinstance(st, str) else _identity(file, what, st)
        if key is not None and size is None:
            found = _DECODED.get(key)
            if found is None and record is not None:
                found = record.get(key)
            if found is not None:
                return found, None, key, False
        result, pixels, cacheable = _retrying(file, lambda: _decode(file, what, st, size))
        return result, pixels, key if cacheable else None, True

    def work_on(chunk: list[tuple[Path, str, int | None]]) -> list:
        return [work(job) for job in chunk]

    # in chunks: a thread per file would cost more than the stat of a file already decoded
    chunks = [jobs[i : i + DECODE_CHUNK] for i in range(0, len(jobs), DECODE_CHUNK)]
    workers = _workers()
    if workers <= 1 or len(chunks) < 2:
        outputs = [out for chunk in chunks for out in work_on(chunk)]
    else:
        with ThreadPoolExecutor(workers) as pool:
            outputs = [out for done in pool.map(work_on, chunks) for out in done]
    results: dict[tuple[Path, str], Decoded] = {}
    resized: dict[tuple[Path, str], np.ndarray] = {}
    for (file, what, _), (result, pixels, key, new) in zip(jobs, outputs, strict=True):
        results[(file, what)] = result
        if pixels is not None:
            resized[(file, what)] = pixels
        if key is not None:
            _DECODED.put(key, result)
            if new and record is not None:
                record.add(key, result)
    if record is not None:
        record.save()
    return results, resized


def _stat(file: Path) -> os.stat_result | str:
    """The file's status, or why it has none, as text (a reason :func:`_decode` gives after
    "image " or "mask "): missing, or a path no file can have (a NUL byte, a name longer than
    the file system takes, a folder that cannot be searched). Transient OS errors are raised
    (see :func:`_retrying`)."""
    try:
        return os.stat(file)
    except (FileNotFoundError, NotADirectoryError):
        return f"file not found: {file}"
    except ValueError:  # os.stat refuses a path holding a NUL byte ("embedded null byte")
        return f"path {str(file)!r} holds a NUL byte, which no file name can"
    except OSError as exc:  # ENAMETOOLONG, EACCES on a folder of the path, ELOOP...
        if exc.errno in TRANSIENT_ERRNOS:
            raise
        return f"{file} cannot be read: {exc.strerror or exc}"


def _retrying(file: Path, call: Callable):
    """``call()``, again after a pause while it fails with a transient OS error (see
    :data:`TRANSIENT_ERRNOS`); still failing, a :class:`DataError` naming the file (and no row
    is marked bad: the file system failed, not the data)."""
    for delay in (*RETRY_DELAYS, None):
        try:
            return call()
        except OSError as exc:
            if exc.errno not in TRANSIENT_ERRNOS:
                raise
            if delay is None:
                raise DataError(
                    f"{file}: could not be read ({exc.strerror or exc}) after {len(RETRY_DELAYS) + 1} "
                    "attempts: an error of the file system, not of the file; run again"
                ) from None
            time.sleep(delay)
    raise AssertionError("unreachable")


def _is_os_error(exc: BaseException) -> bool:
    """Whether an exception of decoding comes from the operating system (an errno: a file that
    cannot be read now), not from the file's bytes (Pillow's errors carry none)."""
    return isinstance(exc, OSError) and exc.errno is not None


def _decode(
    path: Path, what: str, st: os.stat_result | str, keep_size: int | None = None
) -> tuple[Decoded, np.ndarray | None, bool]:
    """Decode a file in full: an image gives its (H, W), a mask ((H, W), its largest value); a
    file that is missing or does not decode gives the reason, as text (``st``: its status, or
    why it has none, see :func:`_stat`). Returned with the file resized to ``keep_size`` (None
    without) and whether the result may be cached: a missing file or an OS error (permissions)
    may change without the file changing, so it is not.
    Transient OS errors are raised (see :func:`_retrying`).

    ``Image.open`` reads the header alone, so a truncated file would pass a check of its size
    and fail in training (``image file is truncated``). A JPEG is decoded with DCT scaling
    (``draft``, an eighth of the pixels): every byte of it is still entropy-decoded, so a
    truncated or broken one fails as in full, at half the time (measured); not when it is kept
    resized, which needs every pixel."""
    if isinstance(st, str):
        return f"{what} {st}", None, False
    if not stat.S_ISREG(st.st_mode):
        return f"{what} file not found: {path}", None, False
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return (
            f"{what} {path} has extension {path.suffix!r}; expected one of {', '.join(IMAGE_EXTENSIONS)}",
            None,
            True,
        )
    try:
        if what == "mask":
            try:
                mask = _mask_array(path)
            except DataError as exc:
                return str(exc), None, True
            pixels = None if keep_size is None else resize_mask(mask, keep_size)
            return (mask.shape[:2], int(mask.max()) if mask.size else 0), pixels, True
        with Image.open(path) as im:
            width, height = im.size
            if keep_size is not None:
                pixels = resize_image(im, keep_size)
            else:
                pixels = None
                if im.format == "JPEG":
                    im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
                im.load()
    except DECODE_ERRORS as exc:
        if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
            raise
        if _is_os_error(exc):
            return f"{what} {path} cannot be read: {exc.strerror or exc}", None, False
        return f"{what} {path} is unreadable: {exc}", None, True
    return (height, width), pixels, True


def resize_image(im: Image.Image, size: int) -> np.ndarray:
    """(S, S, 3) uint8: an image as RGB resized (bilinear) to ``size`` x ``size``, as
    :meth:`~taskgroup.data.TaskDataset.read_image` reads it (the aspect is not kept)."""
    return np.array(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(S, S) uint8: a class-index mask resized (nearest) to ``size`` x ``size``, as
    :meth:`~taskgroup.data.TaskDataset.target` reads it."""
    resized = Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
    return np.array(resized, dtype=np.uint8)


def _decoded(decoded: dict, path: Path, what: str) -> Decoded:
    """The prefetched :func:`_decode` of a file (decoded now if it was not), or its reason."""
    if (path, what) in decoded:
        result = decoded[(path, what)]
    else:
        result = _retrying(path, lambda: _decode(path, what, _stat(path)))[0]
    if isinstance(result, str):
        raise _RowError(result)
    return result


def _parse_row(row: Mapping[str, str], registry: TaskRegistry, decoded: dict, paths: _Paths) -> Record:
    if row["_fields"]:
        raise _RowError(row["_fields"])
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
    image_file = paths(image_path, "image")
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
        mask_file = paths(mask_path, "mask")
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


def _mask_array(path: str | Path) -> np.ndarray:
    """:func:`read_mask` raising Pillow's and the OS's errors as they are."""
    with Image.open(path) as im:
        array = np.asarray(im)
    if array.ndim == 3:
        if not (array[..., :3] == array[..., :1]).all():
            raise DataError(
                f"mask {path} has {array.shape[2]} different channels; expected a single-channel class-index mask"
            )
        array = array[..., 0]
    return array.astype(np.int64)


def read_mask(path: str | Path) -> np.ndarray:
    """A class-index mask as (H, W) int64. Single-channel PNGs are read as they are; an RGB mask
    whose three channels are equal is read from one channel; any other is an error."""
    try:
        return _mask_array(path)
    except DataError:
        raise
    except DECODE_ERRORS as exc:
        raise DataError(f"mask {path} is unreadable: {exc}") from None


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
