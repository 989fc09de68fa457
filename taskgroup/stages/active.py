"""``taskgroup search --method active``: the active search of :mod:`taskgroup.grouping.active`
run against an oracle, resumable, with its artefacts (issue 27).

    <out>/measured.csv      every set the oracle measured, in order (``tasks`` and one gain
                            column per member): what a rerun resumes from, without asking again
    <out>/trainings.csv     the sets trained, in order: ``round``, ``tasks``, ``error_before``
                            (the surrogate's mean absolute error on the set before it was measured)
    <out>/predicted.csv     every set and member: ``tasks``, ``task``, ``predicted``, ``std``,
                            ``measured`` (1: the gain is the measured one)
    <out>/proposals/active-b{K}.yaml   the exact selection for each budget, measured gains where
                            trained and predicted elsewhere, with its predicted mean gain and
                            95 % interval (from joint posterior samples) in the header
    <out>/active.png        predicted against measured gain for the sets not trained (table
                            oracle: the table knows them)

Oracles: ``table`` (``--groups-table FULL.csv``: a set's row is revealed only when the search
asks for it). ``engine`` (trainings through the job queue) is not built yet: it is refused with
a clear error. The folder is locked while the search writes it; each round's sets are written
before the next round starts, so a killed search loses at most the round it was in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console

from taskgroup.affinity.report import read_matrix
from taskgroup.config import SearchConfig
from taskgroup.errors import ConfigError, DataError
from taskgroup.files import atomic_write_text
from taskgroup.grouping.active import (
    ActiveResult,
    CheapFeatures,
    Round,
    TableOracle,
    TaskSet,
    active_search,
    key,
)
from taskgroup.grouping.select import Candidate, read_groups_table, select_milp
from taskgroup.groupings import Grouping
from taskgroup.plotting import pyplot
from taskgroup.runtime import lock_folder
from taskgroup.tasks import TaskRegistry


@dataclasses.dataclass
class ActiveOutcome:
    out: Path
    result: ActiveResult
    proposals: dict[float, tuple[Grouping, float, float, float]]  # budget -> grouping, mean, lo, hi


def read_cheap(runs: Sequence[Path], tasks: Sequence[str]) -> CheapFeatures:
    """Every ``<run>/<method>/matrix.csv`` of the affinity runs, cut to ``tasks``."""
    matrices = {}
    for run in runs:
        found = sorted(Path(run).glob("*/matrix.csv"))
        if not found:
            raise DataError(f"{run}: no <method>/matrix.csv (a taskgroup affinity folder?)")
        for path in found:
            frame = read_matrix(path)
            missing = [t for t in tasks if t not in frame.index or t not in frame.columns]
            if missing:
                raise DataError(f"{path}: no row or column for the table's task(s) {', '.join(missing)}")
            name = path.parent.name if len(runs) == 1 else f"{Path(run).name}/{path.parent.name}"
            matrices[name] = frame.loc[list(tasks), list(tasks)].to_numpy(dtype=float)
    return CheapFeatures(tuple(tasks), matrices)


def _read_measured(path: Path, pool: set[TaskSet]) -> dict[TaskSet, dict[str, float]]:
    if not path.exists():
        return {}
    frame = pd.read_csv(path)
    out = {}
    for line, row in enumerate(frame.to_dict("records"), start=2):
        members = key(str(row["tasks"]).split("+"))
        if members not in pool:
            raise DataError(f"{path}, line {line}: the set {'+'.join(members)} is not in the groups table")
        out[members] = {t: float(row[t]) for t in members}
    return out


def _write_measured(path: Path, measured: dict[TaskSet, dict[str, float]], tasks: Sequence[str]) -> None:
    rows = [{"tasks": "+".join(s), **{t: g.get(t) for t in tasks}} for s, g in measured.items() if len(s) > 1]
    atomic_write_text(path, pd.DataFrame(rows, columns=["tasks", *tasks]).to_csv(index=False))


def run_active(
    cfg: SearchConfig,
    registry: TaskRegistry,
    out: Path,
    groups_table: Path | None,
    affinity_runs: Sequence[Path] = (),
    console: Console | None = None,
) -> ActiveOutcome:
    console = console or Console()
    if cfg.oracle == "engine":
        raise ConfigError(
            "search.oracle=engine: the engine oracle (trainings through the job queue) is not built "
            "yet; use --oracle table with --groups-table FULL.csv"
        )
    if groups_table is None:
        raise ConfigError("--method active with the table oracle needs --groups-table FULL.csv")
    table = read_groups_table(Path(groups_table), registry)
    if not table:
        raise DataError(f"{groups_table}: the groups table has no rows")
    tasks = sorted({t for c in table for t in c.tasks})
    have = {key(c.tasks) for c in table}
    # every task alone is the reference of a gain: 0 by definition, cost 1 when the table lacks it
    table += [Candidate((t,), {t: 0.0}) for t in tasks if (t,) not in have]
    oracle = TableOracle(table)
    cheap = read_cheap(affinity_runs, tasks) if affinity_runs else CheapFeatures(tuple(tasks))
    out = Path(out)
    with lock_folder(out):
        (out / "proposals").mkdir(parents=True, exist_ok=True)
        measured_file, trainings_file = out / "measured.csv", out / "trainings.csv"
        earlier = _read_measured(measured_file, set(oracle.pool))
        history = (
            pd.read_csv(trainings_file).to_dict("records") if trainings_file.exists() and earlier else []
        )
        if earlier:
            console.print(f"resuming: {len(earlier)} set(s) measured earlier, not asked again")
        known = dict(earlier)
        first_round = 1 + max((int(r["round"]) for r in history), default=0)

        def record(done: Round) -> None:  # each round on disk before the next one starts
            known.update(done.gains)
            number = first_round + len(history_rounds)
            history_rounds.append(done)
            for s, error in zip(done.sets, done.errors, strict=True):
                history.append({"round": number, "tasks": "+".join(s), "error_before": error})
            _write_measured(measured_file, known, tasks)
            atomic_write_text(trainings_file, pd.DataFrame(history).to_csv(index=False))
            console.print(
                f"round {number}: trained {len(done.sets)} set(s), error before {done.error_before:.4f}; "
                f"{sum(len(s) > 1 for s in known)} of {cfg.trainings} trainings spent"
            )

        history_rounds: list[Round] = []
        result = active_search(
            oracle,
            cheap,
            trainings=cfg.trainings,
            batch=cfg.batch,
            budgets=cfg.budgets,
            samples=cfg.samples,
            start_pairs=cfg.start_pairs,
            seed=cfg.seed,
            measured=earlier,
            progress=record,
        )
        mean, std = result.surrogate.predict()
        rows = []
        for s in oracle.pool:
            for t in s:
                if s in result.measured:
                    rows.append(
                        {
                            "tasks": "+".join(s),
                            "task": t,
                            "predicted": result.measured[s][t],
                            "std": 0.0,
                            "measured": 1,
                        }
                    )
                else:
                    i = result.surrogate.row_of[(s, t)]
                    rows.append(
                        {"tasks": "+".join(s), "task": t, "predicted": mean[i], "std": std[i], "measured": 0}
                    )
        atomic_write_text(out / "predicted.csv", pd.DataFrame(rows).to_csv(index=False))
        proposals = _proposals(result, cfg, tasks, out)
        _plot(result, {key(c.tasks): c.scores for c in table}, out / "active.png")
    for budget, (grouping, m, lo, hi) in proposals.items():
        console.print(
            f"active-b{budget:g}: {len(grouping.groups)} network(s), predicted mean gain {m:+.4f} "
            f"(95 % {lo:+.4f} to {hi:+.4f})"
        )
    return ActiveOutcome(out, result, proposals)


def _proposals(result: ActiveResult, cfg: SearchConfig, tasks: Sequence[str], out: Path):
    """The exact selection per budget on measured-or-predicted gains, with the posterior
    interval of its mean served gain (200 joint samples; measured gains fixed)."""
    surrogate = result.surrogate
    table = result.table()
    position = {key(c.tasks): i for i, c in enumerate(table)}
    draws = surrogate.sample(np.random.default_rng(cfg.seed), 200)
    found = {}
    for budget in cfg.budgets:
        selection = select_milp(table, budget, list(tasks), higher_is_better=True)
        if selection is None:
            continue
        served = {t: key(table[c].tasks) for t, c in selection.served.items()}

        def value(t: str, s: TaskSet, draw: np.ndarray) -> float:
            if s in result.measured or len(s) == 1:
                return table[position[s]].scores[t]
            return float(draw[surrogate.row_of[(s, t)]])

        totals = np.array([np.mean([value(t, s, d) for t, s in served.items()]) for d in draws])
        mean = float(np.mean([table[c].scores[t] for t, c in selection.served.items()]))
        lo, hi = (float(x) for x in np.percentile(totals, [2.5, 97.5]))
        networks = selection.networks(table)
        grouping = Grouping(f"active-b{budget:g}", {f"g{k + 1}": g for k, g in enumerate(networks)})
        header = (
            f"# taskgroup search: active (budget {budget:g}; {sum(len(s) > 1 for s in result.measured)} "
            f"sets trained); predicted mean gain {mean:+.4f}, 95 % interval {lo:+.4f} to {hi:+.4f}\n"
        )
        atomic_write_text(out / "proposals" / f"active-b{budget:g}.yaml", header + grouping.to_yaml())
        found[budget] = (grouping, mean, lo, hi)
    return found


def _plot(result: ActiveResult, truth: dict[TaskSet, dict[str, float]], path: Path) -> None:
    """Predicted against measured gain of the members of the sets not trained."""
    mean, std = result.surrogate.predict()
    rows = [(i, truth[s][t]) for i, (s, t) in enumerate(result.surrogate.rows) if s not in result.measured]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    if rows:
        x = np.array([truth_value for _, truth_value in rows])
        y = np.array([mean[i] for i, _ in rows])
        e = np.array([1.96 * std[i] for i, _ in rows])
        ax.errorbar(x, y, yerr=e, fmt="o", ms=3, alpha=0.5, elinewidth=0.5)
        span = [min(x.min(), y.min()), max(x.max(), y.max())]
        ax.plot(span, span, "k--", lw=0.8)
    ax.set_xlabel("measured gain (table)")
    ax.set_ylabel("predicted gain (95 % band)")
    ax.set_title(f"sets not trained ({len(rows)} member gains)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
