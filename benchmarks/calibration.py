"""Learnability of the synthetic benchmark: every task's validation metric after a training run
against its data-only baseline (issue 2's calibration), as a markdown table.

    python benchmarks/calibration.py RUN [--step N]

RUN is a `taskgroup train` run folder (default config: `taskgroup train --grouping au --out RUN`).
"Clearly above" uses taskgroup.evaluation.clear_margin (two standard errors for accuracy, 0.1 of
DSC/IoU, 20 % of MRE).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from taskgroup.config import load_run_config
from taskgroup.data import load_index
from taskgroup.data.synthetic import TASK_FACTORS
from taskgroup.evaluation import baseline_scores, learnability
from taskgroup.tasks import load_registry
from taskgroup.training import synthetic_root


def table(run: Path, step: int | None = None) -> pd.DataFrame:
    cfg = load_run_config(run / "config.yaml")
    registry = load_registry(cfg.registry)
    root = Path(cfg.data.root) if cfg.data.root else synthetic_root(cfg.data, registry)
    train, val = load_index(root / "train", registry), load_index(root / "val", registry)
    metrics = pd.read_csv(run / "metrics.csv")
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("--step", type=int, default=None)
    args = parser.parse_args()
    out = table(args.run, args.step)
    lines = [
        f"| task | planted group | metric | data-only baseline | value at step {out.step.iloc[0]} | margin | clearly above |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in out.sort_values(["type", "task"]).to_dict("records"):
        fmt = "{:.1f}" if r["metric"] == "mre" else "{:.3f}"
        margin = f"{r['margin']:.0%} lower" if r["metric"] == "mre" else f"+{r['margin']:.3f}"
        lines.append(
            f"| {r['task']} | {r['planted group']} | {r['metric']} | {fmt.format(r['baseline'])} | "
            f"{fmt.format(r['value'])} | {margin} | {'yes' if r['clear'] else '**no**'} |"
        )
    print("\n".join(lines))
    print(f"\n{int(out.clear.sum())} of {len(out)} tasks clearly above their data-only baseline")


if __name__ == "__main__":
    main()
