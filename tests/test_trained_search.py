"""The trained objective of the search: a trial's value is the mean realised relative gain of its
partition's networks; each network is trained once and a stopped study resumes; a pruned trial
stops before training its remaining networks."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pandas as pd
import pytest
from test_training import tiny_config

from taskgroup.grouping.optimize import encode
from taskgroup.grouping.trained_search import trained_objective, trained_search
from taskgroup.metrics.summary import relative_gain
from taskgroup.stages.trained_gains import TrainedGains
from taskgroup.training.jobs import sqlite_url

TASKS = ["breast_lesion", "thyroid_nodule", "IUGC", "lung_2cls"]


def _final(work, registry, group):
    """A task's primary metric at its network's last evaluation, read back from metrics.csv."""
    folder = next(
        p for p in (work / "networks").iterdir() if p.name.startswith("+".join(sorted(group)) + "-")
    )
    frame = pd.read_csv(folder / "metrics.csv")
    frame = frame[frame.split == "val"]  # the objective is on validation (test rows are beside)
    out = {}
    for t in group:
        rows = frame[(frame.task == t) & (frame.metric == registry[t].primary_metric.name)]
        out[t] = float(rows[rows.step == rows.step.max()].value.iloc[0])
    return out


@pytest.mark.slow
def test_trained_search_values_are_realised_gains_and_it_resumes(tiny_synth, registry, tmp_path):
    cfg = tiny_config(tiny_synth, steps=None, steps_per_task=3, eval_every=1000, checkpoint_every=1000)
    work = tmp_path / "work"
    url = sqlite_url(tmp_path / "s.db")
    gains = TrainedGains(cfg, registry, TASKS, work)
    start = [[TASKS[:2], TASKS[2:]]]
    result = trained_search(gains, 3, 3, url, "t", seed=0, start=start, pruner="none")
    study = optuna.load_study(study_name="t", storage=url)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 3 == result.trials
    sets = {tuple(sorted(g)) for t in trials for g in t.user_attrs["groups"]} | {(t,) for t in TASKS}
    assert len(list((work / "networks").iterdir())) == len(sets) == gains.trained  # each once
    for trial in trials:  # the value: mean finite relative gain over the tasks, 0 for a task alone
        values = []
        for group in trial.user_attrs["groups"]:
            if len(group) == 1:
                values.append(0.0)
                continue
            together = _final(work, registry, group)
            for t in group:
                alone = _final(work, registry, [t])[t]
                values.append(relative_gain(together[t], alone, registry[t].primary_metric.higher_is_better))
        finite = [v for v in values if math.isfinite(v)]
        assert trial.value == pytest.approx(np.mean(finite) if finite else 0.0)
    assert trials[0].user_attrs["groups"] == start[0]  # the start partition is tried first
    resumed = TrainedGains(cfg, registry, TASKS, work)
    trained_search(resumed, 3, 5, url, "t", seed=0, start=start, pruner="none")
    again = optuna.load_study(study_name="t", storage=url).trials
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in again) == 5
    new_sets = {tuple(sorted(g)) for t in again[3:] for g in t.user_attrs["groups"]} - sets
    assert resumed.trained == len(new_sets)  # nothing trained before is trained again


@pytest.mark.slow
def test_a_pruned_trial_trains_no_further_network(tiny_synth, registry, tmp_path):
    cfg = tiny_config(tiny_synth, steps=None, steps_per_task=3, eval_every=1000, checkpoint_every=1000)
    gains = TrainedGains(cfg, registry, TASKS, tmp_path / "work")
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1e9))
    study.enqueue_trial(encode([TASKS[:2], TASKS[2:]], TASKS))
    study.optimize(trained_objective(gains, 2), n_trials=1)
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED
    names = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "work" / "networks").iterdir()}
    first, second = sorted([tuple(TASKS[:2]), tuple(TASKS[2:])], key=lambda g: (-len(g), g))
    assert "+".join(sorted(first)) in names  # the first group (largest, then by name) trained
    assert "+".join(sorted(second)) not in names  # pruned before the second


@pytest.mark.slow
def test_search_command_adds_the_trained_proposal(tiny_synth, registry, tmp_path):
    """Ranked and chosen on val; on a root with a test split (lung_2cls labels flipped), the
    realised test gain of every proposal whose networks are trained is reported beside it."""
    import dataclasses
    import json

    import yaml
    from fixtures import make_held_out_root

    from taskgroup.affinity.report import matrix_frame
    from taskgroup.config import to_mapping
    from taskgroup.groupings import load_grouping
    from taskgroup.stages.search import run_search

    root = make_held_out_root(tiny_synth, tmp_path / "root", "lung_2cls")
    cfg = tiny_config(root, steps=None, steps_per_task=3, eval_every=1000, checkpoint_every=1000)
    cfg = dataclasses.replace(
        cfg,
        search=dataclasses.replace(cfg.search, trials=10, pareto_trials=10, trained_trials=3, pruner="none"),
    )
    run = tmp_path / "aff"
    (run / "gradient").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_mapping(cfg)))
    matrix = np.array([[0, 1, -1, -1], [1, 0, -1, -1], [-1, -1, 0, 1], [-1, -1, 1, 0]], dtype=float)
    matrix_frame(matrix, TASKS).to_csv(run / "gradient" / "matrix.csv")
    result = run_search(cfg.search, registry, tmp_path / "search", [run], run_cfg=cfg)
    meta = json.loads((tmp_path / "search" / "meta.json").read_text())
    assert meta["trained"]["trials"] == 3 and meta["trained"]["pruned"] == 0  # pruner "none"
    assert meta["best"]["trained"]["name"] == "trained-optuna"
    trained = next(p for p in result.proposals if p.method == "optuna-trained")
    assert np.isfinite(trained.mean) and meta["trained"]["networks_trained"] >= len(TASKS)
    grouping = load_grouping(tmp_path / "search" / "proposals" / "trained-optuna.yaml", registry)
    assert set(grouping.tasks) == set(TASKS)
    assert {tuple(g) for g in grouping.groups.values()} == {tuple(g) for g in trained.groups}
    # chosen on val (the trial value), its test gain beside it; TS is trained: test gain 0
    assert meta["trained"]["chosen_on"] == "val" and meta["trained"]["test_source"] == "test/ root"
    assert trained.test_gains is not None and meta["best"]["trained"]["mean_gain_on"] == "val"
    assert meta["best"]["trained"]["test_mean_gain"] == pytest.approx(trained.test_mean)
    ranking = pd.read_csv(tmp_path / "search" / "ranking.csv").set_index(["estimator", "name"])
    assert ranking.loc[("trained", "trained-optuna"), "test_mean_gain"] == pytest.approx(trained.test_mean)
    assert ranking.loc[("gradient", "ts"), "test_mean_gain"] == 0.0
    assert set(ranking["mean_gain_on"]) == {"predicted", "val"}
    assert all(f"test_gain:{t}" in ranking.columns for t in TASKS)
