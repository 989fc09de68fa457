"""``taskgroup predict`` (issue 28): a trained run's submission folder, scored by ``taskgroup
evaluate``, gives the scores the training recorded for every served task, on val and on test."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from fixtures import make_held_out_root
from PIL import Image
from test_training import tiny_config

from taskgroup.cli import main
from taskgroup.data import load_index
from taskgroup.data.submission import mask_prediction_path, read_predictions
from taskgroup.evaluation import METRIC_COLUMNS, evaluate_predictions
from taskgroup.groupings import Grouping
from taskgroup.stages.predict import predict_run
from taskgroup.stages.train import train_grouping

#: two networks, one task of each kind each side: every head and checkpoint path is exercised
GROUPS = {"a": ("breast_lesion", "lung_2cls"), "b": ("thyroid_nodule_det", "IUGC", "breast_3cls")}
TASKS = [t for ids in GROUPS.values() for t in ids]


@pytest.fixture(scope="module")
def trained(tiny_synth, registry, tmp_path_factory):
    base = tmp_path_factory.mktemp("predict")
    root = make_held_out_root(tiny_synth, base / "root", flip="lung_2cls")
    cfg = tiny_config(root, steps=12, eval_every=4, checkpoint_every=4)
    result = train_grouping(cfg, Grouping("two", GROUPS), base / "run", registry)
    return root, base / "run", result


def _scores(root, split: str, out, registry) -> dict[str, dict[str, float]]:
    index = load_index(root / split, registry, tasks=TASKS)
    return evaluate_predictions(index, read_predictions(out, index)).metric_values()


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluate_on_the_predictions_equals_the_recorded_scores(trained, registry, tmp_path, split):
    root, run, result = trained
    out = tmp_path / "submission"
    predicted = predict_run(run, out, split=split, registry=registry)
    assert predicted.counts == {
        t: len(load_index(root / split, registry, tasks=[t]).records[t]) for t in TASKS
    }
    scores = _scores(root, split, out, registry)
    served = result.served.set_index("task")
    prefix = "val_" if split == "val" else "test_"
    for task in TASKS:
        recorded = {c[len(prefix) :]: v for c, v in served.loc[task].items() if c.startswith(prefix)}
        recorded = {k: v for k, v in recorded.items() if k in METRIC_COLUMNS and not math.isnan(v)}
        assert recorded, task
        for metric, value in recorded.items():
            assert scores[task][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, metric)
    if split == "test":  # the flipped task scores 1 - its val accuracy: test labels were read
        assert scores["lung_2cls"]["accuracy"] == pytest.approx(1 - served.loc["lung_2cls", "val_accuracy"])


def test_masks_are_written_at_their_original_size_under_the_ground_truths_paths(trained, registry, tmp_path):
    root, run, _ = trained
    out = predict_run(run, tmp_path / "sub", registry=registry).out
    index = load_index(root / "val", registry, tasks=["breast_lesion"])
    for record in index.records["breast_lesion"]:
        mask = np.asarray(Image.open(mask_prediction_path(out, record.mask_path)))
        assert mask.shape == record.size and mask.max() < registry["breast_lesion"].num_classes
    json_files = sorted(p.name for p in out.glob("*.json"))
    assert json_files == [
        "classification_predictions.json",
        "detection_predictions.json",
        "regression_predictions.json",
    ]
    cls = pd.read_json(out / "classification_predictions.json")
    assert set(cls.task_id) == {"lung_2cls", "breast_3cls"}
    assert np.allclose([sum(p) for p in cls.predicted_probs], 1.0, atol=1e-5)


def test_predict_never_writes_over_a_folder_and_names_what_is_missing(trained, tmp_path, capsys):
    _, run, _ = trained
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("kept")
    assert main(["predict", str(run), "--out", str(taken)]) == 2
    assert (taken / "mine.txt").read_text() == "kept" and len(list(taken.iterdir())) == 1
    assert "exists and is not an empty folder" in capsys.readouterr().out
    assert main(["predict", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a finished `taskgroup train` folder" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()
