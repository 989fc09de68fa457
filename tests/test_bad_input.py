"""Bad input that used to pass validation or end in a traceback (issue 25): each is now a
DataError naming file, line and task, or with ``skip_bad`` a row of the bad-row report."""

from __future__ import annotations

import csv
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from fixtures import CLS_DIR, DET_DIR, REG_DIR, SEG_DIR, edit_csv, make_fixture_root

from taskgroup.config import DataConfig, load_run_config, to_mapping
from taskgroup.data.fmuia import load_index
from taskgroup.errors import ConfigError, DataError
from taskgroup.training.data import prepare_data

CLS_CSV = "Cls-Three_1.BUSI_2.csv"
REG_CSV = "Reg_1.FUGC_1.csv"
DET_CSV = "Det-One_1.Thyroid_1.csv"


def _error(root, registry, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_index(root, registry, **kwargs)
    return str(info.value)


def _expect(root, registry, where: str, task: str, reason: str, **kwargs) -> None:
    message = _error(root, registry, **kwargs)
    assert f"{where}: task {task}: " in message, message
    assert reason in message, message


def _dataset(tmp_path: Path, *splits: str) -> Path:
    """A dataset folder holding a fixture root per split (``train/``, ``val/``...)."""
    for split in splits:
        make_fixture_root(tmp_path / "data" / split)
    return tmp_path / "data"


# 1. an image that does not decode in full


@pytest.mark.parametrize(
    ("folder", "name", "where", "task"),
    [
        (DET_DIR, "n, 1.png", f"{DET_CSV}:2", "thyroid_nodule_det"),
        (SEG_DIR, "images/img 1 (copy)+x.png", "Seg-Three_1.Cervix_1.csv:2", "cervix_multi"),
        (CLS_DIR, "benign (1).jpeg", f"{CLS_CSV}:2", "breast_3cls"),
        (CLS_DIR, "normal+2.bmp", f"{CLS_CSV}:3", "breast_3cls"),
    ],
)
def test_truncated_image_is_a_bad_row(fixture_root, registry, folder, name, where, task):
    path = fixture_root / folder / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header survives: Image.open alone succeeds
    _expect(fixture_root, registry, where, task, "is unreadable: image file is truncated")


def test_image_broken_after_a_first_load(fixture_root, registry):
    """Decoding is remembered per file within a process, but a rewritten file is decoded again."""
    load_index(fixture_root, registry)
    path = fixture_root / DET_DIR / "n, 1.png"
    path.write_bytes(path.read_bytes()[:-40])
    _expect(fixture_root, registry, f"{DET_CSV}:2", "thyroid_nodule_det", "is unreadable")


# 2. unknown task ids: the same rule with or without a selection of tasks


def test_unknown_task_is_bad_when_other_tasks_are_selected(fixture_root, registry):
    edit_csv(fixture_root, CLS_CSV, 1, task_id="breast_4cls")
    _expect(
        fixture_root, registry, f"{CLS_CSV}:3", "breast_4cls", "unknown task_id 'breast_4cls'", tasks=["FUGC"]
    )
    index = load_index(fixture_root, registry, tasks=["FUGC"], skip_bad=True)
    assert index.counts() == {"FUGC": 1}
    assert [(b.source, b.line, b.task_id) for b in index.bad_rows] == [(CLS_CSV, 3, "breast_4cls")]


def test_rows_of_known_unselected_tasks_are_not_read(fixture_root, registry):
    edit_csv(fixture_root, DET_CSV, 0, x_min="25")  # a bad detection row
    assert load_index(fixture_root, registry, tasks=["FUGC"]).counts() == {"FUGC": 1}


def test_training_does_not_drop_unknown_tasks(tmp_path, registry):
    data = _dataset(tmp_path, "train", "val")
    edit_csv(data / "train", CLS_CSV, 1, task_id="breast_4cls")
    cfg = DataConfig(root=str(data), preload=False, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=f"{CLS_CSV}:3: task breast_4cls: unknown task_id"):
        prepare_data(cfg, registry, ["breast_3cls", "FUGC"])


# 3. input that ended in a raw traceback


def test_empty_csv_file(fixture_root, registry):
    (fixture_root / "csv_files" / "Empty_1.csv").write_bytes(b"")
    message = _error(fixture_root, registry)
    assert "Empty_1.csv:1: empty file, no header line" in message, message


@pytest.mark.parametrize("column", ["mask", "num_classes"])
@pytest.mark.parametrize("value", ["inf", "-inf", "1e400", "nan"])
def test_infinite_or_missing_number(fixture_root, registry, column, value):
    edit_csv(fixture_root, CLS_CSV, 0, **{column: value})
    _expect(fixture_root, registry, f"{CLS_CSV}:2", "breast_3cls", f"{value!r} is not an integer")


def test_unexpected_keypoint_column(fixture_root, registry):
    edit_csv(fixture_root, REG_CSV, 0, point_x_xy="[1, 2]")
    _expect(
        fixture_root,
        registry,
        f"{REG_CSV}:2",
        "FUGC",
        "unexpected keypoint column 'point_x_xy' (keypoint columns are point_1_xy..point_2_xy)",
    )


def test_huge_keypoint_number(fixture_root, registry):
    edit_csv(fixture_root, REG_CSV, 0, point_1_xy="[1" + "0" * 400 + ", 2]")
    _expect(fixture_root, registry, f"{REG_CSV}:2", "FUGC", "point_1_xy is")


# 4. values that were read as something else, duplicates


def test_fractional_label_is_not_rounded(fixture_root, registry):
    edit_csv(fixture_root, CLS_CSV, 1, mask="1.7")
    _expect(fixture_root, registry, f"{CLS_CSV}:3", "breast_3cls", "'1.7' is not an integer")


def test_integral_float_label_is_an_integer(fixture_root, registry):
    # pandas writes an integer column that holds a gap as floats ("2.0")
    edit_csv(fixture_root, CLS_CSV, 1, mask="2.0", num_classes="3.0")
    assert load_index(fixture_root, registry)["breast_3cls"][1].label == 2


def test_keypoint_far_outside_the_image(fixture_root, registry):
    edit_csv(fixture_root, REG_CSV, 0, point_2_xy="[400, 20]")  # the image is 40x30
    _expect(
        fixture_root,
        registry,
        f"{REG_CSV}:2",
        "FUGC",
        "point_2_xy '[400, 20]' lies outside the 40x30 (WxH) image by more than 5% of its size",
    )
    edit_csv(fixture_root, REG_CSV, 0, point_2_xy="[20, -1.6]")  # 1.6 px above: more than 5% of 30
    _expect(fixture_root, registry, f"{REG_CSV}:2", "FUGC", "lies outside the 40x30")


def test_keypoint_just_past_the_border_is_kept(fixture_root, registry):
    edit_csv(fixture_root, REG_CSV, 0, point_1_xy="[-1.5, 0]", point_2_xy="[42, 31.5]")
    assert load_index(fixture_root, registry)["FUGC"][0].keypoints == ((-1.5, 0.0), (42.0, 31.5))


def _repeat_row(root: Path, name: str, row: int, **changes) -> None:
    """Append a copy of a data row (0-based) of a fixture CSV to it, with some cells changed."""
    path = root / "csv_files" / name
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    repeat = frame.iloc[[row]].copy()
    for col, value in changes.items():
        repeat[col] = value
    pd.concat([frame, repeat]).to_csv(path, index=False)


def test_identical_repeat_is_left_out_with_a_warning(fixture_root, registry, tmp_path, caplog):
    """Organiser data repeats rows: the same task, image and target is kept once, not an error."""
    _repeat_row(fixture_root, CLS_CSV, 0)  # line 4 repeats line 2
    report = tmp_path / "bad.csv"
    with caplog.at_level(logging.WARNING, logger="taskgroup"):
        index = load_index(fixture_root, registry, report=report)  # no skip_bad: not an error
    assert [r.line for r in index["breast_3cls"]] == [2, 3]  # the first is kept
    assert index.bad_rows == ()
    assert [(b.source, b.line, b.task_id) for b in index.repeats] == [(CLS_CSV, 4, "breast_3cls")]
    assert "1 identical repeated row(s) left out" in caplog.text
    rows = pd.read_csv(report)
    assert rows[["source", "line"]].values.tolist() == [[CLS_CSV, 4]]
    assert rows.reason[0].startswith(f"identical repeat of {CLS_CSV}:2")


def test_repeat_with_another_target_is_a_bad_row(fixture_root, registry, tmp_path):
    _repeat_row(fixture_root, CLS_CSV, 0, mask="1")  # line 4: the image of line 2, another label
    _expect(
        fixture_root, registry, f"{CLS_CSV}:4", "breast_3cls", f"repeats {CLS_CSV}:2 (the same task and image"
    )
    _expect(fixture_root, registry, f"{CLS_CSV}:4", "breast_3cls", "another class label: 1 here, 0 there")
    report = tmp_path / "bad.csv"
    index = load_index(fixture_root, registry, skip_bad=True, report=report)
    assert [r.line for r in index["breast_3cls"]] == [2, 3]
    assert pd.read_csv(report)[["source", "line"]].values.tolist() == [[CLS_CSV, 4]]


def test_repeated_box_and_keypoints(fixture_root, registry):
    _repeat_row(fixture_root, DET_CSV, 0, x_min="4.50")  # the same number written otherwise
    _repeat_row(fixture_root, REG_CSV, 0, point_2_xy="[30, 21]")
    message = _error(fixture_root, registry)
    assert "1 bad row(s)" in message and f"{REG_CSV}:3: task FUGC: repeats {REG_CSV}:2" in message, message
    assert "another keypoints" in message
    index = load_index(fixture_root, registry, skip_bad=True)
    assert [(b.source, b.line) for b in index.repeats] == [(DET_CSV, 3)]


def test_identical_repeat_across_csv_files(fixture_root, registry):
    """A task spans several CSV files; a row repeated in another of them is left out too."""
    seg1 = "Seg-Three_1.Cervix_1.csv"
    first = pd.read_csv(fixture_root / "csv_files" / seg1, dtype=str, keep_default_na=False).iloc[0]
    _repeat_row(fixture_root, "Seg-Three_2.Cervix_1.csv", 0, **first.to_dict())
    index = load_index(fixture_root, registry)
    assert [r.where for r in index["cervix_multi"]] == [f"{seg1}:2", "Seg-Three_2.Cervix_1.csv:2"]
    assert [(b.source, b.line) for b in index.repeats] == [("Seg-Three_2.Cervix_1.csv", 3)]


def test_repeat_across_csv_files_with_another_mask(fixture_root, registry):
    edit_csv(
        fixture_root, "Seg-Three_2.Cervix_1.csv", 0, image_path=f"../{SEG_DIR}/images/img 1 (copy)+x.png"
    )
    _expect(
        fixture_root,
        registry,
        "Seg-Three_2.Cervix_1.csv:2",
        "cervix_multi",
        "repeats Seg-Three_1.Cervix_1.csv:2 (the same task and image",
    )
    message = _error(fixture_root, registry)
    assert "with another mask: " in message and "b.png' here" in message, message


# 5. paths that leave the data root


def test_path_climbing_past_the_root(fixture_root, registry, tmp_path):
    outside = tmp_path / "outside.png"  # fixture_root is tmp_path / "root"
    outside.write_bytes((fixture_root / REG_DIR / "p (1).png").read_bytes())
    edit_csv(fixture_root, REG_CSV, 0, image_path="../../outside.png")
    _expect(fixture_root, registry, f"{REG_CSV}:2", "FUGC", f"resolves to {outside}, outside the data root")
    index = load_index(fixture_root, registry, allow_outside_root=True)
    assert index["FUGC"][0].image_file == outside


def test_absolute_path(fixture_root, registry):
    inside = fixture_root / REG_DIR / "p (1).png"
    edit_csv(fixture_root, REG_CSV, 0, image_path=str(inside))
    _expect(fixture_root, registry, f"{REG_CSV}:2", "FUGC", f"image path {str(inside)!r} is absolute")


def test_mask_path_outside_the_root(fixture_root, registry, tmp_path):
    mask = fixture_root / SEG_DIR / "masks" / "img 1 (copy)+x.png"
    (tmp_path / "mask.png").write_bytes(mask.read_bytes())
    edit_csv(fixture_root, "Seg-Three_1.Cervix_1.csv", 0, mask_path="../../mask.png")
    _expect(
        fixture_root,
        registry,
        "Seg-Three_1.Cervix_1.csv:2",
        "cervix_multi",
        "mask path '../../mask.png' resolves",
    )


def test_paths_through_a_linked_folder_stay_inside(fixture_root, registry, tmp_path):
    """The root's own ``../`` and folders that are symbolic links elsewhere (as
    ``make_held_out_root`` builds) are inside: paths are judged as written, links not followed."""
    elsewhere = tmp_path / "elsewhere"
    (fixture_root / REG_DIR).rename(elsewhere)
    os.symlink(elsewhere, fixture_root / REG_DIR)
    assert load_index(fixture_root, registry).counts()["FUGC"] == 1


# 6. one report for several splits


def test_report_gathers_every_split(tmp_path, registry):
    data = _dataset(tmp_path, "train", "val")
    edit_csv(data / "train", DET_CSV, 0, x_min="25")
    edit_csv(data / "val", CLS_CSV, 1, mask="7")
    report = tmp_path / "bad_rows.csv"
    for split in ("train", "val", "train"):  # as `taskgroup tasks` does; loading train again
        index = load_index(data / split, registry, skip_bad=True, report=report)
        assert {b.split for b in index.bad_rows} == {split}
    rows = pd.read_csv(report)
    assert list(rows.columns) == ["split", "source", "line", "task_id", "reason", "root"]
    assert rows[["split", "source", "line", "task_id"]].values.tolist() == [
        ["val", CLS_CSV, 3, "breast_3cls"],
        ["train", DET_CSV, 2, "thyroid_nodule_det"],
    ]
    assert rows.root.tolist() == [str(data / "val"), str(data / "train")]
    edit_csv(data / "train", DET_CSV, 0, x_min="4.5")  # fixed: its row leaves the report
    load_index(data / "train", registry, skip_bad=True, report=report)
    assert pd.read_csv(report).split.tolist() == ["val"]


def test_training_report_holds_every_split(tmp_path, registry):
    data = _dataset(tmp_path, "train", "val", "test")
    edit_csv(data / "train", "Seg-Three_2.Cervix_1.csv", 0, mask_path="")
    edit_csv(data / "val", CLS_CSV, 1, mask="7")
    edit_csv(data / "test", CLS_CSV, 0, mask="1.5")
    run = tmp_path / "run"
    cfg = DataConfig(root=str(data), preload=False, skip_bad=True, cache_dir=str(tmp_path / "cache"))
    prepare_data(cfg, registry, ["breast_3cls", "cervix_multi"], report_dir=run)
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["bad_rows.csv"]
    rows = pd.read_csv(run / "bad_rows.csv")
    assert rows[["split", "source", "line", "task_id"]].values.tolist() == [
        ["train", "Seg-Three_2.Cervix_1.csv", 2, "cervix_multi"],
        ["val", CLS_CSV, 3, "breast_3cls"],
        ["test", CLS_CSV, 2, "breast_3cls"],
    ]


# 7. a split of train/ that leaves a task without validation rows


def test_task_without_validation_rows(tmp_path, registry):
    data = _dataset(tmp_path, "train")  # breast_3cls: 2 rows of 2 classes -> round(0.2 x 1) = 0 each
    cfg = DataConfig(root=str(data), image_size=16, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as info:
        prepare_data(cfg, registry, ["breast_3cls", "cervix_multi"])
    message = str(info.value)
    assert "breast_3cls (2 rows, none in val)" in message, message
    assert "cervix_multi (2 rows, none in val)" in message, message
    assert "val/ split" in message and "data.val_fraction" in message


def test_split_of_train_with_enough_rows(tmp_path, registry):
    data = _dataset(tmp_path, "train")
    cfg = DataConfig(root=str(data), image_size=16, val_fraction=0.5, cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg, registry, ["cervix_multi"])
    assert prepared.train.size("cervix_multi") == 1 and prepared.val.size("cervix_multi") == 1


# line numbers


def test_blank_lines_do_not_shift_line_numbers(fixture_root, registry):
    path = fixture_root / "csv_files" / CLS_CSV
    header, first, second = path.read_text().splitlines()
    path.write_text(f"{header}\n\n{first}\n  \n{second[:-1]}5\n")  # label 5 of 3 classes
    _expect(fixture_root, registry, f"{CLS_CSV}:5", "breast_3cls", "class label 5 is outside 0..2")


# 8. the report: concurrent writers, a file that cannot be written


def test_concurrent_writers_keep_every_root(tmp_path, registry):
    """Workers loading their roots into one report at once: each root's rows are kept (the
    report is merged under a file lock and replaced atomically)."""
    roots = []
    for k in range(6):
        root = make_fixture_root(tmp_path / f"d{k}" / "train")
        edit_csv(root, CLS_CSV, 1, mask="7")
        roots.append(root)
    report = tmp_path / "bad_rows.csv"
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda r: load_index(r, registry, skip_bad=True, report=report), roots * 3))
    rows = pd.read_csv(report)
    assert sorted(rows.root) == sorted(str(r) for r in roots)
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_that_cannot_be_written(fixture_root, registry, tmp_path):
    edit_csv(fixture_root, CLS_CSV, 1, mask="7")
    blocker = tmp_path / "existing"
    blocker.write_text("a file, not a folder")
    report = blocker / "bad.csv"
    with pytest.raises(DataError, match=f"bad-row report {report}: cannot be written"):
        load_index(fixture_root, registry, skip_bad=True, report=report)
    with pytest.raises(DataError, match="cannot be written"):  # a folder where the file goes
        load_index(fixture_root, registry, skip_bad=True, report=tmp_path)


def test_report_that_cannot_be_written_from_the_cli(fixture_root, tmp_path, capsys):
    from taskgroup.cli import main

    edit_csv(fixture_root, CLS_CSV, 1, mask="7")
    (tmp_path / "existing").write_text("")
    report = tmp_path / "existing" / "bad.csv"
    assert main(["tasks", "--data", str(fixture_root), "--skip-bad", "--bad-report", str(report)]) == 2
    out = capsys.readouterr()
    assert "cannot be written" in out.out and "Traceback" not in out.out + out.err


def test_allow_outside_root_from_the_data_config(tmp_path, registry):
    """``data.allow_outside_root`` (default False) reaches validation; a config holds it as a
    boolean, and leaves it out of its plain form while it is false (hashes stay as they were)."""
    data = _dataset(tmp_path, "train", "val")
    outside = tmp_path / "outside.png"
    outside.write_bytes((data / "train" / REG_DIR / "p (1).png").read_bytes())
    edit_csv(data / "train", REG_CSV, 0, image_path="../../../outside.png")
    cfg = DataConfig(root=str(data), preload=False, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="outside the data root"):
        prepare_data(cfg, registry, ["FUGC"])
    cfg = DataConfig(
        root=str(data), preload=False, cache_dir=str(tmp_path / "cache"), allow_outside_root=True
    )
    assert prepare_data(cfg, registry, ["FUGC"]).train.records("FUGC")[0].image_file == outside
    assert "allow_outside_root" not in to_mapping(DataConfig())
    assert to_mapping(cfg)["allow_outside_root"] is True
    assert load_run_config("configs/tiny.yaml", ["data.allow_outside_root=true"]).data.allow_outside_root
    with pytest.raises(ConfigError, match=r"data\.allow_outside_root: expected true or false, got 'yes'"):
        load_run_config("configs/tiny.yaml", ["data.allow_outside_root='yes'"])


# 9. cells and files that raised outside any except (found by tests/test_fuzz_inputs.py)


@pytest.mark.parametrize("column", ["image_path", "mask_path"])
def test_nul_byte_in_a_path(fixture_root, registry, column):
    seg = "Seg-Three_1.Cervix_1.csv"
    edit_csv(fixture_root, seg, 0, **{column: "../a\x00b.png"})
    what = column.split("_")[0]
    _expect(
        fixture_root,
        registry,
        f"{seg}:2",
        "cervix_multi",
        f"{what} path '{fixture_root}/a\\x00b.png' holds a NUL byte",
    )
    index = load_index(fixture_root, registry, skip_bad=True)
    assert [(b.source, b.line) for b in index.bad_rows] == [(seg, 2)]


@pytest.mark.parametrize("column", ["image_path", "mask_path"])
def test_name_longer_than_the_file_system_takes(fixture_root, registry, column):
    seg = "Seg-Three_1.Cervix_1.csv"
    edit_csv(fixture_root, seg, 0, **{column: "../" + "a" * 300 + ".png"})
    _expect(fixture_root, registry, f"{seg}:2", "cervix_multi", "cannot be read: File name too long")


@pytest.mark.parametrize(
    ("column", "what"), [("mask", "class label (column 'mask')"), ("num_classes", "num_classes")]
)
def test_integer_of_more_digits_than_python_reads(fixture_root, registry, column, what):
    edit_csv(fixture_root, CLS_CSV, 1, **{column: "-" + "9" * 5000})
    _expect(
        fixture_root,
        registry,
        f"{CLS_CSV}:3",
        "breast_3cls",
        f"{what} '-99999999999...9999999999999' is out of range (an integer of 5000 digits)",
    )


def test_csv_name_not_utf_8(fixture_root, registry, capsys):
    """A CSV whose name is not UTF-8 (as archives made elsewhere hold) is read, and named by its
    bytes."""
    from taskgroup.cli import main

    folder = os.fsencode(fixture_root / "csv_files")
    os.rename(os.path.join(folder, CLS_CSV.encode()), os.path.join(folder, b"caf\xe9.csv"))
    assert load_index(fixture_root, registry).counts()["breast_3cls"] == 2
    edit_csv(fixture_root, os.fsdecode(b"caf\xe9.csv"), 1, mask="7")
    _expect(fixture_root, registry, "caf\\xe9.csv:3", "breast_3cls", "class label 7 is outside 0..2")
    assert main(["tasks", "--data", str(fixture_root)]) == 2
    out = capsys.readouterr().out
    assert "caf\\xe9.csv:3: task breast_3cls" in out, out


def _edit_rows(root: Path, name: str, edit) -> None:
    """Rewrite the rows (header first, as lists of cells) of a fixture CSV as ``edit`` leaves them."""
    path = root / "csv_files" / name
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    edit(rows)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_rows_of_another_number_of_cells(fixture_root, registry, tmp_path):
    """A row of more or fewer cells than the header is a bad row, wherever it is (pandas took the
    first column as the index when the first row was longer: every row was an unknown task)."""
    _edit_rows(fixture_root, CLS_CSV, lambda rows: rows[1].append("x"))
    _expect(
        fixture_root,
        registry,
        f"{CLS_CSV}:2",
        "breast_3cls",
        "6 fields, header has 5 (a cell holding a comma",
    )
    _edit_rows(fixture_root, REG_CSV, lambda rows: rows[1].pop())  # no point_2_xy
    message = _error(fixture_root, registry)
    assert "2 bad row(s)" in message, message
    assert f"{CLS_CSV}:2: task breast_3cls: 6 fields, header has 5" in message, message
    assert f"{REG_CSV}:2: task FUGC: 5 fields, header has 6\n" in message, message
    _edit_rows(fixture_root, CLS_CSV, lambda rows: (rows[1].pop(), rows[2].append("")))  # a later row
    report = tmp_path / "bad.csv"
    index = load_index(fixture_root, registry, skip_bad=True, report=report)
    assert [r.line for r in index["breast_3cls"]] == [2] and "FUGC" not in index.records
    assert pd.read_csv(report)[["source", "line"]].values.tolist() == [[CLS_CSV, 3], [REG_CSV, 2]]
