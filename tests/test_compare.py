"""taskgroup compare: the report's statistics equal hand-computed values; tasks are served by
their best network; a network is trained once for every grouping and every run that shares the
cache; two workers on one storage (SQLite, and PostgreSQL in CI) survive a killed worker."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import pandas as pd
import pytest
from scipy import stats
from test_training import tiny_config

from taskgroup.compare import (
    compare_jobs,
    gains_frame,
    per_group,
    per_task,
    resolve_groupings,
    run_compare,
    served_scores,
    study_name,
)
from taskgroup.compare.report import negative_transfer
from taskgroup.config import CompareConfig
from taskgroup.errors import ConfigError
from taskgroup.training.jobs import NetworkJob, create_queue, sqlite_url, storage_for

SEG, REG = "breast_lesion", "IUGC"  # Dice (higher is better), MRE (lower is better)


def _scores(rows):
    """Long score table from (grouping, seed, task, value) of primary metrics."""
    metric = {SEG: "dsc", REG: "mre"}
    return pd.DataFrame(
        [
            {
                "grouping": g,
                "seed": s,
                "task": t,
                "network": g,
                "network_key": g,
                "network_size": 1 if g == "ts" else 2,
                "step": 10,
                "metric": metric[t],
                "value": v,
                "primary": True,
            }
            for g, s, t, v in rows
        ]
    )


def test_report_statistics_equal_hand_computed_values(registry):
    ts = {SEG: [0.50, 0.40, 0.60], REG: [20.0, 10.0, 40.0]}
    pair = {SEG: [0.55, 0.42, 0.54], REG: [18.0, 11.0, 30.0]}
    rows = [("ts", s, t, ts[t][s]) for t in ts for s in range(3)]
    rows += [("pair", s, t, pair[t][s]) for t in pair for s in range(3)]
    gains = gains_frame(_scores(rows), registry)
    got = gains[gains.grouping == "pair"].set_index(["task", "seed"])["gain"]
    # Dice: (v - ts) / ts; MRE: (ts - v) / ts
    seg = [0.10, 0.05, -0.10]
    reg = [0.10, -0.10, 0.25]
    assert np.allclose(got.loc[SEG].to_numpy(), seg) and np.allclose(got.loc[REG].to_numpy(), reg)

    group = per_group(gains, registry, 0.95).set_index(["scope", "name"])
    row = group.loc[("all", "all")]
    per_seed = [(a + b) / 2 for a, b in zip(seg, reg, strict=True)]  # 0.10, -0.025, 0.075
    mean = sum(per_seed) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_seed) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2 dof)
    assert row.delta_m == pytest.approx(mean)
    assert (row.ci_low, row.ci_high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    t_stat = mean / (sd / math.sqrt(3))
    assert row.p_seeds == pytest.approx(2 * stats.t.sf(abs(t_stat), 2))
    assert row.p_tasks == pytest.approx(0.5)  # two tasks, both mean gains positive: exact 2/4
    assert group.loc[("type", "seg"), "delta_m"] == pytest.approx(sum(seg) / 3)
    assert group.loc[("clinical_group", "OB"), "delta_m"] == pytest.approx(sum(reg) / 3)

    table = per_task(gains, registry, {SEG: 100, REG: 50}, 0.95)
    seg_row = table[(table.grouping == "pair") & (table.task == SEG)].iloc[0]
    assert seg_row["mean"] == pytest.approx(np.mean(pair[SEG]))
    assert seg_row["std"] == pytest.approx(np.std(pair[SEG], ddof=1))
    assert seg_row["diff"] == pytest.approx(np.mean(np.subtract(pair[SEG], ts[SEG])))
    reg_row = table[(table.grouping == "pair") & (table.task == REG)].iloc[0]
    assert reg_row["diff"] == pytest.approx(np.mean(np.subtract(ts[REG], pair[REG])))  # direction-aware


def test_negative_transfer_flags_and_undefined_gains(registry):
    rows = [("ts", s, SEG, v) for s, v in enumerate([0.5, 0.4, 0.6])]
    rows += [("ts", s, REG, 20.0) for s in range(3)]
    rows += [("au", s, SEG, v) for s, v in enumerate([0.4, 0.3, 0.5])]  # always worse
    rows += [("au", s, REG, v) for s, v in enumerate([19.0, 22.0, 20.0])]  # mixed
    gains = gains_frame(_scores(rows), registry)
    table = per_task(gains, registry, {SEG: 100, REG: 50}, 0.95)
    flags, correlation = negative_transfer(table)
    flags = flags.set_index("task")
    assert bool(flags.loc[SEG, "negative"]) and bool(flags.loc[SEG, "significant"])
    assert not bool(flags.loc[REG, "significant"])
    assert list(flags.index) == [REG, SEG]  # by training-set size
    assert correlation.iloc[0]["negative"] == int(
        gains[gains.grouping == "au"].groupby("task").gain.mean().lt(0).sum()
    )
    # TS at exactly 0: the relative gain is undefined, left out of delta_m and counted
    zero = [("ts", 0, SEG, 0.0), ("ts", 0, REG, 20.0), ("au", 0, SEG, 0.3), ("au", 0, REG, 10.0)]
    group = per_group(gains_frame(_scores(zero), registry), registry, 0.95).set_index(["scope", "name"])
    assert group.loc[("all", "all"), "delta_m"] == pytest.approx(0.5)
    assert group.loc[("all", "all"), "n_undefined"] == 1
    # with a floor, a TS score below it is replaced by the floor in the denominator only
    floored = gains_frame(_scores(zero), registry, floor=0.1).set_index(["grouping", "task"])
    assert floored.loc[("au", SEG), "gain"] == pytest.approx((0.3 - 0.0) / 0.1)
    assert floored.loc[("au", REG), "gain"] == pytest.approx(0.5)  # MRE: no floor, (20 - 10) / 20
    low = [("ts", 0, SEG, 0.02), ("ts", 0, REG, 20.0), ("au", 0, SEG, 0.3), ("au", 0, REG, 10.0)]
    group = per_group(gains_frame(_scores(low), registry, floor=0.1), registry, 0.95).set_index(
        ["scope", "name"]
    )
    assert group.loc[("all", "all"), "delta_m"] == pytest.approx(((0.3 - 0.02) / 0.1 + 0.5) / 2)
    assert group.loc[("all", "all"), "n_floored"] == 1 and group.loc[("all", "all"), "n_undefined"] == 0


def test_served_scores_take_each_task_from_its_best_network(registry):
    from taskgroup.groupings import Grouping

    overlap = Grouping("overlap", {"a": (SEG, REG), "b": (REG,)})
    results = {
        NetworkJob((REG, SEG), 0).key: {
            SEG: {"step": 5, "metrics": {"dsc": 0.7, "hd": 3.0}},
            REG: {"step": 5, "metrics": {"mre": 12.0}},
        },
        NetworkJob((REG,), 0).key: {REG: {"step": 5, "metrics": {"mre": 9.0}}},
    }
    scores = served_scores([overlap], results, registry, [0], "final")
    primary = scores[scores.primary].set_index("task")
    assert primary.loc[REG, "network"] == "b" and primary.loc[REG, "value"] == 9.0  # lower MRE wins
    assert primary.loc[SEG, "network"] == "a"
    assert set(scores[scores.task == SEG].metric) == {"dsc", "hd"}


def test_groupings_share_networks_and_must_train_the_same_tasks(registry, tmp_path):
    tasks = [SEG, "thyroid_nodule_det", "fetal_head", REG]
    spec = tmp_path / "planted.yaml"
    spec.write_text(f"groups: [[{SEG}, thyroid_nodule_det], [fetal_head], [{REG}]]\n")
    groupings, chosen = resolve_groupings(["cg", "au", str(spec)], registry)
    assert chosen == [t for t in registry.ids if t in tasks]
    assert [g.name for g in groupings] == ["ts", "cg", "au", "planted"]  # TS added as reference
    jobs = compare_jobs(groupings, [0, 1])
    distinct = {frozenset(ids) for g in groupings for ids in g.groups.values()}
    # ts: 4 single tasks, shared by cg (breast, thyroid), planted; + cg's OB pair, au, planted's pair
    assert len(jobs) == 2 * len(distinct) == 2 * 7
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"groups: [[{SEG}, {REG}]]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*does not train task\(s\) thyroid_nodule_det"):
        resolve_groupings(["ts", str(spec), str(bad)], registry)


COMPARE_TASKS = ["breast_lesion", "thyroid_nodule", "IUGC"]


def _compare_config(root, tmp_path, **compare):
    cfg = tiny_config(root, steps=None, steps_per_task=4, eval_every=100, checkpoint_every=2)
    grouping = tmp_path / "pair.yaml"
    grouping.write_text("name: pair\ngroups: [[breast_lesion, thyroid_nodule], [IUGC]]\n")
    fields = {"groupings": ("ts", "au", str(grouping)), "seeds": 2, "cache": str(tmp_path / "cache")}
    return dataclasses.replace(cfg, compare=CompareConfig(**{**fields, **compare}))


@pytest.mark.slow
def test_compare_trains_every_network_once_and_reuses_the_cache(tiny_synth, registry, tmp_path):
    cfg = _compare_config(tiny_synth, tmp_path)
    first = run_compare(cfg, tmp_path / "first", registry)
    # ts: 3 single tasks; au: 1; pair: 1 pair + IUGC alone (= ts's) -> 5 networks x 2 seeds
    assert len(first.jobs) == 10 and first.trained_here == 10
    for name in ("per_task.csv", "per_group.csv", "negative_transfer.csv", "report.md", "scores.parquet"):
        assert (first.out / name).exists(), name
    for name in ("delta_m.png", "gains.png", "negative_transfer.png"):
        assert (first.out / name).stat().st_size > 5000, name
    scores = first.scores
    assert set(scores.grouping) == {"ts", "au", "pair"} and set(scores.seed) == {0, 1}
    iugc = scores[(scores.task == "IUGC") & scores.primary & (scores.split == "val")]
    iugc = iugc.set_index(["grouping", "seed"])["value"]
    assert iugc.loc[("pair", 0)] == iugc.loc[("ts", 0)]  # the same network serves both
    second = run_compare(cfg, tmp_path / "second", registry)
    assert second.trained_here == 0  # every network from the cache
    pd.testing.assert_frame_equal(first.scores, second.scores)
    group = pd.read_csv(tmp_path / "second" / "per_group.csv")
    assert set(group.grouping) == {"au", "pair"} and (group.seeds == 2).all()


def _storages():
    params = [pytest.param("sqlite", id="sqlite")]
    url = os.environ.get("TASKGROUP_TEST_POSTGRES")
    if url or os.environ.get("TASKGROUP_REQUIRE_POSTGRES") == "1":
        params.append(pytest.param(url or "", id="postgresql"))
    else:
        params.append(
            pytest.param("", id="postgresql", marks=pytest.mark.skip("TASKGROUP_TEST_POSTGRES unset"))
        )
    return params


@pytest.mark.slow
@pytest.mark.parametrize("storage", _storages())
def test_compare_workers_survive_a_killed_worker(storage, tiny_synth, registry, tmp_path):
    if storage != "sqlite" and not storage:
        pytest.fail("TASKGROUP_REQUIRE_POSTGRES=1 but TASKGROUP_TEST_POSTGRES (a postgresql:// URL) is unset")
    url = sqlite_url(tmp_path / "jobs.db") if storage == "sqlite" else storage
    cfg = _compare_config(tiny_synth, tmp_path, storage=url, seeds=1, heartbeat=1, grace=3)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps_per_task=30))
    groupings, _ = resolve_groupings(cfg.compare.groupings, registry)
    jobs = compare_jobs(groupings, [0])
    name = study_name(cfg)
    if storage != "sqlite":  # a server outlives test runs: start from an empty study
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=name, storage=url)
    create_queue(storage_for(url, 1, 3), name, cfg, jobs, tmp_path / "cache")
    command = [sys.executable, "-m", "taskgroup", "worker", "--storage", url, "--study", name]
    command += ["--heartbeat", "1", "--grace", "3", "--threads", "1"]
    victim = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    survivor = None
    deadline = time.time() + 120
    while time.time() < deadline:  # the victim is inside a job, past a checkpoint
        if any((d / "checkpoints" / "last.pt").exists() for d in (tmp_path / "cache" / "networks").glob("*")):
            break
        time.sleep(0.1)
    else:
        victim.kill()
        pytest.fail("the first worker never reached a checkpoint")
    survivor = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.kill(victim.pid, signal.SIGKILL)  # two workers were running; one dies mid-job
    victim.wait()
    _, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err[-2000:]
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    complete = sorted(t.user_attrs["job"] for t in trials if t.state.name == "COMPLETE")
    assert complete == sorted(j.key for j in jobs)  # every network trained exactly once
    assert sum(t.state.name == "FAIL" for t in trials) == 1  # the killed attempt, retaken
    result = run_compare(cfg, tmp_path / "report", registry)  # finds everything done
    assert result.trained_here == 0 and set(result.scores.task) == set(COMPARE_TASKS)


def test_a_report_of_ts_alone_is_empty_but_written(registry, tmp_path):
    from taskgroup.compare import write_report
    from taskgroup.groupings import Grouping

    scores = _scores([("ts", s, t, v) for s in range(2) for t, v in ((SEG, 0.5), (REG, 20.0))])
    report = write_report(
        tmp_path, scores, registry, {SEG: 10, REG: 20}, [Grouping("ts", {SEG: (SEG,)})], 0.95
    )
    assert report["per_group"].empty and (tmp_path / "report.md").exists()
