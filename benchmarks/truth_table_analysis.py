"""What the exhaustive truth table says: planted groups, set sizes, and exact selection on test.

    python benchmarks/truth_table_analysis.py [--table benchmarks/truth_table] [--json OUT]

Reads ``val.csv``, ``test.csv`` and ``meta.json`` written by ``benchmarks/truth_table.py`` (no
training) and prints, on each split:

- the pairs: mean gain of a member with a partner of its own planted group and of another, how
  many of those gains are negative, and the planted gap in standard deviations of all pair gains
  (the figure issue 24 asks of the 27-task pairs, here on the table's tasks);
- the mean member gain by set size (does training with more tasks help?);
- the exact selection (MILP, :func:`taskgroup.grouping.select_milp`) chosen on the *validation*
  table for every budget of networks, with its realised gain on *test* (each task served by the
  network chosen for it on validation), beside TS (0), AU (all tasks in one network), CG (the
  clinical groups cut to the table's tasks) and the planted groups cut to them.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
from report import report

from taskgroup.grouping import select_milp
from taskgroup.grouping.select import read_groups_table
from taskgroup.tasks import load_registry

TABLE = Path(__file__).resolve().parent / "truth_table"


def served_gain(
    table: pd.DataFrame, networks: list[tuple[str, ...]], served: dict[str, tuple[str, ...]]
) -> float:
    """Mean over tasks of the gain of each task in the network that serves it (NaN when one of
    the networks is not in the table: a table exported before every set was trained)."""
    rows = table.set_index("tasks")
    keys = {task: "+".join(sorted(net)) for task, net in served.items()}
    if any(key not in rows.index for key in keys.values()):
        return float("nan")
    return float(np.mean([rows.loc[key, task] for task, key in keys.items()]))


def partition_gain(table: pd.DataFrame, groups: list[tuple[str, ...]]) -> float:
    return served_gain(table, groups, {t: g for g in groups for t in g})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--table", type=Path, default=TABLE)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    registry = load_registry()
    meta = json.loads((args.table / "meta.json").read_text())
    tasks = list(meta["tasks"])
    planted = {t: g for g, ids in meta["planted_groups"].items() for t in ids if t in tasks}
    tables = {split: pd.read_csv(args.table / f"{split}.csv") for split in ("val", "test")}
    rows = []
    for split, table in tables.items():
        pairs = table[table["tasks"].str.count(r"\+") == 1]
        within, across = [], []
        for _, row in pairs.iterrows():
            a, b = row["tasks"].split("+")
            for task in (a, b):
                (within if planted[a] == planted[b] else across).append(float(row[task]))
        gains = within + across
        sizes = {}
        for _, row in table.iterrows():
            members = row["tasks"].split("+")
            if len(members) > 1:
                sizes.setdefault(len(members), []).extend(float(row[t]) for t in members)
        rows.append(
            {
                "split": split,
                "within mean": f"{statistics.mean(within):+.4f}",
                "across mean": f"{statistics.mean(across):+.4f}",
                "across negative": f"{sum(g < 0 for g in across)}/{len(across)}",
                "planted gap (sd)": f"{(statistics.mean(within) - statistics.mean(across)) / statistics.pstdev(gains):+.2f}",
                **{f"size {k}": f"{statistics.mean(v):+.4f}" for k, v in sorted(sizes.items())},
            }
        )
    report("pairs and set sizes (member gain over alone)", rows, None)
    pool = read_groups_table(args.table / "val.csv", registry)
    clinical = {}
    for t in tasks:
        clinical.setdefault(registry[t].clinical_group, []).append(t)
    references = {
        "TS": [(t,) for t in tasks],
        "AU": [tuple(tasks)],
        "CG": [tuple(ids) for ids in clinical.values()],
        "planted": [tuple(t for t in tasks if planted[t] == g) for g in dict.fromkeys(planted.values())],
    }
    selection_rows = []
    for name, groups in references.items():
        selection_rows.append(
            {
                "grouping": name,
                "networks": len(groups),
                "val gain": f"{partition_gain(tables['val'], groups):+.4f}",
                "test gain": f"{partition_gain(tables['test'], groups):+.4f}",
                "groups": " | ".join("+".join(g) for g in groups),
            }
        )
    for budget in range(1, len(tasks) + 1):
        chosen = select_milp(pool, budget, tasks, higher_is_better=True)
        if chosen is None:
            continue
        networks = chosen.networks(pool)
        served = {t: pool[c].tasks for t, c in chosen.served.items()}
        selection_rows.append(
            {
                "grouping": f"exact selection, budget {budget}",
                "networks": len(networks),
                "val gain": f"{served_gain(tables['val'], networks, served):+.4f}",
                "test gain": f"{served_gain(tables['test'], networks, served):+.4f}",
                "groups": " | ".join("+".join(n) for n in networks),
            }
        )
    report(
        "groupings: chosen on validation, realised on test (mean member gain over TS)",
        selection_rows,
        args.json,
    )


if __name__ == "__main__":
    main()
