"""Learnability of a training run's tasks (issue 2's calibration of the synthetic benchmark):
each task's primary validation metric against its data-only baseline, with the margin it must
clear (:func:`taskgroup.evaluation.clear_margin`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from taskgroup.config import load_run_config
from taskgroup.data import find_roots, load_index
from taskgroup.data.synthetic import TASK_FACTORS
from taskgroup.evaluation import baseline_scores, learnability
from taskgroup.tasks import load_registry
from taskgroup.training.data import synthetic_root


def calibration_table(run: str | Path, step: int | None = None) -> pd.DataFrame:
    """One row per task of the ``taskgroup train`` run folder ``run`` at ``step`` (default: its
    last evaluation): value, baseline (from the run's own data), gain, margin, clear."""
    run = Path(run)
    cfg = load_run_config(run / "config.yaml")
    registry = load_registry(cfg.registry)
    root = Path(cfg.data.root) if cfg.data.root else synthetic_root(cfg.data, registry)
    roots = find_roots(root)
    if "val" not in roots:
        raise ValueError(f"{root}: the calibration table needs a val/ root (the synthetic benchmark has one)")
    train, val = load_index(roots["train"], registry), load_index(roots["val"], registry)
    metrics = pd.read_csv(run / "metrics.csv")
    metrics = metrics[metrics.split == "val"]  # the baselines are computed on val/
    step = step or int(metrics.step.max())
    last = metrics[metrics.step == step]
    values = {
        t: float(last[(last.task == t) & (last.metric == registry[t].primary_metric.name)].value.iloc[0])
        for t in sorted(set(last.task))
    }
    counts = {t: len(val.records[t]) for t in values}
    out = learnability(values, baseline_scores(train.records, val.records, registry), counts, registry)
    out.insert(1, "planted group", [TASK_FACTORS[t].structure if t in TASK_FACTORS else "" for t in out.task])
    out["step"] = step
    return out


def calibration_markdown(table: pd.DataFrame) -> str:
    """The table as markdown, by task type, with the count of clearly learnt tasks."""
    lines = [
        f"| task | planted group | metric | data-only baseline | value at step {table.step.iloc[0]} "
        "| margin | clearly above |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table.sort_values(["type", "task"]).to_dict("records"):
        fmt = "{:.1f}" if r["metric"] == "mre" else "{:.3f}"
        margin = f"{r['margin']:.0%} lower" if r["metric"] == "mre" else f"+{r['margin']:.3f}"
        lines.append(
            f"| {r['task']} | {r['planted group']} | {r['metric']} | {fmt.format(r['baseline'])} | "
            f"{fmt.format(r['value'])} | {margin} | {'yes' if r['clear'] else '**no**'} |"
        )
    lines.append(f"\n{int(table.clear.sum())} of {len(table)} tasks clearly above their data-only baseline")
    return "\n".join(lines)
