"""How well `taskgroup search` recovers the planted groups, and whether data scale helps it.

    python benchmarks/search_quality.py RUN [RUN ...] [--pairwise PW_RUN] [--json OUT]

For each affinity run folder (a `taskgroup affinity --out` on the synthetic benchmark): the
search with the default config (configs/tiny.yaml) on each of its estimators, and per method the
adjusted Rand index (to the planted groups) of that method's highest-gain proposal, the best
ARI over its sweep, and the ARI of the proposal the search calls best, and the predicted mean gain of the planted
partition next to that proposal's (the search's own predictor, as configured);
with the affinity's measured cost (meta.json) and the search's wall time.

With ``--pairwise``: the data-scale check. Trained pairwise transfer (the relative gain of
target j trained with i over j alone) is the reference; each cheap estimator predicts the gain
of j in the pair {i, j} by the predictor with the data-scale terms off, with shrinkage
(n0 = the median training-set size), with the negative-transfer penalty (beta = 1) and with
both; the Spearman correlation of each with the trained gains over all ordered pairs (the cheap
estimators are the other runs given; pairs whose trained gain is undefined are left out) says
whether the terms bring the prediction closer to trained transfer. Also printed: the Spearman
correlation of each target's mean trained gain with its training-set size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from report import fail, report
from rich.console import Console
from scipy.stats import spearmanr

from taskgroup.affinity.report import read_matrix
from taskgroup.config import load_run_config
from taskgroup.data.synthetic import planted_groups
from taskgroup.grouping import GainPredictor
from taskgroup.stages.search import run_search, training_sizes
from taskgroup.tasks import load_registry


def recovery(runs, cfg, registry) -> list[dict]:
    rows = []
    for run in runs:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = run_search(cfg.search, registry, Path(tmp), [run], console=Console(quiet=True))
            seconds = time.perf_counter() - start
        ranking = result.ranking
        if "ari" not in ranking:
            fail(f"{run}: not measured on the synthetic benchmark (no planted groups)")
        for estimator, part in ranking.groupby("estimator", sort=True):
            meta = json.loads((Path(run) / str(estimator) / "meta.json").read_text())
            best = result.best[str(estimator)]
            for method, mine in part.groupby("method", sort=False):
                if method in ("ts", "au"):
                    continue
                rows.append(
                    {
                        "run": Path(run).name,
                        "estimator": estimator,
                        "affinity s": round(meta["cost"]["wall_seconds"], 1),
                        "method": method,
                        "ARI (top gain)": round(float(mine.iloc[0]["ari"]), 3),
                        "ARI (best of sweep)": round(float(mine["ari"].max()), 3),
                        "chosen": "yes" if best.method == method else "",
                        "search s": round(seconds, 1),
                    }
                )
            rows.append(
                {
                    "run": Path(run).name,
                    "estimator": estimator,
                    "affinity s": round(meta["cost"]["wall_seconds"], 1),
                    "method": f"best = {best.name}",
                    "ARI (top gain)": round(float(part.loc[part.name == best.name, "ari"].iloc[0]), 3),
                    "ARI (best of sweep)": "",
                    "chosen": "",
                    "search s": round(seconds, 1),
                }
            )
            # the planted partition scored by the same predictor: below the chosen proposal, the
            # predictor itself prefers another grouping, whatever the search method
            predictor = result.predictors[str(estimator)]
            planted = [[t for t in group if t in predictor.index] for group in planted_groups().values()]
            rows.append(
                {
                    "run": Path(run).name,
                    "estimator": estimator,
                    "affinity s": "",
                    "method": (
                        f"predicted gain: planted {predictor.total([g for g in planted if g]):.4f}, "
                        f"best {best.mean:.4f}"
                    ),
                    "ARI (top gain)": 1.0,
                    "ARI (best of sweep)": "",
                    "chosen": "",
                    "search s": "",
                }
            )
    return rows


def data_scale(pairwise_run: Path, cheap_runs, registry) -> list[dict]:
    trained = read_matrix(pairwise_run / "pairwise" / "matrix.csv")
    tasks = list(trained.index)
    sizes, _ = training_sizes(pairwise_run, registry, tasks)
    p = trained.to_numpy()
    off = ~np.eye(len(tasks), dtype=bool)
    rows = []
    # a target whose single-task network scored 0 has no relative gain (NaN column): left out
    measured = [j for j in range(len(tasks)) if np.isfinite(p[off[:, j], j]).any()]
    incoming = [np.nanmean(p[off[:, j], j]) for j in measured]
    rho_size = spearmanr(incoming, [sizes[tasks[j]] for j in measured]).statistic
    rows.append(
        {"estimator": "pairwise (trained)", "variant": "mean gain vs size", "spearman": round(rho_size, 3)}
    )
    median = float(np.median(list(sizes.values())))
    variants = {"off": {}, "shrink": {"shrink": median}, "penalty": {"penalty": 1.0}}
    variants["both"] = {**variants["shrink"], **variants["penalty"]}
    for run in cheap_runs:
        for folder in sorted(Path(run).glob("*/matrix.csv")):
            if folder.parent.name == "pairwise":
                continue
            cheap = read_matrix(folder).loc[tasks, tasks].to_numpy()
            for name, terms in variants.items():
                predictor = GainPredictor(cheap, tasks, sizes, **terms)
                predicted = np.array(
                    [
                        [
                            predictor.gains([tasks[i], tasks[j]])[tasks[j]] if i != j else np.nan
                            for j in range(len(tasks))
                        ]
                        for i in range(len(tasks))
                    ]
                )
                rho = spearmanr(predicted[off], p[off], nan_policy="omit").statistic
                rows.append(
                    {
                        "estimator": f"{Path(run).name}/{folder.parent.name}",
                        "variant": name,
                        "spearman": round(rho, 3),
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--pairwise", type=Path, default=None, help="a pairwise affinity run (the reference)")
    parser.add_argument("--config", type=Path, default=Path("configs/tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cfg = load_run_config(args.config, args.overrides)
    registry = load_registry(cfg.registry)
    rows = recovery(args.runs, cfg, registry)
    report("search: ARI to the planted groups per estimator and method", rows, args.json)
    if args.pairwise is not None:
        cheap = [r for r in args.runs if r.resolve() != args.pairwise.resolve()]
        scale = data_scale(args.pairwise, cheap, registry)
        report(
            "data scale: Spearman of predicted pair gains with trained pairwise gains",
            scale,
            args.json.with_suffix(".scale.json") if args.json else None,
        )


if __name__ == "__main__":
    main()
