"""Issue 24's first criterion on a pairwise affinity run: within- and across-group transfer.

    python benchmarks/pairwise_truth.py RUN [--json OUT]

``RUN`` is a ``taskgroup affinity --method pairwise`` folder on the synthetic benchmark (e.g.
``--set data.synthetic_version=5 --set affinity.trained_steps=120``). From the networks of its
job queue (``RUN/jobs.db``; nothing is trained), each target's relative gain with each source
over the target alone (higher is better), on validation (the matrix ``RUN/pairwise`` reports)
and on the held-out test split at the same step, and per split: the mean gain of the pairs
within a planted group and across groups, the share of across-group pairs with a negative gain,
and the planted gap in standard deviations of the across-group gains. The criterion: gap at
least +2 sd, within above 0, across below 0 with at least a third of the across pairs negative.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import optuna
from report import fail, report

from taskgroup.affinity.report import planted_separation, read_matrix
from taskgroup.data.synthetic import planted_labels
from taskgroup.metrics.summary import relative_gain
from taskgroup.tasks import load_registry
from taskgroup.training.jobs import NetworkJob, job_results, sqlite_url


def split_matrix(results: dict, tasks: list[str], registry, key: str) -> np.ndarray:
    """A[i, j]: target j's gain with source i over j alone, on ``key`` (value: val, test_value)."""
    out = np.full((len(tasks), len(tasks)), np.nan)
    for j, target in enumerate(tasks):
        alone = results.get(NetworkJob((target,)).key, {}).get(target, {}).get(key)
        if alone is None or not math.isfinite(alone) or alone == 0:
            continue
        better = registry[target].primary_metric.higher_is_better
        for i, source in enumerate(tasks):
            if i == j:
                out[i, j] = 0.0
                continue
            value = results.get(NetworkJob((source, target)).key, {}).get(target, {}).get(key)
            if value is not None and math.isfinite(value):
                out[i, j] = relative_gain(value, alone, better)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    db = args.run / "jobs.db"
    if not db.is_file() or not (args.run / "pairwise" / "matrix.csv").is_file():
        fail(f"{args.run}: not a finished pairwise affinity run (no jobs.db or pairwise/matrix.csv)")
    tasks = list(read_matrix(args.run / "pairwise" / "matrix.csv").index)
    registry = load_registry()
    url = sqlite_url(db)
    names = [s.study_name for s in optuna.get_all_study_summaries(url) if s.study_name.startswith("affinity")]
    if not names:
        fail(f"{db}: no affinity queue in it")
    results: dict = {}
    for name in names:
        results.update(job_results(optuna.load_study(study_name=name, storage=url)))
    labels = planted_labels(tasks)
    same = np.equal.outer(labels, labels)
    off = ~np.eye(len(tasks), dtype=bool)
    rows = []
    for split, key in (("val", "value"), ("test", "test_value")):
        matrix = split_matrix(results, tasks, registry, key)
        finite = np.isfinite(matrix) & off
        across = matrix[finite & ~same]
        sep = planted_separation(np.where(np.isfinite(matrix), matrix, 0.0), labels, tasks)
        rows.append(
            {
                "split": split,
                "pairs": int(finite.sum()),
                "within_mean": round(float(matrix[finite & same].mean()), 4),
                "across_mean": round(float(across.mean()), 4),
                "across_negative": f"{int((across < 0).sum())} of {across.size}",
                "gap_sd": round(sep["gap_sd"], 2),
                "misplaced": len(sep["misplaced"]),
            }
        )
    report(f"pairwise transfer of {len(tasks)} tasks, {args.run}", rows, args.json)


if __name__ == "__main__":
    main()
