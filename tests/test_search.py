"""`taskgroup search`: the predictor's hand-computed values, the permutation-invariant encoding,
Optuna recovering a planted partition (and resuming), the candidate pool, and the whole command
on an affinity run folder over the synthetic benchmark's 27 tasks."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from fixtures import TINY_CONFIG
from sklearn.metrics import adjusted_rand_score

from taskgroup.affinity.report import matrix_frame
from taskgroup.affinity.trained import every_set_jobs, groups_table
from taskgroup.config import load_run_config, to_mapping
from taskgroup.data.synthetic import planted_labels
from taskgroup.errors import DataError
from taskgroup.grouping import GainPredictor, Partition, propose_partitions, select_milp
from taskgroup.grouping.candidates import generate_candidates
from taskgroup.grouping.optimize import canonical_labels, decode, encode, local_search, optuna_search
from taskgroup.grouping.proposals import Proposal, best_proposals, front_knee, gain_front
from taskgroup.grouping.select import read_groups_table
from taskgroup.groupings import load_grouping
from taskgroup.stages.search import run_search
from taskgroup.training.jobs import NetworkJob

TASKS = [f"t{k}" for k in range(27)]
TRUTH = [k // 9 for k in range(27)]


def planted(labels=TRUTH, noise: float = 1.0, seed: int = 0) -> np.ndarray:
    """+1 within planted groups, -0.5 across, plus noise of the given sd (signal gap 1.5)."""
    rng = np.random.default_rng(seed)
    a = np.where(np.equal.outer(labels, labels), 1.0, -0.5) + noise * rng.standard_normal((len(labels),) * 2)
    np.fill_diagonal(a, 0.0)
    return a


def test_predictor_hand_computed():
    tasks = ["a", "b", "c"]
    a = np.array([[0.0, 0.4, -0.2], [0.2, 0.0, -0.6], [0.6, 0.8, 0.0]])  # source rows, target columns
    plain = GainPredictor(a, tasks)
    assert plain.gains(["a", "b", "c"]) == pytest.approx({"a": 0.4, "b": 0.6, "c": -0.4})
    assert plain.gains(["a"]) == {"a": 0.0}
    assert plain.served([["a", "b"], ["a", "c"]]) == pytest.approx({"a": 0.6, "b": 0.4, "c": -0.2})
    # two partners, m0 = 2: shrunk by 2 / (2 + 2)
    assert GainPredictor(a, tasks, partners=2).gains(["a", "b", "c"])["b"] == pytest.approx(0.3)
    sizes = {"a": 50, "b": 200, "c": 200}
    # n0 = 50: a's estimate is shrunk by 50 / (50 + 50)
    assert GainPredictor(a, tasks, sizes, shrink=50).gains(["a", "b", "c"])["a"] == pytest.approx(0.2)
    # beta = 1: a loss of a task with a quarter of the median data counts 1 + log2(4) = 3 times
    hurt = GainPredictor(-a, tasks, sizes, penalty=1.0)
    assert hurt.gains(["a", "b", "c"])["a"] == pytest.approx(-1.2)
    assert hurt.gains(["a", "b", "c"])["b"] == pytest.approx(-0.6)  # at the median: unchanged
    with pytest.raises(ValueError, match="needs per-task sizes"):
        GainPredictor(a, tasks, shrink=10)
    # the sum over partners: a's partners b and c bring 0.2 + 0.6; no partner shrinkage
    summed = GainPredictor(a, tasks, partners=2, combine="sum")
    assert summed.gains(["a", "b", "c"]) == pytest.approx({"a": 0.8, "b": 1.2, "c": -0.8})
    assert summed.gains(["b"]) == {"b": 0.0}
    # over a partition, the mean served gain is 2 / n times the symmetrised affinity inside
    # the groups (correlation clustering): {a, c} holds (-0.2 + 0.6) / 2 = 0.2, b is alone
    assert summed.total([["a", "c"], ["b"]]) == pytest.approx(2 / 3 * 0.2)
    assert GainPredictor(a, tasks, sizes, shrink=50, combine="sum").gains(["a", "c"])["a"] == pytest.approx(
        0.3
    )
    with pytest.raises(ValueError, match="combine must be"):
        GainPredictor(a, tasks, combine="median")


def test_encoding_is_permutation_invariant():
    groups = (("t0", "t3"), ("t1", "t2"), ("t4",))
    tasks = TASKS[:5]
    assert decode([2, 0, 0, 2, 1], tasks) == decode([0, 1, 1, 0, 2], tasks) == groups
    assert encode(groups, tasks) == {"g0": 0, "g1": 1, "g2": 1, "g3": 0, "g4": 2}
    assert encode(tuple(reversed(groups)), tasks) == encode(groups, tasks)
    assert canonical_labels([5, 5, 3, 9]) == [0, 0, 1, 2]
    with pytest.raises(ValueError, match="does not cover"):
        encode((("t0",),), tasks)


def test_optuna_recovers_planted_partition_and_resumes(tmp_path):
    a = planted()
    predictor = GainPredictor(a, TASKS, partners=8)
    start = [p.groups for p in propose_partitions(a, TASKS)]
    result = optuna_search(predictor, 6, 150, None, "gain", seed=0, start=start)  # in memory
    polished, value = local_search(predictor, result.best, 6)
    assert adjusted_rand_score(TRUTH, Partition("x", polished).labels(TASKS)) == 1.0
    assert value == pytest.approx(predictor.total([TASKS[:9], TASKS[9:18], TASKS[18:]]))
    assert result.trials == 150 and result.distinct > 100  # relabellings are not counted twice
    # on a SQLite storage the study resumes: 5 more trials, the first 15 kept
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = optuna_search(predictor, 6, 15, storage, "gain", seed=0, start=start)
    again = optuna_search(predictor, 6, 20, storage, "gain", seed=0, start=start)
    assert (first.trials, again.trials) == (15, 20) and again.best_value >= first.best_value
    # NSGA-II: the front is non-dominated (more networks only for more predicted gain)
    front = optuna_search(predictor, 6, 100, None, "pareto", multi_objective=True, seed=0, start=start).pareto
    networks = [n for _, n, _ in front]
    values = [v for v, _, _ in front]
    assert networks == sorted(set(networks)) and values == sorted(values) and len(front) >= 2


def test_candidate_pool_and_selection():
    a = planted(noise=0.3)
    predictor = GainPredictor(a, TASKS, partners=4)
    partitions = propose_partitions(a, TASKS, n_groups=(2, 3))
    pool = generate_candidates(predictor, partitions, pairs=10, triples=5)
    keys = {frozenset(c.tasks) for c in pool}
    assert len(keys) == len(pool)  # no duplicates
    assert all(frozenset((t,)) in keys for t in TASKS)  # every task alone
    assert {frozenset(g) for p in partitions for g in p.groups} <= keys
    assert any(":merge:" in c.name for c in pool)
    assert any(":split:" in c.name for c in pool) and any(c.name.startswith("triple:") for c in pool)
    chosen = select_milp(pool, 3, TASKS, higher_is_better=True)
    assert sorted(map(sorted, chosen.networks(pool))) == sorted(
        map(sorted, [TASKS[:9], TASKS[9:18], TASKS[18:]])
    )


def _proposal(name: str, method: str, networks: int, gain: float) -> Proposal:
    groups = tuple((f"t{k}",) for k in range(networks))
    return Proposal(name, method, "est", groups, {"t0": gain}, float(networks))


def test_best_proposal_is_the_knee_of_the_gain_front():
    """AU (0 gain, one network), then partitions of 2..5 networks whose gains flatten after 3:
    the knee is 3 networks; the 5 % tolerance rule takes 4 (0.95 is within 5 % of 1.0)."""
    proposals = [
        _proposal("au", "au", 1, 0.0),
        _proposal("p2", "louvain", 2, 0.6),
        _proposal("p3a", "louvain", 3, 0.85),
        _proposal("p3b", "spectral", 3, 0.9),
        _proposal("p4", "select", 4, 0.95),
        _proposal("p4-worse", "select", 4, 0.7),
        _proposal("p5", "select", 5, 1.0),
        _proposal("p6", "select", 6, 0.99),  # no better than 5 networks: not on the front
    ]
    assert gain_front(proposals) == [(1, 0.0), (2, 0.6), (3, 0.9), (4, 0.95), (5, 1.0)]
    assert front_knee(gain_front(proposals)) == 3
    assert best_proposals(proposals, 0.05, "knee")["est"].name == "p3b"  # the best with 3 networks
    assert best_proposals(proposals, 0.05, "tolerance")["est"].name == "p4"
    # no knee on a straight front, none on two points: the tolerance rule decides
    straight = [_proposal(f"s{n}", "louvain", n, 0.25 * n) for n in range(2, 6)]
    assert front_knee(gain_front(straight)) is None and front_knee([(1, 0.0), (2, 1.0)]) is None
    assert best_proposals(straight, 0.05, "knee")["est"].name == "s5"
    # gains that jump at 2 networks and hardly move after: the knee is 2
    flat = [
        _proposal("au", "au", 1, -5.0),
        *(_proposal(f"f{n}", "louvain", n, 1 + 0.01 * n) for n in (2, 3, 4)),
    ]
    assert front_knee(gain_front(flat)) == 2 and best_proposals(flat, 0.05)["est"].name == "f2"


def test_best_partition_rule():
    """``partition``: the highest-gain proposal that is a partition (an overlapping selection
    with a higher gain is ranked, not chosen; TS, CG and AU never are), fewest networks on a tie."""
    part = [
        _proposal("au", "au", 1, 2.0),
        _proposal("p2", "louvain", 2, 0.6),
        _proposal("p3", "kernighan_lin", 3, 0.9),
        _proposal("p3-tie", "optuna", 4, 0.9),
    ]
    overlapping = Proposal("sel", "select", "est", (("t0", "t1"), ("t0", "t2")), {"t0": 1.5}, 2.0)
    assert not overlapping.is_partition and part[2].is_partition
    assert best_proposals([*part, overlapping], 0.05, "partition")["est"].name == "p3"
    # nothing but an overlapping selection: the tolerance rule
    assert best_proposals([overlapping], 0.05, "partition")["est"].name == "sel"


def _affinity_run(tmp_path, tiny_synth, registry, noise: float) -> tuple:
    run = tmp_path / "aff"
    (run / "gradient").mkdir(parents=True)
    cfg = load_run_config(TINY_CONFIG, [f"data.root={tiny_synth}"])
    (run / "config.yaml").write_text(yaml.safe_dump(to_mapping(cfg)))
    tasks = list(registry.ids)
    truth = planted_labels(tasks)
    matrix_frame(planted(truth, noise=noise), tasks).to_csv(run / "gradient" / "matrix.csv")
    return run, tasks, truth


def test_search_end_to_end(tmp_path, tiny_synth, registry):
    run, tasks, truth = _affinity_run(tmp_path, tiny_synth, registry, noise=0.8)
    cfg = load_run_config(TINY_CONFIG, ["search.trials=40", "search.pareto_trials=40"]).search
    # beside the affinity, a table of trained groups over the same tasks: every task alone
    # (score 0) and the planted groups, where each member gained 0.1
    table = [{"tasks": t, t: 0.0} for t in tasks]
    table += [
        {"tasks": "+".join(g), **dict.fromkeys(g, 0.1)}
        for g in ([t for t, lab in zip(tasks, truth, strict=True) if lab == k] for k in range(3))
    ]
    pd.DataFrame(table).to_csv(tmp_path / "groups.csv", index=False)
    result = run_search(cfg, registry, tmp_path / "search", [run], tmp_path / "groups.csv")
    ranking = pd.read_csv(tmp_path / "search" / "ranking.csv")
    assert {"ts", "cg", "au", "louvain", "select", "optuna+local", "nsga2"} <= set(ranking.method)
    measured = ranking[ranking.estimator == "table"].set_index("name")
    assert measured.loc["table-select-b3", "ari"] == 1.0
    assert measured.loc["table-select-b3", "mean_gain"] == pytest.approx(0.1)
    best = result.best["gradient"]
    assert adjusted_rand_score(truth, best.served_labels(tasks)) >= 0.9
    meta = json.loads((tmp_path / "search" / "meta.json").read_text())
    assert meta["best_ari"]["gradient"] >= 0.9 and sum(meta["train_sizes"].values()) > 0
    assert ranking.loc[ranking.method == "ts", "mean_gain"].item() == 0.0
    # every proposal is a grouping `taskgroup train --grouping FILE` accepts, covering every task
    files = sorted((tmp_path / "search" / "proposals").glob("*.yaml"))
    assert len(files) == len(ranking) - 3  # every proposal but TS, CG and AU
    for f in files:
        assert set(load_grouping(f, registry).tasks) == set(tasks)
    for png in ("heatmap_gradient.png", "pareto_gradient.png"):
        assert (tmp_path / "search" / png).stat().st_size > 10_000


def test_groups_table_selection_and_errors(tmp_path, registry):
    rows = [
        {"tasks": "fetal_head", "fetal_head": 0.0},
        {"tasks": "lung", "lung": 0.0},
        {"tasks": "fetal_head+lung", "fetal_head": 0.10, "lung": -0.05},
        {"tasks": "fetal_head+lung+cervix", "fetal_head": 0.02, "lung": 0.04, "cervix": 0.01},
        {"tasks": "cervix", "cervix": 0.0},
    ]
    path = tmp_path / "groups.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    pool = read_groups_table(path, registry)
    chosen = select_milp(pool, 2, higher_is_better=True)  # the triple and fetal_head with lung
    assert sorted(map(tuple, chosen.networks(pool))) == [
        ("fetal_head", "lung"),
        ("fetal_head", "lung", "cervix"),
    ]
    assert chosen.total == pytest.approx(0.10 + 0.04 + 0.01)
    bad = tmp_path / "bad.csv"
    pd.DataFrame([{"tasks": "fetal_head+lungs", "fetal_head": 0.1, "lungs": 0.2}]).to_csv(bad, index=False)
    with pytest.raises(DataError, match=r"bad.csv, line 2: unknown task 'lungs'"):
        read_groups_table(bad, registry)
    missing = tmp_path / "missing.csv"
    pd.DataFrame([{"tasks": "fetal_head+lung", "fetal_head": 0.1}]).to_csv(missing, index=False)
    with pytest.raises(DataError, match=r"line 2: no score for member task 'lung'"):
        read_groups_table(missing, registry)
    words = tmp_path / "words.csv"
    pd.DataFrame([{"tasks": "fetal_head", "fetal_head": 0.1}, {"tasks": "lung", "lung": "high"}]).to_csv(
        words, index=False
    )
    with pytest.raises(
        DataError, match=r"words.csv, line 3: the score of member task 'lung' is 'high', not a number"
    ):
        read_groups_table(words, registry)
    with pytest.raises(DataError, match=r"no <method>/matrix\.csv"):
        run_search(load_run_config(TINY_CONFIG).search, registry, tmp_path / "s", [tmp_path])


def test_the_exhaustive_truth_table_is_a_groups_table_of_hand_computed_gains(tmp_path, registry):
    """benchmarks/truth_table.py's table: every non-empty set per seed, singles first; each
    member's gain over its own single-task network of the same seed, averaged over seeds (MRE:
    lower is better, so its gain is the relative drop), read back by ``--groups-table``."""
    tasks = ("breast_2cls", "FUGC", "fetal_heart")
    jobs = every_set_jobs(tasks, [0, 1])
    assert len(jobs) == 2 * 7 and [len(j.tasks) for j in jobs[:3]] == [1, 1, 1]
    assert len({j.key for j in jobs}) == 14
    values = {  # seed -> network -> task -> primary value
        0: {
            ("breast_2cls",): {"breast_2cls": 0.80},
            ("FUGC",): {"FUGC": 20.0},
            ("fetal_heart",): {"fetal_heart": 0.0},
            ("FUGC", "breast_2cls"): {"breast_2cls": 0.88, "FUGC": 18.0},
        },
        1: {
            ("breast_2cls",): {"breast_2cls": 0.50},
            ("FUGC",): {"FUGC": 10.0},
            ("fetal_heart",): {"fetal_heart": 0.2},
            ("FUGC", "breast_2cls"): {"breast_2cls": 0.45, "FUGC": 12.0},
        },
    }
    results = {
        NetworkJob(net, seed).key: {t: {"value": v, "test_value": v / 2} for t, v in scores.items()}
        for seed, nets in values.items()
        for net, scores in nets.items()
    }
    sets = [j.tasks for j in jobs if j.seed == 0]
    table = groups_table(results, sets, [0, 1], registry).set_index("tasks")
    pair = table.loc["FUGC+breast_2cls"]
    assert pair["breast_2cls"] == pytest.approx(
        ((0.88 - 0.8) / 0.8 + (0.45 - 0.5) / 0.5) / 2
    )  # (+0.1 - 0.1) / 2
    assert pair["FUGC"] == pytest.approx(((20 - 18) / 20 + (10 - 12) / 10) / 2)  # (+0.1 - 0.2) / 2
    assert table.loc["breast_2cls", "breast_2cls"] == 0.0 and table.loc["FUGC", "cost"] == 1.0
    assert pd.isna(table.loc["fetal_heart", "fetal_heart"])  # alone 0 in seed 0: no relative gain
    assert pd.isna(table.loc["FUGC+breast_2cls+fetal_heart", "FUGC"])  # not trained
    assert pd.isna(table.loc["breast_2cls", "FUGC"])  # not a member
    test = groups_table(results, sets, [0, 1], registry, "test_value").set_index("tasks")
    assert test.loc["FUGC+breast_2cls", "FUGC"] == pytest.approx(pair["FUGC"])  # halved both
    trained = table.loc[["breast_2cls", "FUGC", "FUGC+breast_2cls"]].reset_index()
    trained.to_csv(tmp_path / "val.csv", index=False)
    read = {c.name: c.scores for c in read_groups_table(tmp_path / "val.csv", registry)}
    assert read["FUGC+breast_2cls"] == pytest.approx(
        {"FUGC": pair["FUGC"], "breast_2cls": pair["breast_2cls"]}
    )
