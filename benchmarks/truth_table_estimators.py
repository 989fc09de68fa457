"""How well does each affinity estimator predict the exhaustive truth table's realised gains?

    python benchmarks/truth_table_estimators.py [--affinity RUN] [--table benchmarks/truth_table]
        [--json OUT]

``RUN`` is a ``taskgroup affinity`` folder measured on the truth table's tasks and data (one
``<method>/matrix.csv`` per estimator: source rows, target columns, higher = the source helps
the target); by default the committed ``benchmarks/truth_table/affinity``, made by
``taskgroup affinity --data ROOT --tasks <the table's 8 tasks> --out RUN`` (the four default
estimators at ``configs/tiny.yaml``) on the table's generator-5 data. For every estimator and both splits of the table (no training here) it prints the
Spearman correlation of

- ``pairs``: the affinity ``A[u, t]`` against the realised gain of ``t`` trained with ``u``
  (every ordered pair of the table's tasks);
- ``sets``: the estimator's predicted gain of ``t`` in a larger set ``S`` (3 tasks or more),
  the mean incoming affinity ``mean_{u in S, u != t} A[u, t]`` (the higher-order approximation of
  :mod:`taskgroup.grouping.predict` applied to the matrix; the sum ranks a set size's members
  alike and is printed too), against ``t``'s realised gain in ``S``;

beside two references read off the table itself: ``HOA`` (Standley et al. 2020: a member's gain
in ``S`` predicted as the mean of its *realised* pair gains with the other members, the best a
pairwise estimator could do) and, for the test split, the validation table's own gains.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from report import fail, report
from scipy import stats

from taskgroup.affinity.report import read_matrix

TABLE = Path(__file__).resolve().parent / "truth_table"


def member_gains(table: pd.DataFrame) -> dict[tuple[tuple[str, ...], str], float]:
    """(sorted task set, member) -> the member's realised gain, for every set of 2 or more."""
    out = {}
    for row in table.to_dict("records"):
        members = tuple(row["tasks"].split("+"))
        if len(members) < 2:
            continue
        for t in members:
            if pd.notna(row[t]):
                out[(members, t)] = float(row[t])
    return out


def spearman(x: list[float], y: list[float]) -> tuple[float, int]:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan"), len(x)
    return float(stats.spearmanr(x, y).statistic), len(x)


def predictions(gains: dict, matrix: pd.DataFrame | None, combine: str) -> tuple[list, list, list, list]:
    """(pair predictions, pair gains, set predictions, set gains) for one predictor: an
    affinity matrix, or (``matrix`` None) the realised pair gains themselves (HOA)."""
    pair_gain = {(m, t): g for (m, t), g in gains.items() if len(m) == 2}
    pair_x, pair_y, set_x, set_y = [], [], [], []
    for (members, t), g in gains.items():
        partners = [u for u in members if u != t]
        if matrix is not None:
            incoming = [float(matrix.loc[u, t]) for u in partners]
        else:
            keys = [(tuple(sorted((t, u))), t) for u in partners]
            if len(members) == 2 or not all(k in pair_gain for k in keys):
                continue
            incoming = [pair_gain[k] for k in keys]
        value = float(np.sum(incoming) if combine == "sum" else np.mean(incoming))
        if len(members) == 2:
            pair_x.append(value)
            pair_y.append(g)
        else:
            set_x.append(value)
            set_y.append(g)
    return pair_x, pair_y, set_x, set_y


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--affinity", type=Path, default=TABLE / "affinity", help="a taskgroup affinity folder"
    )
    parser.add_argument("--table", type=Path, default=TABLE)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    meta = json.loads((args.table / "meta.json").read_text())
    tasks = list(meta["tasks"])
    matrices = {}
    for path in sorted(args.affinity.glob("*/matrix.csv")):
        try:
            frame = read_matrix(path)
        except ValueError as err:
            fail(str(err))
        missing = sorted(set(tasks) - set(frame.index))
        if missing:
            fail(f"{path}: no row for the table's task(s) {', '.join(missing)}")
        matrices[path.parent.name] = frame.loc[tasks, tasks]
    if not matrices:
        fail(f"{args.affinity}: no <method>/matrix.csv (a taskgroup affinity folder?)")
    tables = {split: pd.read_csv(args.table / f"{split}.csv") for split in ("val", "test")}
    gains = {split: member_gains(t) for split, t in tables.items()}
    rows = []
    for split, g in gains.items():
        predictors: dict[str, tuple[pd.DataFrame | None, str]] = {
            **{f"{m} (mean)": (mat, "mean") for m, mat in matrices.items()},
            **{f"{m} (sum)": (mat, "sum") for m, mat in matrices.items()},
            "HOA (realised pairs)": (None, "mean"),
        }
        for name, (matrix, combine) in predictors.items():
            px, py, sx, sy = predictions(g, matrix, combine)
            rho_pairs, n_pairs = spearman(px, py)
            rho_sets, n_sets = spearman(sx, sy)
            rows.append(
                {
                    "split": split,
                    "estimator": name,
                    "pairs": rho_pairs,
                    "pair_gains": n_pairs,
                    "sets": rho_sets,
                    "set_gains": n_sets,
                }
            )
    # the validation table as a predictor of test: how reproducible the truth itself is
    shared = sorted(set(gains["val"]) & set(gains["test"]))
    for size, label in ((2, "pairs"), (3, "sets")):
        keys = [k for k in shared if (len(k[0]) == 2) == (size == 2)]
        rho, n = spearman([gains["val"][k] for k in keys], [gains["test"][k] for k in keys])
        row = {"split": "test", "estimator": f"val table ({label})", "pairs": float("nan"), "pair_gains": 0}
        row.update({"sets": float("nan"), "set_gains": 0})
        row.update({label: rho, f"{label[:-1]}_gains": n})
        rows.append(row)
    title = (
        f"Spearman with the realised gains: {meta['sets_trained']} of {meta['sets']} task sets of "
        f"{len(tasks)} tasks; affinity {args.affinity}"
    )
    shown = [{k: (f"{v:+.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    report(title, shown, args.json)


if __name__ == "__main__":
    main()
