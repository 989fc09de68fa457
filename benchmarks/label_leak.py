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
import math
from pathlib import Path

import numpy as np
from report import report
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import cross_val_score

from taskgroup.data.synthetic import (
    CLASS_FACTORS,
    LABEL_TRIES,
    SCANNERS,
    SECTOR_FACTORS,
    TASK_FACTORS,
    sample_scene,
    structure_of,
    visible_region,
)
from taskgroup.tasks import load_registry


def geometry(scene) -> dict[str, list[float]]:
    """Where each structure lies and how big it is, in shares of the image."""
    height, width = scene.scanner.size
    b, p, ln = scene.blob, scene.patch, scene.lines
    mid = (np.array(ln.tail) + np.array(ln.head)) / 2
    return {
        "blob": [b.cx / width, b.cy / height, b.a / width],
        "texture": [p.cx / width, p.cy / height, p.half_length / width],
        "lines": [mid[0] / width, mid[1] / height, math.dist(ln.tail, ln.head) / width],
    }


def leak(task: str, registry, layout: dict, scenes: int) -> dict[str, float]:
    spec, factor = registry[task], CLASS_FACTORS[task]
    scanner = SCANNERS[spec.clinical_group]
    region = visible_region(scanner)
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for i in range(scenes):
        c = i % spec.num_classes
        rows.append(geometry(sample_scene(rng, scanner, region, i, {factor: c}, **layout)))
        labels.append(c)
    own = TASK_FACTORS[task].structure
    return {
        s: float(
            cross_val_score(
                HistGradientBoostingClassifier(max_iter=60), np.array([r[s] for r in rows]), labels, cv=4
            ).mean()
        )
        for s in ("blob", "texture", "lines")
        if s != own
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenes", type=int, default=1200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    registry = load_registry()
    rows = []
    for task in sorted(CLASS_FACTORS):
        factor = CLASS_FACTORS[task]
        v3 = leak(task, registry, {}, args.scenes)
        v4 = leak(task, registry, {"last": structure_of(factor), "tries": LABEL_TRIES}, args.scenes)
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
