"""The FM_UIA reader: awkward real-style paths load; every bad input names file, row and task."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fixtures import CLS_DIR, NBSP, SEG_DIR, edit_csv
from PIL import Image

from taskgroup.data.fmuia import find_roots, load_index, read_csvs, resolve_path
from taskgroup.errors import DataError


def test_awkward_paths_load(fixture_root, registry):
    index = load_index(fixture_root, registry)
    assert index.counts() == {"FUGC": 1, "breast_3cls": 2, "thyroid_nodule_det": 1, "cervix_multi": 2}
    seg = index["cervix_multi"][1]
    assert seg.image_path == f"../{SEG_DIR}/images/img{NBSP}2, b.jpg"  # the CSV string, verbatim
    assert seg.image_file.is_file() and seg.mask_file.is_file()
    assert seg.size == (30, 40)
    assert seg.source == "Seg-Three_2.Cervix_1.csv" and seg.line == 2
    assert index["breast_3cls"][1].label == 2
    assert index["thyroid_nodule_det"][0].box == (4.5, 3.0, 20.0, 25.5)
    assert index["FUGC"][0].keypoints == ((10.5, 12.0), (30.0, 20.25))


def test_paths_resolve_relative_to_csv_files(tmp_path):
    assert resolve_path(tmp_path, "../A/b (1).png") == tmp_path / "A" / "b (1).png"


def test_csvs_are_concatenated_with_their_lines(fixture_root):
    frame = read_csvs(fixture_root)
    assert len(frame) == 6
    assert set(frame["_source"]) == {
        "Seg-Three_1.Cervix_1.csv",
        "Seg-Three_2.Cervix_1.csv",
        "Cls-Three_1.BUSI_2.csv",
        "Det-One_1.Thyroid_1.csv",
        "Reg_1.FUGC_1.csv",
    }


def test_find_roots(tmp_path, fixture_root):
    assert find_roots(fixture_root) == {"train": fixture_root}
    with pytest.raises(DataError, match="no csv_files"):
        find_roots(tmp_path / "nowhere")


def _expect_error(root, registry, csv_name: str, line: int, task: str, reason: str) -> None:
    with pytest.raises(DataError) as info:
        load_index(root, registry)
    message = str(info.value)
    assert f"{csv_name}:{line}: task {task}: " in message, message
    assert reason in message, message


def test_missing_image(fixture_root, registry):
    (fixture_root / CLS_DIR / "normal+2.bmp").unlink()
    _expect_error(fixture_root, registry, "Cls-Three_1.BUSI_2.csv", 3, "breast_3cls", "image file not found")


def test_unreadable_image(fixture_root, registry):
    (fixture_root / CLS_DIR / "benign (1).jpeg").write_bytes(b"not an image")
    _expect_error(fixture_root, registry, "Cls-Three_1.BUSI_2.csv", 2, "breast_3cls", "is unreadable")


def test_mask_of_another_size(fixture_root, registry):
    Image.fromarray(np.zeros((31, 40), dtype=np.uint8)).save(
        fixture_root / SEG_DIR / "masks" / "img 1 (copy)+x.png"
    )
    _expect_error(
        fixture_root,
        registry,
        "Seg-Three_1.Cervix_1.csv",
        2,
        "cervix_multi",
        "is 40x31 (WxH) but its image is 40x30",
    )


def test_mask_value_above_classes(fixture_root, registry):
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[0, 0] = 3
    Image.fromarray(mask).save(fixture_root / SEG_DIR / "masks" / "img 1 (copy)+x.png")
    _expect_error(
        fixture_root, registry, "Seg-Three_1.Cervix_1.csv", 2, "cervix_multi", "has value 3 >= num_classes 3"
    )


def test_inverted_box(fixture_root, registry):
    edit_csv(fixture_root, "Det-One_1.Thyroid_1.csv", 0, x_min="25")
    _expect_error(
        fixture_root, registry, "Det-One_1.Thyroid_1.csv", 2, "thyroid_nodule_det", "inverted or empty box"
    )


def test_box_outside_the_image(fixture_root, registry):
    edit_csv(fixture_root, "Det-One_1.Thyroid_1.csv", 0, y_max="30.5")
    _expect_error(
        fixture_root,
        registry,
        "Det-One_1.Thyroid_1.csv",
        2,
        "thyroid_nodule_det",
        "outside the 40x30 (WxH) image",
    )


def test_wrong_number_of_keypoints(fixture_root, registry):
    edit_csv(fixture_root, "Reg_1.FUGC_1.csv", 0, point_3_xy="[1, 2]")
    _expect_error(
        fixture_root,
        registry,
        "Reg_1.FUGC_1.csv",
        2,
        "FUGC",
        "3 keypoint column(s) [1, 2, 3] but the task has 2",
    )
    edit_csv(fixture_root, "Reg_1.FUGC_1.csv", 0, point_3_xy="", point_2_xy="")
    _expect_error(
        fixture_root, registry, "Reg_1.FUGC_1.csv", 2, "FUGC", "1 keypoint column(s) [1] but the task has 2"
    )


@pytest.mark.parametrize("bad", ["[10.5; 12]", "[10.5]", "(1, 2)", "[1, NaN]", '["a", 2]'])
def test_malformed_point(fixture_root, registry, bad):
    edit_csv(fixture_root, "Reg_1.FUGC_1.csv", 0, point_1_xy=bad)
    _expect_error(fixture_root, registry, "Reg_1.FUGC_1.csv", 2, "FUGC", "point_1_xy is")


def test_unknown_task_id(fixture_root, registry):
    edit_csv(fixture_root, "Cls-Three_1.BUSI_2.csv", 1, task_id="breast_4cls")
    _expect_error(
        fixture_root,
        registry,
        "Cls-Three_1.BUSI_2.csv",
        3,
        "breast_4cls",
        "unknown task_id 'breast_4cls'; did you mean",
    )


def test_num_classes_disagreeing_with_registry(fixture_root, registry):
    edit_csv(fixture_root, "Cls-Three_1.BUSI_2.csv", 0, num_classes="2")
    _expect_error(
        fixture_root,
        registry,
        "Cls-Three_1.BUSI_2.csv",
        2,
        "breast_3cls",
        "num_classes 2 disagrees with the registry (3)",
    )


def test_task_name_disagreeing_and_label_out_of_range(fixture_root, registry):
    edit_csv(fixture_root, "Reg_1.FUGC_1.csv", 0, task_name="regression")
    _expect_error(fixture_root, registry, "Reg_1.FUGC_1.csv", 2, "FUGC", "task_name 'regression' disagrees")
    edit_csv(fixture_root, "Reg_1.FUGC_1.csv", 0, task_name="Regression")
    edit_csv(fixture_root, "Cls-Three_1.BUSI_2.csv", 0, mask="3")
    _expect_error(
        fixture_root, registry, "Cls-Three_1.BUSI_2.csv", 2, "breast_3cls", "class label 3 is outside 0..2"
    )


def test_skip_bad_logs_every_bad_row_and_keeps_the_rest(fixture_root, registry, tmp_path):
    edit_csv(fixture_root, "Det-One_1.Thyroid_1.csv", 0, x_min="25")
    edit_csv(fixture_root, "Cls-Three_1.BUSI_2.csv", 1, task_id="nope")
    report = tmp_path / "bad.csv"
    index = load_index(fixture_root, registry, skip_bad=True, report=report)
    assert index.counts() == {"FUGC": 1, "breast_3cls": 1, "cervix_multi": 2}
    rows = pd.read_csv(report)
    assert list(rows.columns) == ["source", "line", "task_id", "reason"]
    assert len(rows) == 2
    det = rows[rows.task_id == "thyroid_nodule_det"].iloc[0]
    assert (det.source, det.line) == ("Det-One_1.Thyroid_1.csv", 2)
    assert det.reason.startswith("inverted or empty box")
    assert {b.task_id for b in index.bad_rows} == {"thyroid_nodule_det", "nope"}


def test_error_lists_every_bad_row(fixture_root, registry):
    edit_csv(fixture_root, "Det-One_1.Thyroid_1.csv", 0, x_min="25")
    edit_csv(fixture_root, "Reg_1.FUGC_1.csv", 0, point_1_xy="[1,")
    with pytest.raises(DataError, match=r"2 bad row\(s\)") as info:
        load_index(fixture_root, registry)
    assert "thyroid_nodule_det" in str(info.value) and "FUGC" in str(info.value)
    assert "--skip-bad" in str(info.value)
