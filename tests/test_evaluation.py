"""Prediction writers/readers and ``taskgroup evaluate``: ground truth fed back scores perfectly,
missing predictions count as failures unless skipped."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from fixtures import SEG_DIR

from taskgroup.cli import main
from taskgroup.data import (
    find_roots,
    ground_truth_as_predictions,
    load_index,
    read_predictions,
    write_predictions,
)
from taskgroup.data.submission import mask_prediction_path
from taskgroup.evaluation import evaluate_predictions

PERFECT = {
    "seg_dsc": 1.0,
    "seg_hd": 0.0,
    "cls_accuracy": 1.0,
    "cls_auc": 1.0,
    "cls_f1_macro": 1.0,
    "cls_f1_weighted": 1.0,
    "cls_mcc": 1.0,
    "det_iou": 1.0,
    "reg_mre": 0.0,
}


@pytest.fixture(scope="module")
def synth_val(tiny_synth, registry):
    return load_index(find_roots(tiny_synth)["val"], registry)


def test_ground_truth_as_predictions_scores_perfectly(synth_val, tmp_path):
    write_predictions(tmp_path / "pred", ground_truth_as_predictions(synth_val))
    result = evaluate_predictions(synth_val, read_predictions(tmp_path / "pred", synth_val))
    assert result.summary == pytest.approx(PERFECT)
    assert (result.per_task["n_missing"] == 0).all() and len(result.per_task) == 27


def test_submission_format(fixture_root, registry, tmp_path):
    index = load_index(fixture_root, registry)
    write_predictions(tmp_path, ground_truth_as_predictions(index))
    # masks go to <out>/<mask_path with every ../ removed>
    assert (tmp_path / SEG_DIR / "masks" / "img 1 (copy)+x.png").is_file()
    reg = json.loads((tmp_path / "regression_predictions.json").read_text())
    assert reg == [
        {
            "image_path": index["FUGC"][0].image_path,
            "task_id": "FUGC",
            "predicted_points_normalized": [10.5 / 40, 12 / 30, 30 / 40, 20.25 / 30],
            "predicted_points_pixels": [10.5, 12.0, 30.0, 20.25],
        }
    ]
    det = json.loads((tmp_path / "detection_predictions.json").read_text())[0]
    assert det["bbox_pixels"] == [4.5, 3.0, 20.0, 25.5] and det["image_path"].startswith("../")
    cls = json.loads((tmp_path / "classification_predictions.json").read_text())
    assert [c["predicted_class"] for c in cls] == [0, 2] and cls[1]["predicted_probs"] == [0, 0, 1]


def test_missing_class_in_fixture_flags_auc(fixture_root, registry, tmp_path):
    index = load_index(fixture_root, registry)
    write_predictions(tmp_path, ground_truth_as_predictions(index))
    result = evaluate_predictions(index, read_predictions(tmp_path, index))
    row = result.per_task.set_index("task_id").loc["breast_3cls"]
    assert row["accuracy"] == 1.0 and row["auc"] == 0.0  # labels 0 and 2 only: class 1 absent
    assert "class(es) [1] absent" in row["auc_note"]


def test_missing_predictions_are_failures_unless_skipped(fixture_root, registry, tmp_path):
    index = load_index(fixture_root, registry)
    write_predictions(tmp_path, ground_truth_as_predictions(index))
    mask_prediction_path(tmp_path, index["cervix_multi"][0].mask_path).unlink()
    (tmp_path / "regression_predictions.json").write_text("[]")
    predictions = read_predictions(tmp_path, index)
    failed = evaluate_predictions(index, predictions).per_task.set_index("task_id")
    assert failed.loc["cervix_multi", "n_missing"] == 1
    # the other image of cervix_multi has an empty mask predicted empty: DSC 1 on both classes
    assert failed.loc["cervix_multi", "dsc"] == pytest.approx(0.5)
    assert failed.loc["FUGC", "mre"] == pytest.approx(50.0)  # the diagonal of a 40x30 image
    skipped = evaluate_predictions(index, predictions, official_skip=True).per_task.set_index("task_id")
    assert skipped.loc["cervix_multi", "dsc"] == 1.0
    assert pd.isna(skipped.loc["FUGC", "mre"]) and skipped.loc["FUGC", "n_missing"] == 1


def test_malformed_prediction_names_file_and_task(fixture_root, registry, tmp_path):
    index = load_index(fixture_root, registry)
    write_predictions(tmp_path, ground_truth_as_predictions(index))
    path = tmp_path / "classification_predictions.json"
    items = json.loads(path.read_text())
    items[1]["predicted_probs"] = [0.5, 0.5]
    path.write_text(json.dumps(items))
    with pytest.raises(
        Exception,
        match=r"classification_predictions.json entry 1: task breast_3cls: malformed prediction: 2 probabilities for 3 classes",
    ):
        read_predictions(tmp_path, index)


def test_cli_evaluate_writes_tables(tiny_synth, synth_val, tmp_path, capsys):
    write_predictions(tmp_path / "pred", ground_truth_as_predictions(synth_val))
    code = main(
        [
            "evaluate",
            "--gt",
            str(tiny_synth / "val"),
            "--pred",
            str(tmp_path / "pred"),
            "--out",
            str(tmp_path / "scores"),
        ]
    )
    assert code == 0
    per_task = pd.read_csv(tmp_path / "scores" / "per_task.csv")
    assert len(per_task) == 27 and per_task["dsc"].dropna().eq(1.0).all()
    summary = pd.read_csv(tmp_path / "scores" / "summary.csv").iloc[0].to_dict()
    assert summary == pytest.approx(PERFECT)
    assert "type-level summary" in capsys.readouterr().out


def test_cli_reports_bad_data_with_exit_code_2(fixture_root, tmp_path, capsys):
    (fixture_root / "csv_files" / "Reg_1.FUGC_1.csv").write_text(
        'image_path,task_id,task_name,num_classes,point_1_xy,point_2_xy\n../x.png,FUGC,Regression,2,"[1, 2]","[3, 4]"\n'
    )
    code = main(["evaluate", "--gt", str(fixture_root), "--pred", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 2
    assert "Reg_1.FUGC_1.csv:2: task FUGC: image file not found" in out.replace("\n", "")


def test_against_baseline_signs_the_gain_by_direction(registry):
    from taskgroup.evaluation import against_baseline

    baselines = {"lung": {"dsc": 0.2, "hd": 9.0}, "IUGC": {"mre": 40.0}}
    table = against_baseline({"lung": 0.5, "IUGC": 30.0}, baselines, registry).set_index("task")
    assert table.loc["lung", "gain"] == pytest.approx(0.3)  # absolute for a score
    assert table.loc["IUGC", "gain"] == pytest.approx(0.25)  # relative reduction of an error
    assert list(table["metric"]) == ["dsc", "mre"]
