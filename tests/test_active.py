"""Active search (issue 27): the surrogate recovers a known additive-plus-pair model, its
uncertainty is calibrated where the model is right, the table oracle reveals only what was asked,
and a stopped search resumes without asking again."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from taskgroup.grouping.active import (
    CheapFeatures,
    GainSurrogate,
    TableOracle,
    active_search,
    key,
)
from taskgroup.grouping.select import Candidate

TASKS = tuple(f"t{k}" for k in range(6))


def toy_table(seed: int = 0, noise: float = 0.02) -> tuple[list[Candidate], np.ndarray]:
    """Every set of 6 tasks with member gains ``g(S, t) = mean_{u in S, u != t} B[u, t] +
    c_t (|S| - 1) / 5 + noise``: the model family of the surrogate, with known pair effects ``B``."""
    rng = np.random.default_rng(seed)
    pair = rng.normal(0.0, 0.1, size=(len(TASKS), len(TASKS)))
    size = rng.normal(0.0, 0.05, size=len(TASKS))
    rows = []
    for k in range(1, len(TASKS) + 1):
        for members in itertools.combinations(range(len(TASKS)), k):
            scores = {}
            for t in members:
                if k == 1:
                    scores[TASKS[t]] = 0.0
                    continue
                partners = [u for u in members if u != t]
                value = pair[partners, t].mean() + size[t] * (k - 1) / (len(TASKS) - 1)
                scores[TASKS[t]] = float(value + rng.normal(0.0, noise))
            rows.append(Candidate(tuple(TASKS[i] for i in members), scores))
    return rows, pair


def fitted_on(table: list[Candidate], fraction: float, seed: int) -> tuple[GainSurrogate, dict, set]:
    rng = np.random.default_rng(seed)
    multi = [key(c.tasks) for c in table if len(c.tasks) > 1]
    chosen = {multi[i] for i in rng.choice(len(multi), int(fraction * len(multi)), replace=False)}
    measured = {key(c.tasks): dict(c.scores) for c in table if key(c.tasks) in chosen}
    surrogate = GainSurrogate([key(c.tasks) for c in table], CheapFeatures(TASKS)).fit(measured)
    return surrogate, measured, chosen


def test_the_surrogate_recovers_an_additive_plus_pair_model():
    """Fitted on 60 % of the sets (noise sd 0.02), it predicts the others' noiseless gains."""
    table, _ = toy_table(seed=1)
    exact = {key(c.tasks): c.scores for c in toy_table(seed=1, noise=0.0)[0]}
    surrogate, _, chosen = fitted_on(table, 0.6, seed=0)
    mean, _ = surrogate.predict()
    held = [(i, exact[s][t]) for i, (s, t) in enumerate(surrogate.rows) if s not in chosen]
    predicted, realised = np.array([mean[i] for i, _ in held]), np.array([g for _, g in held])
    assert stats.spearmanr(predicted, realised).statistic > 0.9  # measured 0.93
    assert np.abs(predicted - realised).mean() < 0.015  # measured 0.013; the gains' sd is 0.07
    assert surrogate.model.alpha_**-0.5 == pytest.approx(0.02, rel=0.25)  # the noise it estimates


def test_the_95_percent_band_holds_about_95_percent_of_held_out_gains():
    inside = []
    for seed in range(4):
        table, _ = toy_table(seed=seed, noise=0.03)
        truth = {key(c.tasks): c.scores for c in table}
        surrogate, _, chosen = fitted_on(table, 0.5, seed=seed)
        mean, std = surrogate.predict()
        inside += [
            abs(mean[i] - truth[s][t]) <= 1.96 * std[i]
            for i, (s, t) in enumerate(surrogate.rows)
            if s not in chosen
        ]
    assert 0.9 <= np.mean(inside) <= 0.99, np.mean(inside)


class Sealed:
    """An oracle that holds the table out of reach and records every set it gave away."""

    def __init__(self, table: list[Candidate]) -> None:
        inner = TableOracle(table)
        self.pool, self.tasks = inner.pool, inner.tasks
        self._measure = inner.measure
        self.asked: list[tuple[str, ...]] = []

    def measure(self, sets):
        self.asked += [key(s) for s in sets]
        return self._measure(sets)


def test_the_search_learns_only_what_it_asked_for_and_asks_each_set_once():
    table, _ = toy_table(seed=2)
    truth = {key(c.tasks): c.scores for c in table}
    oracle = Sealed(table)
    result = active_search(oracle, CheapFeatures(TASKS), trainings=14, batch=3, samples=4, seed=0)
    assert len(oracle.asked) == 14 == len(set(oracle.asked))
    assert all(len(s) > 1 for s in oracle.asked)  # a task alone is the reference, never asked
    multi = {s for s in result.measured if len(s) > 1}
    assert multi == set(oracle.asked)
    assert all(result.measured[s] == truth[s] for s in multi)
    assert [s for r in result.rounds for s in r.sets] == oracle.asked
    # the final table keeps every measured gain and predicts the rest
    served = {key(c.tasks): c.scores for c in result.table()}
    assert all(served[s] == truth[s] for s in multi)
    assert sum(served[s] != truth[s] for s in truth if s not in multi and len(s) > 1) > 0


def test_a_stopped_search_resumes_without_asking_again():
    table, _ = toy_table(seed=3)
    first = active_search(Sealed(table), CheapFeatures(TASKS), trainings=8, batch=4, samples=4, seed=0)
    again = Sealed(table)
    second = active_search(
        again, CheapFeatures(TASKS), trainings=16, batch=4, samples=4, seed=0, measured=first.measured
    )
    before = {s for s in first.measured if len(s) > 1}
    assert len(again.asked) == 8 and not before & set(again.asked)
    assert {s for s in second.measured if len(s) > 1} == before | set(again.asked)


def test_cheap_affinity_that_tells_the_truth_makes_the_unmeasured_pairs_predictable():
    """With the true pair effects as a cheap estimator, the surrogate ranks the pairs it never
    measured; without it, it cannot (their pair terms are at the prior)."""
    table, pair = toy_table(seed=4, noise=0.005)
    truth = {key(c.tasks): c.scores for c in table}
    pool = [key(c.tasks) for c in table]
    # every set within t0..t3 and within t2..t5: the pairs between t0, t1 and t4, t5 never train
    left, right = set(TASKS[:4]), set(TASKS[2:])
    measured = {s: truth[s] for s in pool if len(s) > 1 and (set(s) <= left or set(s) <= right)}
    unseen = {key((a, b)) for a in TASKS[:2] for b in TASKS[4:]}
    rho = {}
    for name, cheap in (
        ("none", CheapFeatures(TASKS)),
        ("true", CheapFeatures(TASKS, {"oracle": pair})),
    ):
        surrogate = GainSurrogate(pool, cheap).fit(measured)
        mean, _ = surrogate.predict()
        rows = [(i, truth[s][t]) for i, (s, t) in enumerate(surrogate.rows) if s in unseen]
        rho[name] = stats.spearmanr([mean[i] for i, _ in rows], [g for _, g in rows]).statistic
    assert rho["true"] > 0.9 and rho["true"] > rho["none"] + 0.2, rho


@pytest.mark.parametrize("bad", [[], [("t0", "t1")]])
def test_fitting_needs_two_measured_gains(bad):
    table, _ = toy_table()
    surrogate = GainSurrogate([key(c.tasks) for c in table], CheapFeatures(TASKS))
    measured = {s: {s[0]: 0.1} for s in bad}
    with pytest.raises(ValueError, match="at least two measured gains"):
        surrogate.fit(measured)


TRUTH_TABLE = Path(__file__).resolve().parents[1] / "benchmarks" / "truth_table"


def test_taskgroup_search_active_writes_its_artefacts_and_resumes(tmp_path, capsys):
    """`taskgroup search --method active` on the committed truth table: the artefacts issue 27
    names, and a rerun with more trainings asks only for new sets."""
    from taskgroup.cli import main

    out = tmp_path / "active"
    args = ["search", str(TRUTH_TABLE / "affinity"), "--method", "active", "--groups-table"]
    args += [str(TRUTH_TABLE / "val.csv"), "--batch", "4", "--budget", "2", "--out", str(out)]
    assert main([*args, "--trainings", "8"]) == 0
    first = pd.read_csv(out / "trainings.csv")
    assert len(first) == 8 and first["round"].tolist() == [1] * 4 + [2] * 4
    predicted = pd.read_csv(out / "predicted.csv")
    assert len(predicted) == 8 * 2**7  # every set of the 8 tasks, one row per member
    assert predicted["measured"].sum() == 8 + sum(len(s.split("+")) for s in first["tasks"])
    assert (predicted.loc[predicted.measured == 0, "std"] > 0).all()
    assert (out / "proposals" / "active-b2.yaml").exists() and (out / "active.png").exists()
    assert main([*args, "--trainings", "12"]) == 0
    again = pd.read_csv(out / "trainings.csv")
    assert again["tasks"].tolist()[:8] == first["tasks"].tolist() and len(set(again["tasks"])) == 12
    assert "resuming: 8 set(s) measured earlier" in capsys.readouterr().out


def test_the_engine_oracle_is_refused_until_it_exists(tmp_path, capsys):
    from taskgroup.cli import main

    code = main(["search", "--method", "active", "--oracle", "engine", "--out", str(tmp_path / "a")])
    assert code == 2 and "not built yet" in capsys.readouterr().out.replace("\n", " ")
