"""Active search on exhaustive tables (issue 27, "Done means" 1): how well is every task set's
gain predicted from a few chosen trainings, and how good is the selection made from it?

    python benchmarks/active_search.py [--seeds 5] [--tables truth standley] [--json OUT]

No training: each table is an oracle that reveals a set's measured gains only when asked
(:class:`taskgroup.grouping.active.TableOracle`).

- ``truth``: the project's truth table (``benchmarks/truth_table``: 255 sets of 8 tasks, one
  seed), learnt on its validation gains, at most 51 sets trained (batch 4); cheap features: the
  four affinity estimators committed beside it;
- ``standley``: Standley et al.'s four settings (``tests/data/standley``: 31 sets of 5 tasks;
  a gain is the relative loss improvement over the task's full-size single-task network), at
  most 12 sets trained (batch 2); no cheap features.

Compared, on the same tables and seeds:

- ``active``: the surrogate and its Thompson-sampling acquisition (half the trainings on random
  pairs first);
- ``random``: the same surrogate fitted on as many sets drawn at random;
- ``HOA``: every pair trained, each larger set's member gain the mean of its pair gains
  (Standley et al.'s higher-order approximation; uses all the pairs: 28 of the truth table's
  sets, 10 of Standley's);
- each cheap estimator alone (the truth table): a member's gain ranked by the mean affinity from
  its partners (a ranking only, so no selection);
- ``ceiling``: the surrogate fitted on 80 % of the sets at random (what the table's noise lets a
  model of this form reach).

Printed per table and method (mean and spread over seeds): the mean over tasks of the Spearman
correlation between predicted and measured gains on the sets *not* trained; the share of those
gains inside the 95 % band; and for budgets 2-5 networks, the *regret* of the exact selection
made on the method's table (measured gains where trained, predicted elsewhere): the realised
*test* gain of the exact optimum (the selection on the full validation table) minus the
selection's, per task (0: the optimum's networks; a gain is a relative improvement, so 0.01 is
one point per task). A share of the optimum's gain is not used: Standley's optima at budget 2
gain almost nothing over TS, so a share of them is noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from report import fail, report
from scipy import stats

from taskgroup.affinity.report import read_matrix
from taskgroup.grouping.active import (
    ActiveResult,
    CheapFeatures,
    GainSurrogate,
    TableOracle,
    TaskSet,
    active_search,
    key,
)
from taskgroup.grouping.select import Candidate, read_network_table, select_milp

HERE = Path(__file__).resolve().parent
TRUTH = HERE / "truth_table"
STANDLEY = HERE.parent / "tests" / "data" / "standley"
BUDGETS = (2, 3, 4, 5)


def truth_tables() -> tuple[list[Candidate], list[Candidate], CheapFeatures]:
    meta = json.loads((TRUTH / "meta.json").read_text())
    tasks = sorted(meta["tasks"])

    def read(split: str) -> list[Candidate]:
        frame = pd.read_csv(TRUTH / f"{split}.csv")
        rows = []
        for row in frame.to_dict("records"):
            members = key(row["tasks"].split("+"))
            rows.append(Candidate(members, {t: float(row[t]) for t in members}))
        return rows

    affinity = {
        path.parent.name: read_matrix(path).loc[tasks, tasks].to_numpy()
        for path in sorted((TRUTH / "affinity").glob("*/matrix.csv"))
    }
    return read("val"), read("test"), CheapFeatures(tuple(tasks), affinity)


def standley_table(name: str) -> list[Candidate]:
    """Member gains: the relative loss improvement over the full-size single-task network (the
    half-size ones left out)."""
    rows = [c for c in read_network_table(STANDLEY / f"{name}.txt") if not c.name.startswith("half:")]
    alone = {c.tasks[0]: c.scores[c.tasks[0]] for c in rows if len(c.tasks) == 1}
    return [Candidate(key(c.tasks), {t: (alone[t] - c.scores[t]) / alone[t] for t in c.tasks}) for c in rows]


def realised(table: list[Candidate], test: dict[TaskSet, dict[str, float]], tasks, budget) -> float:
    """The test gain (sum over tasks) of the exact selection on ``table``."""
    selection = select_milp(table, budget, tasks, higher_is_better=True)
    return float(sum(test[key(table[c].tasks)][t] for t, c in selection.served.items()))


def spearman_unmeasured(predict: Callable[[TaskSet, str], float], truth, measured, tasks) -> float:
    rhos = []
    for t in tasks:
        sets = [s for s in truth if t in s and len(s) > 1 and s not in measured]
        predicted, actual = [predict(s, t) for s in sets], [truth[s][t] for s in sets]
        if len(sets) > 3 and len(set(predicted)) > 1:
            rhos.append(stats.spearmanr(predicted, actual).statistic)
    return float(np.mean(rhos)) if rhos else float("nan")


def surrogate_scores(result: ActiveResult, truth, test, tasks, optimum) -> dict[str, float]:
    mean, std = result.surrogate.predict()
    row = result.surrogate.row_of
    inside = [
        abs(mean[row[(s, t)]] - truth[s][t]) <= 1.96 * std[row[(s, t)]]
        for s in truth
        if len(s) > 1 and s not in result.measured
        for t in s
    ]
    out = {
        "spearman": spearman_unmeasured(lambda s, t: mean[row[(s, t)]], truth, result.measured, tasks),
        "inside 95%": float(np.mean(inside)),
    }
    table = result.table()
    for b in BUDGETS:
        out[f"b{b}"] = (optimum[b] - realised(table, test, tasks, b)) / len(tasks)
    return out


def fitted(pool, cheap, truth, chosen) -> ActiveResult:
    measured = {s: dict(truth[s]) for s in truth if len(s) == 1 or s in chosen}
    return ActiveResult(measured, [], GainSurrogate(pool, cheap).fit(measured))


def run_table(name, val, test, cheap, trainings, batch, seeds) -> list[dict]:
    truth = {key(c.tasks): dict(c.scores) for c in val}
    test_gains = {key(c.tasks): dict(c.scores) for c in test}
    tasks = sorted({t for s in truth for t in s})
    pool = TableOracle(val).pool
    multi = [s for s in pool if len(s) > 1]
    optimum = {b: realised(val, test_gains, tasks, b) for b in BUDGETS}
    found: dict[str, list[dict[str, float]]] = {}
    seconds = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        active = active_search(TableOracle(val), cheap, trainings=trainings, batch=batch, seed=seed)
        seconds.append(time.perf_counter() - start)
        found.setdefault("active", []).append(surrogate_scores(active, truth, test_gains, tasks, optimum))
        chosen = {multi[i] for i in rng.choice(len(multi), trainings, replace=False)}
        found.setdefault("random", []).append(
            surrogate_scores(fitted(pool, cheap, truth, chosen), truth, test_gains, tasks, optimum)
        )
        ceiling = {multi[i] for i in rng.choice(len(multi), int(0.8 * len(multi)), replace=False)}
        found.setdefault("ceiling (80 % trained)", []).append(
            surrogate_scores(fitted(pool, cheap, truth, ceiling), truth, test_gains, tasks, optimum)
        )
    # deterministic references: HOA from every pair, each cheap estimator alone
    pairs = {s for s in truth if len(s) == 2}

    def hoa(s: TaskSet, t: str) -> float:
        return float(np.mean([truth[key((t, u))][t] for u in s if u != t]))

    hoa_table = [Candidate(s, truth[s] if len(s) <= 2 else {t: hoa(s, t) for t in s}) for s in pool]
    found["HOA (all pairs)"] = [
        {
            "spearman": spearman_unmeasured(hoa, truth, pairs, tasks),
            **{
                f"b{b}": (optimum[b] - realised(hoa_table, test_gains, tasks, b)) / len(tasks)
                for b in BUDGETS
            },
        }
    ]
    index = {t: i for i, t in enumerate(cheap.tasks)}
    for estimator, matrix in cheap.affinity.items():

        def incoming(s: TaskSet, t: str, m=matrix) -> float:
            return float(np.mean([m[index[u], index[t]] for u in s if u != t]))

        found[f"{estimator} alone"] = [{"spearman": spearman_unmeasured(incoming, truth, set(), tasks)}]
    rows = []
    for method, runs in found.items():
        row: dict[str, object] = {
            "table": name,
            "method": method,
            "trained": _trained(method, trainings, len(pairs), len(multi)),
        }
        for column in ("spearman", "inside 95%", *[f"b{b}" for b in BUDGETS]):
            values = [r[column] for r in runs if column in r and np.isfinite(r[column])]
            row[column] = _spread(values)
        rows.append(row)
    rows.append(
        {
            "table": name,
            "method": f"active: {statistics.mean(seconds):.1f} s per search",
            "trained": "",
            **dict.fromkeys(rows[0].keys() - {"table", "method", "trained"}, ""),
        }
    )
    return rows


def _trained(method: str, trainings: int, pairs: int, multi: int) -> str:
    if method.startswith("ceiling"):
        return str(int(0.8 * multi))
    if method.startswith("HOA"):
        return str(pairs)
    if method.endswith("alone"):
        return "0"
    return str(trainings)


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--tables", nargs="+", default=["truth", "standley"], choices=["truth", "standley"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.seeds < 2:
        fail("--seeds: at least 2 (the spread needs two)")
    rows = []
    if "truth" in args.tables:
        val, test, cheap = truth_tables()
        rows += run_table("truth table (8 tasks)", val, test, cheap, 51, 4, args.seeds)
    if "standley" in args.tables:
        for setting in ("results", "results_large", "results_small_data", "results_alt"):
            val, test = standley_table(setting), standley_table(f"{setting}_test")
            tasks = tuple(sorted({t for c in val for t in c.tasks}))
            rows += run_table(f"Standley {setting}", val, test, CheapFeatures(tasks), 12, 2, args.seeds)
    report(
        "active search on exhaustive tables: Spearman and 95 % band on the sets not trained; "
        "b2-b5: regret per task on test",
        rows,
        args.json,
    )


if __name__ == "__main__":
    main()
