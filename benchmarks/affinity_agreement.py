"""Agreement of the cheap affinity estimators with trained pairwise transfer, and their cost.

    taskgroup affinity --method lookahead gradient pairwise --tasks ... --out RUN
    python benchmarks/affinity_agreement.py RUN [--reference pairwise]

For every method of the affinity run folder RUN: the Spearman rank correlation of its
off-diagonal entries with the reference method's (taskgroup.affinity.report.agreement), the
planted-group separation (synthetic data) and the cost recorded in its meta.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from report import fail, report

from taskgroup.affinity.report import agreement, read_matrix


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--reference", default="pairwise")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    methods = sorted(p.parent.name for p in args.run.glob("*/matrix.csv"))
    if args.reference not in methods:
        fail(f"{args.run}: no {args.reference}/matrix.csv (methods found: {', '.join(methods)})")
    matrices = {m: read_matrix(args.run / m / "matrix.csv").to_numpy() for m in methods}
    rho = agreement(matrices, args.reference).set_index("method")
    rows = []
    for m in methods:
        meta = json.loads((args.run / m / "meta.json").read_text())
        sep = meta.get("planted_separation", {})
        cost = meta.get("cost", {})
        rows.append(
            {
                "method": m,
                f"spearman vs {args.reference}": round(float(rho.spearman[m]), 2) if m in rho.index else "-",
                "pairs": int(rho.pairs[m]) if m in rho.index else "-",
                "planted gap (sd)": round(sep["gap_sd"], 2) if "gap_sd" in sep else "-",
                "wall s": round(cost.get("wall_seconds", float("nan")), 0),
                "trainings": cost.get("trainings", "-"),
            }
        )
    report(f"affinity estimators against {args.reference} ({args.run})", rows, args.json)


if __name__ == "__main__":
    main()
