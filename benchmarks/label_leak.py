"""Does a classification label of the synthetic benchmark leak into the other structures?

    python benchmarks/label_leak.py [--scenes 1200] [--json OUT]

Every scene holds three structures that must not overlap, so their positions depend on each
other. For each classification task, ``--scenes`` scenes are drawn with its label cycled (as the
generator cycles it), with generator 3's layout (blob, texture, lines in that order) and with
generator 4's (the label's structure placed last, see ``sample_scene``); the label is then
predicted from the position and size of each *other* structure alone (gradient-boosted trees,
4-fold cross-validated accuracy, scikit-learn). Chance is 1 / classes; a structure that predicts
the label better lets a task be learnt from, and its head look at, the wrong structure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from report import report

from taskgroup.data.synthetic import CLASS_FACTORS, SECTOR_FACTORS, label_leak
from taskgroup.tasks import load_registry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenes", type=int, default=1200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    registry = load_registry()
    rows = []
    for task in sorted(CLASS_FACTORS):
        factor = CLASS_FACTORS[task]
        v3 = label_leak(registry[task], args.scenes, version=3)
        v4 = label_leak(registry[task], args.scenes, version=4)
        rows.append(
            {
                "task": task,
                "label": factor + (" (sector)" if factor in SECTOR_FACTORS else ""),
                "chance": round(1 / registry[task].num_classes, 3),
                "v3: other structures": " / ".join(f"{s} {a:.2f}" for s, a in v3.items()),
                "v4: other structures": " / ".join(f"{s} {a:.2f}" for s, a in v4.items()),
            }
        )
    report(
        f"label leak: accuracy of each label from the other structures ({args.scenes} scenes)",
        rows,
        args.json,
    )


if __name__ == "__main__":
    main()
