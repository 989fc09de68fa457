"""``taskgroup search``: grouping proposals from affinity run folders and/or a table of trained
groups, ranked next to TS, CG and AU by the same predictor (issue 6).

    <out>/proposals/<name>.yaml   each proposal, a grouping ``taskgroup train --grouping`` runs
    <out>/ranking.csv, .md        method, estimator, groups, networks, cost, predicted gain per
                                  task and mean (TS, CG and AU scored the same way), ARI to the
                                  planted groups on the synthetic benchmark; ``mean_gain_on``
                                  says what the gain is (predicted, val, table) and, with trained
                                  groups on data with a test split, ``test_mean_gain`` the
                                  realised test gain of every proposal whose networks are trained
    <out>/heatmap_<est>.png       the affinity, ordered and boxed by the best proposal
    <out>/pareto_<est>.png        predicted gain vs networks: the NSGA-II front and every proposal
    <out>/search.db               the Optuna studies (resumable); <out>/meta.json what was done

Every affinity method folder of a run (``<run>/<method>/matrix.csv``) is one *estimator*; each
estimator gets its own predictor, partitions, candidate pool, selections and Optuna studies.
Proposals are ranked and chosen on predicted or validation gains only; the held-out test gain is
reported beside them (Standley et al. 2020: choose on validation, report on test).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from taskgroup.affinity.report import plot_heatmap
from taskgroup.config import RunConfig, SearchConfig, from_mapping, hide_password, load_yaml, to_mapping
from taskgroup.data.synthetic import planted_labels
from taskgroup.errors import ConfigError, DataError
from taskgroup.grouping.predict import GainPredictor
from taskgroup.grouping.proposals import (
    REFERENCES,
    Proposal,
    baselines,
    best_proposals,
    clinical_groups,
    front_knee,
    gain_front,
    ranking_frame,
    safe_label,
    search_estimator,
)
from taskgroup.grouping.select import read_groups_table, select_milp
from taskgroup.groupings import Grouping
from taskgroup.matrices import AffinityMatrix
from taskgroup.plotting import pyplot
from taskgroup.tasks import TaskRegistry

if TYPE_CHECKING:  # it trains networks: imported where the trained search runs
    from taskgroup.stages.trained_gains import TrainedGains

__all__ = [
    "Proposal",
    "SearchResult",
    "best_proposals",
    "front_knee",
    "gain_front",
    "read_estimators",
    "read_groups_table",
    "run_search",
    "training_sizes",
]


@dataclasses.dataclass
class SearchResult:
    proposals: list[Proposal]
    ranking: pd.DataFrame
    best: dict[str, Proposal]  # estimator -> best proposal (highest predicted mean gain)
    out: Path
    predictors: dict[str, GainPredictor] = dataclasses.field(default_factory=dict)  # per estimator


# -- inputs ---------------------------------------------------------------------------------------
def read_estimators(runs: Sequence[Path], wanted: Sequence[str] = ()) -> dict[str, AffinityMatrix]:
    """Every ``<run>/<method>/matrix.csv`` as ``method`` (``<run name>/method`` when several runs
    are given); ``wanted`` keeps those methods only."""
    found: dict[str, AffinityMatrix] = {}
    for run in runs:
        run = Path(run)
        if not run.is_dir():
            raise DataError(f"{run}: no such affinity run folder")
        folders = sorted(p.parent for p in run.glob("*/matrix.csv"))
        if not folders:
            raise DataError(f"{run}: no <method>/matrix.csv inside (is it a `taskgroup affinity` output?)")
        for folder in folders:
            if wanted and folder.name not in wanted:
                continue
            name = folder.name if len(runs) == 1 else f"{run.name}/{folder.name}"
            try:
                found[name] = AffinityMatrix.from_csv(folder / "matrix.csv")
            except ValueError as exc:
                raise DataError(str(exc)) from None
    if not found:
        raise DataError(f"none of the estimators {', '.join(wanted)} found in {', '.join(map(str, runs))}")
    return found


def training_sizes(
    run_dir: Path, registry: TaskRegistry, tasks: Sequence[str]
) -> tuple[dict[str, int], bool]:
    """Training examples per task of the data the affinity run measured on (its config.yaml),
    and whether that data is the synthetic benchmark (its ``truth.yaml`` names the planted groups)."""
    from taskgroup.training.data import train_sizes

    config = run_dir / "config.yaml"
    if not config.exists():
        raise DataError(f"{config}: missing; the per-task training-set sizes come from the run's data")
    cfg = from_mapping(RunConfig, load_yaml(config), str(config))
    sizes, root = train_sizes(cfg.data, registry, tasks)
    return sizes, (root / "truth.yaml").exists()


def search_trained(
    run_cfg: RunConfig,
    registry: TaskRegistry,
    tasks: Sequence[str],
    out: Path,
    storage: str,
    start: Sequence[Sequence[Sequence[str]]],
) -> tuple[Proposal, dict[str, Any], TrainedGains]:
    """The trained objective: a TPE study whose trials train their partitions (networks in
    ``out/trained``), started from ``start``; its best partition (chosen on validation) with its
    realised validation gains and, when the data has a test split, its realised test gains; and
    the :class:`~taskgroup.stages.trained_gains.TrainedGains` that measured them."""
    from taskgroup.grouping.trained_search import trained_search
    from taskgroup.runtime import configure_cpu
    from taskgroup.stages.trained_gains import TrainedGains
    from taskgroup.training.pretrain import resolve_pretrained

    cfg = run_cfg.search
    configure_cpu(run_cfg.train.threads)
    gains = TrainedGains(resolve_pretrained(run_cfg), registry, tasks, out / "trained")
    result = trained_search(
        gains, cfg.max_groups, cfg.trained_trials, storage, "trained", cfg.seed, start, cfg.pruner
    )
    realised = {t: g for group in result.best for t, g in gains.gains(group).items()}
    realised = {t: (g if np.isfinite(g) else 0.0) for t, g in realised.items()}
    proposal = Proposal(
        "trained-optuna",
        "optuna-trained",
        "trained",
        tuple(tuple(g) for g in result.best),
        realised,
        float(len(result.best)),
        f"trials={cfg.trained_trials},pruner={cfg.pruner}",
        gains.served_test_gains(result.best),
    )
    info = {
        "trials": result.trials,
        "pruned": result.pruned,
        "distinct_partitions": result.distinct,
        "best_value": result.best_value,
        "chosen_on": "val",
        "test_mean_gain": _or_none(proposal.test_mean),
        "test_source": gains.test_source,
        "networks_trained": gains.trained,
        "pruner": cfg.pruner,
    }
    return proposal, info, gains


def _or_none(value: float) -> float | None:
    """A number for meta.json: None when not finite (an unknown test gain)."""
    return float(value) if np.isfinite(value) else None


def plot_pareto(proposals: Sequence[Proposal], pareto, estimator: str, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    if pareto:
        ax.step(
            [n for _, n, _ in pareto],
            [v for v, _, _ in pareto],
            where="post",
            color="black",
            label="NSGA-II Pareto front",
        )
    for method in sorted({p.method for p in proposals}):
        mine = [p for p in proposals if p.method == method]
        ax.scatter([p.networks for p in mine], [p.mean for p in mine], label=method, s=18)
    ax.set_xlabel("networks (compute)")
    ax.set_ylabel("predicted mean gain")
    ax.set_title(f"{estimator}: predicted gain vs compute", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_ranking(console: Console, ranking: pd.DataFrame, top: int) -> None:
    tested = "test_mean_gain" in ranking and bool(ranking["test_mean_gain"].notna().any())
    table = Table(
        title="taskgroup search: top proposals per estimator (mean gain: predicted, or val for trained"
        + ("; test: realised on the held-out test split, not used to rank)" if tested else ")")
    )
    columns = ["estimator", "method", "name", "networks", "mean_gain"]
    columns += (["test_mean_gain"] if tested else []) + (["ari"] if "ari" in ranking else [])
    numbers = ("mean_gain", "test_mean_gain", "ari")
    for c in columns:
        table.add_column(c, justify="left" if c in ("estimator", "method", "name") else "right")
    for _, part in ranking.groupby("estimator", sort=True):
        shown = pd.concat([part.head(top), part[part.method.isin(REFERENCES)]]).drop_duplicates("name")
        for _, row in shown.iterrows():
            table.add_row(
                *[
                    ("-" if not np.isfinite(row[c]) else f"{row[c]:+.4f}") if c in numbers else str(row[c])
                    for c in columns
                ]
            )
        table.add_section()
    console.print(table)


def run_search(
    cfg: SearchConfig,
    registry: TaskRegistry,
    out: Path,
    affinity_runs: Sequence[Path] = (),
    groups_table: Path | None = None,
    console: Console | None = None,
    run_cfg: RunConfig | None = None,
) -> SearchResult:
    console = console or Console()
    out = Path(out)
    if not affinity_runs and groups_table is None:
        raise ConfigError(
            "taskgroup search needs affinity run folders and/or a groups table (--groups-table)"
        )
    (out / "proposals").mkdir(parents=True, exist_ok=True)
    storage = cfg.storage or f"sqlite:///{(out / 'search.db').resolve()}"
    proposals: list[Proposal] = []
    predictors: dict[str, GainPredictor] = {}
    meta: dict[str, Any] = {"config": to_mapping(cfg), "estimators": {}, "storage": hide_password(storage)}
    tasks: list[str] = []
    synthetic = False
    paretos = {}
    start = time.perf_counter()
    if affinity_runs:
        matrices = read_estimators(list(affinity_runs), cfg.estimators)
        tasks = list(next(iter(matrices.values())).tasks)
        for name, matrix in matrices.items():
            unknown = [t for t in matrix.tasks if t not in registry]
            if unknown:
                raise DataError(f"estimator {name}: unknown task {unknown[0]!r} in its matrix")
            if list(matrix.tasks) != tasks:
                raise DataError(
                    f"estimator {name}: its matrix covers other tasks than {next(iter(matrices))}'s"
                )
        sizes, synthetic = training_sizes(Path(affinity_runs[0]), registry, tasks)
        meta["train_sizes"] = sizes
        for name, matrix in matrices.items():
            t0 = time.perf_counter()
            predictor = GainPredictor.from_config(matrix.values.copy(), tasks, sizes, cfg)
            predictors[name] = predictor
            found, info, pareto = search_estimator(name, predictor, cfg, registry, storage)
            proposals += baselines(predictor, registry, name) + found
            paretos[name] = pareto
            meta["estimators"][name] = {**info, "seconds": time.perf_counter() - t0}
    if groups_table is not None:
        pool = read_groups_table(Path(groups_table), registry)
        if not pool:
            raise DataError(f"{groups_table}: the groups table has no rows")
        table_tasks = list(dict.fromkeys(t for c in pool for t in c.tasks))
        tasks = tasks or table_tasks
        infeasible = []
        for budget in cfg.budgets:
            chosen = select_milp(pool, budget, table_tasks, higher_is_better=True)
            if chosen is None:
                infeasible.append(budget)
                continue
            gains = {t: float(pool[c].scores[t]) for t, c in chosen.served.items()}
            proposals.append(
                Proposal(
                    f"table-select-b{budget:g}",
                    "select",
                    "table",
                    tuple(chosen.networks(pool)),
                    gains,
                    chosen.cost,
                    f"budget={budget:g}",
                )
            )
        if infeasible:
            # every task must be served: the cheapest cover may exceed a budget
            message = (
                f"{groups_table}: no selection of its groups serves all {len(table_tasks)} of its tasks "
                f"within the budget(s) {', '.join(f'{b:g}' for b in infeasible)} (--budget / "
                f"search.budgets; its networks cost {min(c.cost for c in pool):g} to "
                f"{max(c.cost for c in pool):g} each)"
            )
            if not proposals and cfg.trained_trials == 0:
                raise DataError(message + ": nothing to propose")
            console.print(f"[yellow]{escape(message)}: those budgets are left out[/]")
    if cfg.trained_trials > 0:
        if run_cfg is None:
            raise ConfigError("search.trained_trials needs the run config (model, data, train) to train with")
        t0 = time.perf_counter()
        starts = [
            p.groups
            for p in best_proposals([p for p in proposals if p.is_partition], 0.0, "tolerance").values()
        ]
        trained, info, measured = search_trained(
            run_cfg, registry, tasks, out, storage, [*starts, clinical_groups(registry, tasks)]
        )
        # beside every proposal whose networks the trained search has trained: its realised test
        # gain (each task served by its best network on validation); ranking stays as it was
        for p in proposals:
            if set(p.gains) == set(tasks):
                p.test_gains = measured.served_test_gains(p.groups)
        proposals.append(trained)
        meta["trained"] = {**info, "seconds": time.perf_counter() - t0}
    truth = planted_labels(tasks) if synthetic else None
    # a groups table over other tasks than the affinity is selected but not ranked beside it
    ranked = [p for p in proposals if set(p.gains) == set(tasks)]
    ranking = ranking_frame(ranked, tasks, truth, predictors)
    ranking.to_csv(out / "ranking.csv", index=False)
    per_task = [c for c in ranking.columns if c.startswith(("gain:", "test_gain:"))]
    (out / "ranking.md").write_text(ranking.drop(columns=per_task).to_markdown(index=False, floatfmt="+.4f"))
    best = best_proposals(ranked, cfg.tolerance, cfg.best)
    for p in proposals:
        if p.method in REFERENCES:
            continue
        grouping = Grouping(p.name, {f"g{k + 1}": g for k, g in enumerate(p.groups)})
        text = f"# taskgroup search: {p.method} on {p.estimator} ({p.params or 'defaults'}); predicted mean gain {p.mean:+.4f}\n"
        (out / "proposals" / f"{p.name}.yaml").write_text(text + grouping.to_yaml())
    best_partition: dict[str, Proposal] = {}
    for estimator, predictor in predictors.items():
        mine = [p for p in proposals if p.estimator == estimator]
        # the best proposal boxed; when it overlaps (a selection), the best partition
        boxed = best_proposals(
            [p for p in mine if p.is_partition and (p.method == "au" or p.method not in REFERENCES)],
            cfg.tolerance,
            cfg.best,
        ).get(estimator)
        if boxed is not None:
            best_partition[estimator] = boxed
        boxes = boxed.groups if boxed else None
        plot_heatmap(
            predictor.affinity,
            tasks,
            registry,
            f"{estimator}: {boxed.name if boxed else 'no partition'} boxed",
            out / f"heatmap_{safe_label(estimator)}.png",
            boxes=boxes,
        )
        plot_pareto(mine, paretos.get(estimator), estimator, out / f"pareto_{safe_label(estimator)}.png")
    meta["best"] = {
        e: {
            "name": p.name,
            "mean_gain": p.mean,
            "mean_gain_on": p.gain_source,
            "test_mean_gain": _or_none(p.test_mean),
            "networks": p.networks,
        }
        for e, p in best.items()
    }
    # every task in exactly one network: no choice of network on validation (see taskgroup compare)
    meta["best_partition"] = {
        e: {"name": p.name, "mean_gain": p.mean, "networks": p.networks} for e, p in best_partition.items()
    }
    if truth is not None:
        meta["best_ari"] = {
            e: float(ranking.loc[ranking.name == p.name, "ari"].iloc[0]) for e, p in best.items()
        }
    meta["seconds"] = time.perf_counter() - start
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    print_ranking(console, ranking, cfg.top)
    if truth is not None:
        for e, a in meta["best_ari"].items():
            console.print(f"{e}: best proposal {best[e].name}: ARI to the planted groups {a:+.3f}")
    for e, p in best.items():
        if np.isfinite(p.test_mean):
            console.print(
                f"{e}: best proposal {p.name} chosen on {p.gain_source} (mean gain {p.mean:+.4f}); "
                f"realised on the test split: {p.test_mean:+.4f}"
            )
    return SearchResult(proposals, ranking, best, out, predictors)
