"""The held-out test split (Standley et al. 2020): networks are chosen and tasks served on
validation, and reported on test. The root used here has a ``test/`` with val's images and the
labels of one binary task flipped, so its test accuracy is 1 - its val accuracy (val and test
disagree on every choice) and every other task scores on test as on val."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures import make_held_out_root, make_val_only_root
from test_training import tiny_config

from taskgroup.cli import main
from taskgroup.compare import run_compare, served_scores
from taskgroup.compare.report import report_split, write_report
from taskgroup.config import CompareConfig, RunConfig
from taskgroup.data import TaskDataset, collate_examples, load_index
from taskgroup.data.submission import write_predictions
from taskgroup.groupings import Grouping
from taskgroup.models import build_model, decode_outputs
from taskgroup.stages.train import train_grouping
from taskgroup.tasks import TaskRegistry
from taskgroup.training import NetworkResult, serve_tasks
from taskgroup.training.jobs import NetworkJob
from taskgroup.training.run import safe_name

FLIP, REG = "lung_2cls", "IUGC"  # binary accuracy (labels flipped on test), MRE (test = val)
TASKS = [FLIP, REG]


@pytest.fixture
def held_out(tiny_synth, tmp_path) -> Path:
    return make_held_out_root(tiny_synth, tmp_path / "held_out", FLIP)


def evaluate_on_test(
    cfg: RunConfig, registry: TaskRegistry, root: Path, tasks: list[str], weights: Path, out: Path
) -> pd.DataFrame:
    """Independently of the engine: the network's weights predict ``root/test`` (images read one
    by one, not preloaded), written in the submission format and scored by ``taskgroup evaluate``."""
    model = build_model(cfg.model, [registry[t] for t in tasks])
    state = torch.load(weights, map_location="cpu", weights_only=False)
    model.load_state_dict(state.get("model", state))  # last.pt holds the whole state, best/ the model
    model.eval()
    index = load_index(root / "test", registry, tasks=tasks)
    predictions = []
    with torch.no_grad():
        for task in tasks:
            records = index.records[task]
            dataset = TaskDataset(registry[task], records, cfg.data.image_size)
            for start in range(0, len(dataset), cfg.data.batch_size):
                batch = collate_examples(
                    [dataset[i] for i in range(start, min(len(dataset), start + cfg.data.batch_size))]
                )
                predictions += decode_outputs(registry[task], model(batch.images, task), batch, records)
    write_predictions(out / "pred", predictions)
    assert main(["evaluate", "--gt", str(root / "test"), "--pred", str(out / "pred"), "--out", str(out)]) == 0
    return pd.read_csv(out / "per_task.csv").set_index("task_id")


def test_training_scores_test_at_the_step_chosen_on_val(held_out, tiny_synth, registry, tmp_path):
    cfg = tiny_config(held_out, steps=8, eval_every=2)
    grouping = Grouping("overlap", {"pair": (FLIP, REG), "alone": (FLIP,)})
    result = train_grouping(cfg, grouping, tmp_path / "run", registry)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(metrics.columns) == ["network", "task", "step", "split", "metric", "value"]
    keys = ["network", "task", "step", "metric"]
    val = metrics[metrics.split == "val"].set_index(keys)["value"]
    test = metrics[metrics.split == "test"].set_index(keys)["value"]
    assert set(metrics.split) == {"val", "test"} and val.index.equals(test.index)
    assert np.allclose(test.xs(REG, level="task"), val.xs(REG, level="task"))  # test = val's copy
    accuracy = [(n, FLIP, s, "accuracy") for n, _, s, m in val.index if m == "accuracy"]
    assert np.allclose(test.loc[accuracy], 1 - val.loc[accuracy])  # the flipped labels are read

    for name, network in result.networks.items():
        done = json.loads((network.out_dir / "done.json").read_text())["best"]
        assert done == json.loads(json.dumps(network.best))
        for task, best in network.best.items():
            primary = registry[task].primary_metric
            values = val.xs((name, task, primary.name), level=("network", "task", "metric"))
            chosen = values.idxmax() if primary.higher_is_better else values.idxmin()  # first of ties
            assert best["step"] == chosen and best["value"] == values[chosen]
            assert best["test_value"] == test.loc[(name, task, best["step"], primary.name)]
            assert best["test_metrics"] == test.xs((name, task, best["step"]), level=keys[:3]).to_dict()
        # the step chosen on val is the worst on test for the flipped task: never chosen on test
        flipped = test.xs((name, FLIP, "accuracy"), level=("network", "task", "metric"))
        assert network.best[FLIP]["test_value"] == pytest.approx(flipped.min())

    served = pd.read_csv(tmp_path / "run" / "served.csv").set_index("task")
    on_val = {n: result.networks[n].best[FLIP]["value"] for n in ("pair", "alone")}
    chosen = served.loc[FLIP, "network"]
    assert on_val[chosen] == max(on_val.values())  # the val choice is kept...
    assert served.loc[FLIP, "test_value"] == result.networks[chosen].best[FLIP]["test_value"]
    assert served.loc[FLIP, "test_value"] == pytest.approx(1 - served.loc[FLIP, "value"])  # ...test beside
    for task in TASKS:  # served test scores equal `taskgroup evaluate` of the served weights on test/
        row = served.loc[task]
        network = result.networks[row["network"]]
        weights = network.out_dir / "checkpoints" / "best" / f"step_{row['step']}.pt"
        official = evaluate_on_test(
            cfg, registry, held_out, list(network.tasks), weights, tmp_path / f"eval-{task}"
        )
        for metric in network.best[task]["metrics"]:
            assert row[f"test_{metric}"] == pytest.approx(official.loc[task, metric], rel=1e-6), metric

    # without test/, nothing changes: the same val metrics, no test rows or fields, NaN test columns
    plain_root = make_val_only_root(tiny_synth, tmp_path / "plain_root")
    plain = train_grouping(
        tiny_config(plain_root, steps=8, eval_every=2), grouping, tmp_path / "plain", registry
    )
    plain_metrics = pd.read_csv(tmp_path / "plain" / "metrics.csv")
    assert set(plain_metrics.split) == {"val"}
    pd.testing.assert_series_equal(plain_metrics.set_index(keys)["value"], val)
    assert all("test_value" not in b for n in plain.networks.values() for b in n.best.values())
    assert plain.served["test_value"].isna().all() and plain.served["test_accuracy"].isna().all()
    assert list(plain.served["network"]) == list(served["network"])


def _entry(step: int, value: float, test: float | None, metric: str = "accuracy") -> dict:
    """A network's result for one task: val value at ``step`` and, unless None, test value."""
    entry = {"step": step, "value": value, "metrics": {metric: value}}
    if test is not None:
        entry.update(test_value=test, test_metrics={metric: test})
    return entry


def test_serving_and_compare_choose_on_val_and_report_test(registry, tmp_path):
    """Val and test disagree on the best network: the val choice is kept, its test value reported."""
    lung = _entry(2, 0.5, 0.5, "dsc")
    overlap = Grouping("overlap", {"a": (FLIP,), "b": (FLIP, "lung")})
    results = {
        "a": NetworkResult("a", (FLIP,), {FLIP: _entry(4, 0.8, 0.4)}, tmp_path),  # best on val
        "b": NetworkResult("b", (FLIP, "lung"), {FLIP: _entry(2, 0.6, 0.9), "lung": lung}, tmp_path),
    }
    served = serve_tasks(overlap, results, registry).set_index("task")
    assert served.loc[FLIP, "network"] == "a" and served.loc[FLIP, "value"] == 0.8
    assert served.loc[FLIP, "test_value"] == 0.4 and served.loc[FLIP, "test_accuracy"] == 0.4
    old = dict(results, a=dataclasses.replace(results["a"], best={FLIP: _entry(4, 0.8, None)}))
    served = serve_tasks(overlap, old, registry).set_index("task")  # a network from before test scoring
    assert served.loc[FLIP, "network"] == "a" and math.isnan(served.loc[FLIP, "test_value"])

    ts = Grouping("ts", {FLIP: (FLIP,), "lung": ("lung",)})
    jobs = {
        NetworkJob((FLIP,), 0).key: {FLIP: _entry(4, 0.8, 0.4)},
        NetworkJob(("lung",), 0).key: {"lung": lung},
        NetworkJob(tuple(sorted((FLIP, "lung"))), 0).key: {FLIP: _entry(2, 0.6, 0.9), "lung": lung},
    }
    scores = served_scores([ts, overlap], jobs, registry, [0], "best")
    rows = scores[(scores.grouping == "overlap") & (scores.task == FLIP)].set_index("split")
    assert set(rows["network"]) == {"a"}  # chosen on val, for both splits
    assert rows.loc["val", "value"] == 0.8 and rows.loc["test", "value"] == 0.4
    split, line = report_split(scores, has_test=True)
    assert (split, line) == ("test", "reported on: test (networks chosen on val)")
    sizes = {FLIP: 10, "lung": 20}
    report = write_report(tmp_path, scores, registry, sizes, [ts, overlap], 0.95, 0.0, split, line)
    assert (report["per_task"]["split"] == "test").all() and (report["per_task_val"]["split"] == "val").all()
    assert report["per_task"].set_index(["grouping", "task"]).loc[("overlap", FLIP), "mean"] == 0.4
    on_val = pd.read_csv(tmp_path / "per_task_val.csv").set_index(["grouping", "task"])
    assert on_val.loc[("overlap", FLIP), "mean"] == 0.8
    text = (tmp_path / "report.md").read_text()
    assert "reported on: test (networks chosen on val)" in text and "## All tasks on val" in text
    assert report_split(scores, has_test=False)[0] == "val"
    jobs[NetworkJob((FLIP,), 0).key] = {FLIP: _entry(4, 0.8, None)}  # trained before test scoring
    split, line = report_split(served_scores([ts, overlap], jobs, registry, [0], "best"), has_test=True)
    assert split == "val" and NetworkJob((FLIP,), 0).key in line


def test_compare_reports_on_test_with_networks_chosen_on_val(held_out, registry, tmp_path):
    cfg = tiny_config(held_out, steps=None, steps_per_task=4, eval_every=100, checkpoint_every=100)
    cfg = dataclasses.replace(
        cfg, compare=CompareConfig(groupings=("ts", "au"), seeds=1, cache=str(tmp_path / "cache"))
    )
    result = run_compare(cfg, tmp_path / "compare", registry, tasks=TASKS)
    assert result.split == "test" and len(result.jobs) == 3
    meta = json.loads((tmp_path / "compare" / "meta.json").read_text())
    assert (
        meta["reported_on"] == "test" and meta["chosen_on"] == "val" and meta["test_source"] == "test/ root"
    )
    assert "reported on: test (networks chosen on val)" in (tmp_path / "compare" / "report.md").read_text()
    for name in ("per_task", "per_group", "negative_transfer", "per_task_metrics", "gains"):
        assert set(pd.read_csv(tmp_path / "compare" / f"{name}.csv")["split"]) == {"test"}, name
    per_task = pd.read_csv(tmp_path / "compare" / "per_task.csv").set_index(["grouping", "task"])
    per_task_val = pd.read_csv(tmp_path / "compare" / "per_task_val.csv").set_index(["grouping", "task"])
    scores = pd.read_csv(tmp_path / "compare" / "scores.csv")
    assert set(scores.split) == {"val", "test"}  # the long table keeps both
    for grouping in ("ts", "au"):  # compare.select final: the last weights of the serving network
        for task in TASKS:
            row = scores[(scores.grouping == grouping) & (scores.task == task) & scores.primary].iloc[0]
            folder = next((tmp_path / "cache" / "networks").glob(f"{safe_name(row['network_key'])}-*"))
            tasks = json.loads((folder / "network.json").read_text())["tasks"]
            official = evaluate_on_test(
                cfg, registry, held_out, tasks, folder / "checkpoints" / "last.pt", tmp_path / "e"
            )
            metric = registry[task].primary_metric.name
            assert per_task.loc[(grouping, task), "mean"] == pytest.approx(
                official.loc[task, metric], rel=1e-6
            )
            on_test, on_val = (
                per_task.loc[(grouping, task), "mean"],
                per_task_val.loc[(grouping, task), "mean"],
            )
            assert on_val == pytest.approx(1 - on_test if task == FLIP else on_test)  # test/ is val/, flipped


def test_trained_gains_on_test_are_realised_at_the_final_step(held_out, tiny_synth, registry, tmp_path):
    from taskgroup.metrics.summary import relative_gain
    from taskgroup.stages.trained_gains import TrainedGains

    cfg = tiny_config(held_out, steps=None, steps_per_task=3, eval_every=1000, checkpoint_every=1000)
    gains = TrainedGains(cfg, registry, TASKS, tmp_path / "work")
    on_val, on_test = gains.gains(TASKS), gains.test_gains(TASKS)
    assert gains.trained == 3 and gains.test_source == "test/ root"

    def final(group, split):  # primary metric at the network's last evaluation, from metrics.csv
        frame = pd.read_csv(gains.folder(group) / "metrics.csv")
        frame = frame[(frame.split == split) & (frame.step == frame.step.max())].set_index(["task", "metric"])
        return {t: float(frame.loc[(t, registry[t].primary_metric.name), "value"]) for t in group}

    for t in TASKS:
        up = registry[t].primary_metric.higher_is_better
        assert on_val[t] == relative_gain(final(TASKS, "val")[t], final([t], "val")[t], up)
        assert on_test[t] == relative_gain(final(TASKS, "test")[t], final([t], "test")[t], up)
    assert gains.served_test_gains([TASKS]) == on_test
    assert gains.served_test_gains([[t] for t in TASKS]) == {t: 0.0 for t in TASKS}
    # overlapping groups: the lung task is served by its network that is best on val
    home = TASKS if gains.scores(TASKS)[FLIP] > gains.scores([FLIP])[FLIP] else [FLIP]
    served = gains.served_test_gains([TASKS, [FLIP]])
    assert served is not None and served[FLIP] == (on_test[FLIP] if home == TASKS else 0.0)
    fresh = TrainedGains(cfg, registry, TASKS, tmp_path / "elsewhere")
    assert fresh.served_test_gains([TASKS]) is None and fresh.trained == 0  # unknown, nothing trained
    plain_root = make_val_only_root(tiny_synth, tmp_path / "plain_root")
    plain_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(plain_root)))
    plain = TrainedGains(plain_cfg, registry, [FLIP], tmp_path / "plain")
    assert plain.test_scores([FLIP]) is None and plain.served_test_gains([[FLIP]]) is None


def test_a_root_with_a_test_split_but_no_training_split_is_a_clear_error(tmp_path, capsys):
    """A root holding only test/ (a test set shipped alone) names the folder and what is
    missing, exit 2, no traceback (it was a KeyError 'train')."""
    (tmp_path / "only" / "test" / "csv_files").mkdir(parents=True)
    (tmp_path / "only" / "test" / "csv_files" / "x.csv").write_text("image_path,task_id\n")
    code = main(
        ["train", "--data", str(tmp_path / "only"), "--grouping", "ts", "--out", str(tmp_path / "run")]
    )
    captured = capsys.readouterr()
    err = " ".join((captured.out + captured.err).split())
    assert code == 2 and "no train/csv_files/" in err and "test/" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "networks").exists()
