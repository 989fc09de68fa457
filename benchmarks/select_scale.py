"""Wall time of exact network selection (issue 6: a 27-task, 3000-candidate instance in under
30 s on 2 cores).

    python benchmarks/select_scale.py [--candidates 3000] [--budgets 3 6 9]

Random instances (taskgroup.grouping.random_pool: every task alone plus random groups of 2-7
tasks, all of cost 1) solved by the MILP (scipy.optimize.milp, HiGHS); one row per budget.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from report import report

from taskgroup.grouping import random_pool, select_milp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=27)
    parser.add_argument("--candidates", type=int, default=3000)
    parser.add_argument("--budgets", type=float, nargs="+", default=[3, 6, 9])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    pool = random_pool(np.random.default_rng(args.seed), args.tasks, args.candidates)
    rows = []
    for budget in args.budgets:
        start = time.perf_counter()
        found = select_milp(pool, budget)
        rows.append(
            {
                "tasks": args.tasks,
                "candidates": len(pool),
                "budget": budget,
                "networks": len(found.chosen) if found else "-",
                "total loss": round(found.total, 4) if found else "infeasible",
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
    report("network selection (MILP, HiGHS)", rows)


if __name__ == "__main__":
    main()
