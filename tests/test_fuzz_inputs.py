"""Bad input, fuzzed (issue 25): hypothesis mutates the CSVs and images of a valid tiny benchmark
and every command either succeeds or exits 2 with a message naming the file (and, for a row of a
CSV, the line), never a traceback, and never changes an output that an earlier command wrote.

The benchmark is ``taskgroup synth --scale tiny`` on four tasks, one of each kind (cervix_multi,
breast_3cls, thyroid_nodule_det, FUGC; cervix_multi and FUGC share their images), with
``train/`` and ``val/``. Before anything is mutated, a ``taskgroup train`` run folder and a
``taskgroup evaluate`` folder are written from it and hashed. Each example copies the benchmark
to the same folder, applies one mutation (a CSV cell, row, column or file; an image or mask file)
and runs, in-process through :func:`taskgroup.cli.main`:

- ``tasks --data ROOT`` and ``tasks --data ROOT --skip-bad --bad-report FILE`` (every row the
  first one named as bad is in the report);
- ``train --data ROOT --out EARLIER``: the earlier run folder, finished, so nothing trains; on
  exit 2 it is byte-identical, on exit 0 only ``log.txt`` grew;
- ``train --data ROOT --skip-bad --out FRESH``: a real (two-step) training on what is left;
- ``evaluate --gt ROOT/val --pred PRED --out EARLIER_EVALUATION``: on exit 2 both folders are
  byte-identical.

``TASKGROUP_FUZZ_EXAMPLES=N`` runs N random examples instead of the default fixed-seed few.
Inputs that broke the contract once are in ``REGRESSIONS``, each run every time with the error
``tasks`` must now give (a break found later goes there too, with the message it should give).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import re
import shutil
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st
from PIL import Image
from test_training import tiny_config

from taskgroup.cli import main
from taskgroup.config import to_mapping
from taskgroup.data.fmuia import find_roots, load_index
from taskgroup.data.submission import ground_truth_as_predictions, write_predictions
from taskgroup.data.synthetic import generate
from taskgroup.tasks import TaskKind

TASKS = ("cervix_multi", "breast_3cls", "thyroid_nodule_det", "FUGC")
#: random examples when TASKGROUP_FUZZ_EXAMPLES is set (then unseeded), else a fixed-seed few
EXAMPLES = int(os.environ.get("TASKGROUP_FUZZ_EXAMPLES", "0"))


# -- the benchmark and its earlier outputs ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Table:
    """One CSV of the pristine benchmark, as cells."""

    split: str
    name: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclasses.dataclass(frozen=True)
class DataFile:
    """An image or mask that rows of the pristine benchmark name."""

    split: str
    rel: str  # under the split's root
    what: str  # "image" or "mask"
    wheres: tuple[str, ...]  # "<csv>:<line>" of every row naming it
    num_classes: int  # of the segmentation task, for a mask


class Bench:
    """The benchmark, its earlier outputs and the listing mutations draw from (a plain class:
    hypothesis prints a dataclass argument field by field, megabytes of saved bytes)."""

    pristine: Path  # train/ and val/, never touched
    work: Path  # each example's mutated copy (where the earlier outputs were made)
    scratch: Path  # fresh run folders and bad-row reports
    config: Path
    grouping: Path
    earlier: Path  # a finished run folder of `train` on the pristine data
    pred: Path  # the pristine val/ ground truth as a prediction folder
    evaluation: Path  # `evaluate` of pred on the pristine val/
    saved: dict[Path, dict[str, bytes]]  # the bytes of earlier, pred and evaluation
    tables: tuple[Table, ...]
    files: tuple[DataFile, ...]

    def __init__(self, **fields) -> None:
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        return f"Bench({self.pristine})"


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def restore(folder: Path, files: dict[str, bytes]) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


def read_table(path: Path) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    with path.open(newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    return tuple(header), tuple(tuple(r) for r in rows)


def write_table(path: Path, header, rows, encoding: str = "utf-8", newline: str = "\n") -> None:
    with path.open("w", newline="", encoding=encoding, errors="replace") as f:
        writer = csv.writer(f, lineterminator=newline)
        writer.writerow(header)
        writer.writerows(rows)


def run_cli(argv: list) -> tuple[int | None, str]:
    """Exit code (None when an exception escaped) and all the command printed, tracebacks of
    escaped exceptions included. Output goes to strict UTF-8 streams, as to a pipe or terminal."""
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True) for _ in "12")
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except (Exception, SystemExit):
            code = None
            escaped = traceback.format_exc()
        else:
            escaped = ""
    printed = out.buffer.getvalue() + err.buffer.getvalue()  # type: ignore[attr-defined]
    return code, printed.decode("utf-8", "backslashreplace") + escaped


@pytest.fixture(scope="module")
def bench(tmp_path_factory, registry) -> Bench:
    base = tmp_path_factory.mktemp("fuzz")
    pristine, work, scratch = base / "pristine", base / "data", base / "scratch"
    generate(pristine, registry.subset(list(TASKS)), "tiny", seed=0, workers=1)
    (pristine / "truth.yaml").unlink()
    det = next((pristine / "train" / "csv_files").glob("Det-*.csv"))
    header, rows = read_table(det)
    write_table(det, header, rows[:16])  # fewer images to decode per example
    shutil.copytree(pristine, work)
    cfg = tiny_config(work, steps=2, eval_every=2, checkpoint_every=2, warmup_steps=1)
    config, grouping = base / "config.yaml", base / "grouping.yaml"
    config.write_text(yaml.safe_dump(to_mapping(cfg)))
    grouping.write_text(yaml.safe_dump({"groups": {"all": list(TASKS)}}))
    earlier, pred, evaluation = base / "earlier", base / "pred", base / "evaluation"
    code, out = run_cli(
        ["train", "--data", work, "--config", config, "--grouping", grouping, "--out", earlier]
    )
    assert code == 0, out
    write_predictions(pred, ground_truth_as_predictions(load_index(work / "val", registry)))
    code, out = run_cli(["evaluate", "--gt", work / "val", "--pred", pred, "--out", evaluation])
    assert code == 0, out

    tables, named = [], {}
    for split, root in find_roots(pristine).items():
        for path in sorted((root / "csv_files").glob("*.csv")):
            header, rows = read_table(path)
            tables.append(Table(split, path.name, header, rows))
            for i, row in enumerate(rows):
                cells = dict(zip(header, row, strict=True))
                spec = registry[cells["task_id"]]
                where = f"{path.name}:{i + 2}"
                paths = [("image", cells["image_path"])]
                if spec.kind is TaskKind.SEGMENTATION:
                    paths.append(("mask", cells["mask_path"]))
                for what, csv_path in paths:
                    rel = os.path.relpath(os.path.normpath(root / "csv_files" / csv_path), root)
                    key = (split, rel, what)
                    wheres, _ = named.get(key, ((), 0))
                    named[key] = ((*wheres, where), spec.num_classes)
    files = tuple(DataFile(s, rel, what, w, n) for (s, rel, what), (w, n) in sorted(named.items()))
    saved = {folder: files_of(folder) for folder in (earlier, pred, evaluation)}
    return Bench(
        pristine=pristine,
        work=work,
        scratch=scratch,
        config=config,
        grouping=grouping,
        earlier=earlier,
        pred=pred,
        evaluation=evaluation,
        saved=saved,
        tables=tuple(tables),
        files=files,
    )


# -- mutations ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Mutation:
    """One change to the benchmark: ``family`` applied to ``target`` (a CSV or data file of
    ``split``) with ``args``; ``str()`` is its reproduction."""

    family: str
    split: str
    target: str
    args: tuple = ()

    def __str__(self) -> str:
        return f"{self.family} on {self.split}/{self.target} with {self.args!r}"


@dataclasses.dataclass(frozen=True)
class Expect:
    """What a failing command's message must name: one of ``wheres`` (a CSV ``name:line``, a CSV
    name, or an image's path; a tuple of texts that must all be there), or, when the change can
    leave a task without rows, that task."""

    wheres: tuple[str | tuple[str, ...], ...]
    may_empty_task: bool = False

    def named(self, message: str) -> bool:
        flat = message.replace("\n", "")  # (a long path is never wrapped, but to be sure)
        for where in self.wheres:
            parts = (where,) if isinstance(where, str) else where
            if all(p in message or p in flat for p in parts):
                return True
        return self.may_empty_task and "no rows for task" in message


#: cell values: numbers an integer or coordinate column must refuse or read right
NUMBER_TEXTS = (
    "", " ", "0", "1", "2", "3", "-1", "+1", "2.0", "3.0", "1.7", "-0", "1e3", "1e400", "-1e400",
    "inf", "-inf", "nan", "NaN", "1" + "0" * 400, "9" * 5000, "0x1", "1_0", "\u0663", " 2 ", "true",
)  # fmt: skip
#: cell values of a keypoint column
POINT_TEXTS = (
    "[1, 2]", "[1,2", "1, 2", "[1, 2, 3]", "[]", '["1", 2]', "[true, 1]", "[NaN, 1]",
    "[Infinity, 1]", "[1e999, 1]", "null", "{}", "[[1], 2]", "[" * 3000, "[1, 2]x", " [3, 4] ",
    "[-500, 10]", "[10, 10]", "[1" + "0" * 400 + ", 2]", "[" + "9" * 5000 + ", 2]",
)  # fmt: skip
#: new names of a CSV file (bytes: the last two are latin-1 and not UTF-8)
RENAMES = (b"Z.csv", "caf\u00e9 (2).csv".encode(), b"caf\xe9.csv", b"\xff.csv")
FAMILIES_ROW = ("cell", "duplicate_row", "short_row", "long_row", "blank_row", "delete_row")
FAMILIES_CSV = (
    "drop_column", "add_column", "rename_column", "truncate_csv", "empty_csv", "garbage_csv",
    "encoding_csv", "delete_csv", "copy_csv", "rename_csv",
)  # fmt: skip
FAMILIES_FILE = (
    "truncate_file", "garbage_file", "empty_file", "resize", "mode", "delete_file", "directory",
    "mask_value", "mask_channels", "replace_file",
)  # fmt: skip


def path_texts(bench: Bench, table: Table) -> list[str]:
    """Path cells: outside the root, absolute, missing, not an image, another row's file."""
    root = bench.work / table.split
    some = [f for f in bench.files if f.split == table.split]
    return [
        "", ".", "../", "../../x.png", "../" * 8 + "etc/passwd", "/etc/passwd",
        str(root / some[0].rel), "../Nothing/here.png", "../csv_files/" + table.name,
        "../Regression", "..\\Regression\\x.png", "~/x.png", "http://host/x.png",
        "../" + "a" * 300 + ".png", "../a\x00b.png", "../" + some[0].rel + " ",
        *("../" + f.rel for f in some[:: max(1, len(some) // 6)]),
    ]  # fmt: skip


@st.composite
def mutations(draw, bench: Bench) -> Mutation:
    # a cell takes the most kinds of value: a third of the examples
    family = draw(st.sampled_from(FAMILIES_ROW + FAMILIES_CSV + FAMILIES_FILE + ("cell",) * 12))
    if family in FAMILIES_FILE:
        candidates = [
            f for f in bench.files if family not in ("mask_value", "mask_channels") or f.what == "mask"
        ]
        file = draw(st.sampled_from(candidates))
        args: tuple = ()
        if family in ("truncate_file", "truncate_csv"):
            args = (draw(st.floats(0.0, 0.999, allow_subnormal=False)),)
        elif family == "garbage_file":
            args = (draw(st.binary(min_size=1, max_size=300)),)
        elif family == "resize":
            args = (draw(st.integers(1, 160)), draw(st.integers(1, 160)))
        elif family == "mode":
            args = (draw(st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "CMYK"])),)
        elif family == "mask_value":
            args = (draw(st.integers(0, 65535)), draw(st.integers(1, 20)))
        elif family == "replace_file":
            args = (draw(st.sampled_from([f.rel for f in bench.files if f.split == file.split])),)
        return Mutation(family, file.split, file.rel + ("" if file.what == "image" else "#mask"), args)
    table = draw(st.sampled_from(bench.tables))
    row = draw(st.integers(0, len(table.rows) - 1))
    column = draw(st.integers(0, len(table.header) - 1))
    # floats without subnormals: a `train` in this process (the fixture's) called
    # torch.set_flush_denormal(True), and hypothesis then refuses to draw subnormal floats
    values = st.one_of(
        st.sampled_from(NUMBER_TEXTS),
        st.sampled_from(POINT_TEXTS),
        st.sampled_from(path_texts(bench, table)),
        st.sampled_from([r[column] for r in table.rows]),
        st.text(max_size=12),
        st.integers(-(10**6), 10**6).map(str),
        st.floats(allow_subnormal=False).map(str),
        st.builds("[{}, {}]".format, *[st.floats(-300, 300, allow_subnormal=False)] * 2),
    )
    names = st.one_of(
        st.sampled_from(
            ["point_3_xy", "point_0_xy", "point_x_xy", "point_1_xy", "point_01_xy", "mask", "mask_path",
             "x_min", "task_id", "_line", "_source", "", " image_path", "Unnamed: 0"]
        ),
        st.text(max_size=10),
    )  # fmt: skip
    args = ()
    if family == "cell":
        args = (row, column, draw(values))
    elif family in ("duplicate_row", "blank_row"):
        args = (row, draw(st.integers(0, len(table.rows))))
    elif family == "short_row":
        args = (row, draw(st.integers(1, len(table.header) - 1)))
    elif family == "long_row":
        args = (row, draw(st.lists(values, min_size=1, max_size=3)))
    elif family in ("delete_row", "drop_column"):
        args = (row,) if family == "delete_row" else (column,)
    elif family == "add_column":
        args = (draw(st.integers(0, len(table.header))), draw(names), draw(values))
    elif family == "rename_column":
        args = (column, draw(names))
    elif family == "truncate_csv":
        args = (draw(st.floats(0.0, 0.999, allow_subnormal=False)),)
    elif family == "garbage_csv":
        args = (draw(st.binary(max_size=300)),)
    elif family == "encoding_csv":
        args = (row, column, draw(st.sampled_from(["utf-16", "utf-32", "latin-1", "cp1252", "utf-8-sig"])))
        args += (draw(st.sampled_from(["\r\n", "\n", "\r"])),)
    elif family == "copy_csv":
        args = (draw(st.sampled_from(["copy.csv", "Z.csv", "a b (1).csv"])),)
    elif family == "rename_csv":  # a file name in bytes: real archives hold latin-1 names too
        stem = st.binary(min_size=1, max_size=8).filter(lambda b: b"/" not in b and b"\x00" not in b)
        args = (draw(st.one_of(st.sampled_from(RENAMES), stem.map(lambda b: b + b".csv"))),)
    return Mutation(family, table.split, table.name, args)


def apply(bench: Bench, m: Mutation) -> Expect:
    """Apply ``m`` to ``bench.work`` (a fresh copy of the pristine benchmark)."""
    root = bench.work / m.split
    if m.family in FAMILIES_FILE:
        return _apply_file(bench, m, root)
    path = root / "csv_files" / m.target
    table = next(t for t in bench.tables if t.split == m.split and t.name == m.target)
    header, rows = list(table.header), [list(r) for r in table.rows]
    if m.family in FAMILIES_ROW:
        row = m.args[0]
        line = f"{m.target}:{row + 2}"
        if m.family == "cell":
            rows[row][m.args[1]] = m.args[2]
        elif m.family == "duplicate_row":
            rows.insert(m.args[1], list(rows[row]))
            line = f"{m.target}:{m.args[1] + 2}"  # the copy; the message names it or its original
        elif m.family == "short_row":
            rows[row] = rows[row][: -m.args[1]]
        elif m.family == "long_row":
            rows[row] = rows[row] + list(m.args[1])
        elif m.family == "blank_row":
            rows.insert(m.args[1], [])
        else:
            del rows[row]
        write_table(path, header, rows)
        if m.family in ("blank_row", "delete_row"):  # still valid
            return Expect((m.target,), may_empty_task=True)
        # (a row of more or fewer cells than the header is a bad row too: "N fields, header has M")
        return Expect((line,))
    if m.family == "drop_column":
        header.pop(m.args[0])
        for r in rows:
            r.pop(m.args[0])
        write_table(path, header, rows)
    elif m.family == "add_column":
        at, name, value = m.args
        header.insert(at, name)
        for r in rows:
            r.insert(at, value)
        write_table(path, header, rows)
    elif m.family == "rename_column":
        header[m.args[0]] = m.args[1]
        write_table(path, header, rows)
    elif m.family == "truncate_csv":
        data = path.read_bytes()
        path.write_bytes(data[: int(m.args[0] * len(data))])
    elif m.family == "empty_csv":
        path.write_bytes(b"")
    elif m.family == "garbage_csv":
        path.write_bytes(m.args[0])
    elif m.family == "encoding_csv":
        row, column, encoding, newline = m.args
        rows[row][column] = rows[row][column] + "\u00e9\u00b5"  # é µ: not ASCII
        write_table(path, header, rows, encoding=encoding, newline=newline)
    elif m.family == "delete_csv":
        path.unlink()
    elif m.family == "rename_csv":
        name = m.args[0]
        os.rename(path, os.path.join(os.fsencode(path.parent), name))
        shown = os.fsdecode(name)
        return Expect((shown, shown.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")))
    elif m.family == "copy_csv":
        shutil.copyfile(path, path.with_name(m.args[0]))
        return Expect((m.args[0], m.target))  # every row of the copy repeats one of the original
    return Expect((m.target,), may_empty_task=True)


def _apply_file(bench: Bench, m: Mutation, root: Path) -> Expect:
    rel, _, what = m.target.partition("#")
    what = what or "image"
    file = next(f for f in bench.files if f.split == m.split and f.rel == rel and f.what == what)
    path = root / rel
    expect = Expect((*file.wheres, str(path)))
    data = path.read_bytes()
    if m.family == "truncate_file":
        path.write_bytes(data[: int(m.args[0] * len(data))])
    elif m.family == "garbage_file":
        path.write_bytes(m.args[0])
    elif m.family == "empty_file":
        path.write_bytes(b"")
    elif m.family == "delete_file":
        path.unlink()
    elif m.family == "directory":
        path.unlink()
        path.mkdir()
    elif m.family == "replace_file":
        path.write_bytes((root / m.args[0]).read_bytes())
    else:
        with Image.open(path) as im:
            im.load()
        if m.family == "resize":
            resample = Image.Resampling.NEAREST if what == "mask" else Image.Resampling.BILINEAR
            im = im.resize(m.args, resample)
        elif m.family == "mode":
            mode = m.args[0]
            if mode == "I;16":
                im = Image.fromarray(
                    np.asarray(im.convert("L")).astype(np.uint16) * (1 if what == "mask" else 257)
                )
            else:
                im = im.convert(mode)
        elif m.family == "mask_value":
            value, side = m.args
            array = np.asarray(im).astype(np.uint16)
            array[:side, :side] = value
            im = Image.fromarray(array if value > 255 else array.astype(np.uint8))
        elif m.family == "mask_channels":
            array = np.stack([np.asarray(im)] * 3, axis=-1)
            array[0, 0, 1] = (int(array[0, 0, 0]) + 1) % 3
            im = Image.fromarray(array)
        try:
            im.save(path)
        except (OSError, ValueError, KeyError):  # a mode the file's format cannot hold
            reject()
    return expect


# -- the contract ------------------------------------------------------------------------------------
BAD_ROW = re.compile(r"^\s+(?P<source>.+?\.csv):(?P<line>\d+): task ", re.MULTILINE)


def check_contract(bench: Bench, m: Mutation) -> dict[str, tuple[int | None, str]]:
    """Run every command on the benchmark changed by ``m`` and check the contract; returns each
    command's exit code and output."""
    shutil.rmtree(bench.work)
    shutil.copytree(bench.pristine, bench.work)
    shutil.rmtree(bench.scratch, ignore_errors=True)
    bench.scratch.mkdir()
    expect = apply(bench, m)
    train = ["train", "--data", bench.work, "--config", bench.config, "--grouping", bench.grouping]
    report = bench.scratch / "bad_rows.csv"
    commands: dict[str, list] = {
        "tasks": ["tasks", "--data", bench.work],
        "tasks --skip-bad": ["tasks", "--data", bench.work, "--skip-bad", "--bad-report", report],
        "train (earlier run)": [*train, "--out", bench.earlier],
        "train --skip-bad": [*train, "--skip-bad", "--out", bench.scratch / "run"],
        "evaluate (earlier)": ["evaluate", "--gt", bench.work / "val", "--pred", bench.pred, "--out", bench.evaluation],
    }  # fmt: skip
    outputs = {}
    try:
        for name, argv in commands.items():
            code, out = run_cli(argv)
            outputs[name] = (code, out)
            where = (
                f"mutation: {m}\ncommand: taskgroup {' '.join(map(str, argv))}\nexit {code}, output:\n{out}"
            )
            assert code in (0, 2), where
            assert "Traceback" not in out, where
            if code == 2:
                assert "error:" in out, where
                # with --skip-bad, a task may be left without rows (the message names it)
                emptied = "--skip-bad" in name and "no rows for task" in out
                assert expect.named(out) or emptied, f"the message names none of {expect.wheres}\n{where}"
            if name == "tasks --skip-bad" and "bad row(s)" in outputs["tasks"][1]:
                listed = {(s, int(n)) for s, n in BAD_ROW.findall(outputs["tasks"][1])}
                assert code == 0, where
                found = pd.read_csv(report, dtype={"line": int})
                assert listed <= set(zip(found["source"], found["line"], strict=True)), where
            for folder in (bench.earlier, bench.pred, bench.evaluation):
                if code == 2 or folder == bench.pred:
                    assert files_of(folder) == bench.saved[folder], f"{folder} changed\n{where}"
            if name == "train (earlier run)" and code == 0:  # the finished run is reused as it was
                now, before = files_of(bench.earlier), bench.saved[bench.earlier]
                assert now.keys() == before.keys(), where
                assert [k for k in now if now[k] != before[k] and k != "log.txt"] == [], where
                assert now["log.txt"].startswith(before["log.txt"]), where
    finally:
        for folder in (bench.earlier, bench.evaluation):
            if files_of(folder) != bench.saved[folder]:
                restore(folder, bench.saved[folder])
    return outputs


# -- the property --------------------------------------------------------------------------------------
CLS, REG = "Cls-Three_1.synth_breast_3cls_8.csv", "Reg_1.FUGC (synth)_8.csv"
SEG, DET = "Seg-Three_1.synth_cervix_multi_8.csv", "Det-One_1.synth_thyroid_nodule_det_60.csv"
FUGC_IMAGE = "Regression/FUGC (synth)/images/FUGC_00000.png"
MASK = "Segmentation/Three/synth_cervix_multi/masks/FUGC_00001.png#mask"
DET_IMAGE = "Detection/One/synth_thyroid_nodule_det/images/thyroid_nodule_det_00002.bmp"


#: inputs that broke the contract once (an exception escaped, or every row of a CSV was misread),
#: each with what ``tasks --data`` must now say of it, a bad row: "<csv>:<line>: task <task>: "
#: and the reason (None: the data is read as it is, and every command works)
REGRESSIONS: dict[str, tuple[Mutation, tuple[str, str] | None]] = {
    # os.stat refused the path with ValueError('embedded null byte'), caught nowhere
    "nul-byte-in-image-path": (
        Mutation("cell", "train", REG, (0, 0, "../a\x00b.png")),
        (f"{REG}:2: task FUGC: image path ", "holds a NUL byte, which no file name can"),
    ),
    "nul-byte-in-mask-path": (
        Mutation("cell", "val", SEG, (2, 4, "../m\x00.png")),
        (f"{SEG}:4: task cervix_multi: mask path ", "holds a NUL byte, which no file name can"),
    ),
    # os.stat raised OSError ENAMETOOLONG, caught nowhere
    "image-name-over-255-bytes": (
        Mutation("cell", "train", CLS, (1, 0, "../" + "a" * 300 + ".png")),
        (f"{CLS}:3: task breast_3cls: image ", "cannot be read: File name too long"),
    ),
    "mask-name-over-255-bytes": (
        Mutation("cell", "train", SEG, (1, 4, "../" + "m" * 300 + ".png")),
        (f"{SEG}:3: task cervix_multi: mask ", "cannot be read: File name too long"),
    ),
    # int() of more than 4300 digits raised ValueError (Python's int_max_str_digits)
    "label-over-4300-digits": (
        Mutation("cell", "train", CLS, (0, 4, "9" * 5000)),
        (
            f"{CLS}:2: task breast_3cls: class label (column 'mask') ",
            "is out of range (an integer of 5000 digits)",
        ),
    ),
    "num-classes-over-4300-digits": (
        Mutation("cell", "train", DET, (3, 3, "1" * 5000)),
        (f"{DET}:5: task thyroid_nodule_det: num_classes ", "is out of range (an integer of 5000 digits)"),
    ),
    # a name with a surrogate escape raised UnicodeEncodeError in pandas' (pyarrow) string
    # column: the file is read, and named by its bytes (caf\xe9.csv)
    "csv-name-not-utf-8": (Mutation("rename_csv", "train", CLS, (b"caf\xe9.csv",)), None),
    # pandas took the first column as the index: every row was an "unknown task_id"
    "long-first-row": (
        Mutation("long_row", "train", SEG, (0, ["x"])),
        (f"{SEG}:2: task cervix_multi: ", "6 fields, header has 5"),
    ),
}


def test_rows_of_another_width_are_bad_rows(bench):
    """A row of more or fewer cells than the header: a bad row saying so, wherever it is."""
    seg = next(t for t in bench.tables if t.split == "train" and t.name == SEG)
    width = len(seg.header)
    for mutation, line, fields in (  # (the first row: see REGRESSIONS)
        (Mutation("long_row", "train", SEG, (3, ["x", "y"])), 5, width + 2),
        (Mutation("short_row", "train", SEG, (1, 2)), 3, width - 2),
    ):
        code, out = check_contract(bench, mutation)["tasks"]
        assert code == 2, out
        assert f"{SEG}:{line}: task cervix_multi: {fields} fields, header has {width}" in out, out
        assert "1 bad row(s)" in out, out  # the other rows are read as they are


@settings(
    max_examples=EXAMPLES or 30,
    derandomize=not EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(data=st.data())
def test_mutated_benchmark_fails_cleanly_or_works(bench, data):
    m = data.draw(mutations(bench), label="mutation")
    event(m.family)
    check_contract(bench, m)


#: one case of every family, run every time (the property draws only some of them)
CASES = {
    "label-of-400-digits": Mutation("cell", "train", CLS, (0, 4, "1" + "0" * 400)),
    "box-of-5000-digits": Mutation("cell", "train", DET, (3, 6, "9" * 5000)),
    "point-of-5000-digits": Mutation("cell", "train", REG, (2, 5, "[" + "9" * 5000 + ", 2]")),
    "deep-point": Mutation("cell", "val", REG, (2, 4, "[" * 3000)),
    "unicode-digit-label": Mutation("cell", "train", CLS, (0, 4, "\u0663")),
    "inf-label": Mutation("cell", "train", CLS, (1, 4, "inf")),
    "image-path-outside": Mutation("cell", "train", DET, (0, 0, "../../x.png")),
    "image-path-is-the-csv": Mutation("cell", "train", CLS, (0, 0, "../csv_files/" + CLS)),
    "image-path-is-a-folder": Mutation("cell", "train", CLS, (0, 0, "../Regression")),
    "newline-in-a-cell": Mutation("cell", "train", DET, (1, 2, "detec\ntion")),
    "duplicate-row": Mutation("duplicate_row", "train", DET, (4, 0)),
    "short-row": Mutation("short_row", "train", REG, (3, 2)),
    "long-row": Mutation("long_row", "val", REG, (3, ["[1, 2]"])),
    "blank-row": Mutation("blank_row", "train", CLS, (0, 1)),
    "delete-row": Mutation("delete_row", "val", SEG, (0,)),
    "drop-column": Mutation("drop_column", "val", REG, (5,)),
    "add-point-column": Mutation("add_column", "train", REG, (6, "point_01_xy", "[1, 2]")),
    "add-line-column": Mutation("add_column", "train", CLS, (0, "_line", "7")),
    "rename-task-id": Mutation("rename_column", "train", DET, (1, "task")),
    "truncate-csv": Mutation("truncate_csv", "train", SEG, (0.5,)),
    "empty-csv": Mutation("empty_csv", "train", CLS, ()),
    "garbage-csv": Mutation("garbage_csv", "train", CLS, (b"\x00\xff\xfe,\n\x01",)),
    "utf-16-csv": Mutation("encoding_csv", "train", REG, (0, 0, "utf-16", "\n")),
    "latin-1-csv": Mutation("encoding_csv", "train", REG, (0, 4, "latin-1", "\r\n")),
    "delete-csv": Mutation("delete_csv", "train", SEG, ()),
    "copy-csv": Mutation("copy_csv", "train", CLS, ("a b (1).csv",)),
    "rename-csv": Mutation("rename_csv", "val", REG, ("caf\u00e9 (2).csv".encode(),)),
    "truncated-image": Mutation("truncate_file", "train", FUGC_IMAGE, (0.6,)),
    "garbage-image": Mutation("garbage_file", "val", DET_IMAGE, (b"BM" + bytes(40),)),
    "empty-mask": Mutation("empty_file", "train", MASK, ()),
    "resized-image": Mutation("resize", "train", DET_IMAGE, (20, 12)),
    "16-bit-image": Mutation("mode", "train", FUGC_IMAGE, ("I;16",)),
    "1-bit-image": Mutation("mode", "val", DET_IMAGE, ("1",)),
    "la-mask": Mutation("mode", "train", MASK, ("LA",)),
    "deleted-image": Mutation("delete_file", "val", FUGC_IMAGE, ()),
    "image-is-a-folder": Mutation("directory", "train", DET_IMAGE, ()),
    "mask-value-3": Mutation("mask_value", "train", MASK, (3, 2)),
    "mask-value-300": Mutation("mask_value", "val", MASK, (300, 2)),
    "mask-channels": Mutation("mask_channels", "train", MASK, ()),
    "image-replaced-by-another": Mutation("replace_file", "train", DET_IMAGE, (FUGC_IMAGE,)),
}


@pytest.mark.parametrize("mutation", list(CASES.values()), ids=list(CASES))
def test_each_family(bench, mutation):
    check_contract(bench, mutation)


@pytest.mark.parametrize(("mutation", "message"), list(REGRESSIONS.values()), ids=list(REGRESSIONS))
def test_regressions(bench, mutation, message):
    outputs = check_contract(bench, mutation)
    code, out = outputs["tasks"]
    if message is None:
        assert all(c == 0 for c, _ in outputs.values()), outputs
        assert outputs["tasks"] == run_cli(["tasks", "--data", bench.pristine])  # every row counted
    else:
        assert code == 2, out
        where, reason = message
        assert where in out and reason in out, out
        assert out.index(reason) > out.index(where), out  # the reason of that row
