"""The comparison report: per task, per clinical group and task type, and negative transfer.

From the long table of served scores (grouping, seed, task, split, metric, value; see
:func:`taskgroup.compare.run.served_scores`), on one split: the held-out test split when the data
has one (each task's network still chosen on validation, Standley et al. 2020), else validation.
Every table carries a ``split`` column and ``report.md`` says which split it reports; with a test
split, ``per_task_val.csv`` and ``per_group_val.csv`` hold the same tables on validation.

- ``per_task_metrics.csv``: every official metric of every task, mean and standard deviation
  over seeds, per grouping;
- ``per_task.csv`` / ``.md``: the task's primary metric, and its *relative gain* over TS of the
  same seed, direction-aware (``(v - v_TS) / |v_TS|``, sign flipped for MRE and HD), averaged
  over seeds with a t interval; undefined (NaN) where TS scores exactly 0, and then left out of
  every mean (``n_undefined`` counts them); ``diff`` is the direction-aware absolute change;
- ``per_group.csv`` / ``.md``: delta_m as in the M2DINO paper (the mean relative gain over the
  tasks of a scope: all tasks, each clinical group, each task type) per seed, then its mean over
  seeds with a t interval (``confidence``), ``p_seeds`` the paired t test of the grouping
  against TS over seeds (a one-sample t test of the per-seed delta_m, which is already a
  difference to the same seed's TS), and ``p_tasks`` a Wilcoxon signed-rank test over the
  scope's tasks of their seed-mean gains (scipy);
- ``negative_transfer.csv`` / ``.md``: every (grouping, task) with its training-set size and
  gain, flagged ``negative`` (mean gain below 0) and ``significant`` (the whole interval below
  0), and the Spearman correlation of gain with training-set size per grouping;
- plots: ``delta_m.png`` (delta_m per scope and grouping with intervals), ``gains.png`` (tasks x
  groupings, ordered by training-set size), ``negative_transfer.png`` (gain vs training-set
  size).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from scipy import stats

from taskgroup.groupings import Grouping
from taskgroup.metrics.summary import relative_gain
from taskgroup.plotting import pyplot, symmetric_limit
from taskgroup.tasks import TaskRegistry

REFERENCE = "ts"
TYPES = ("seg", "cls", "det", "reg")
GROUP_COLUMNS = [
    "grouping",
    "scope",
    "name",
    "n_tasks",
    "n_undefined",
    "n_floored",
    "delta_m",
    "ci_low",
    "ci_high",
    "seeds",
    "p_seeds",
    "p_tasks",
    "negative_tasks",
]


def _finite(values: Sequence[float]) -> np.ndarray:
    """The finite values (a gain undefined for some task or seed is left out of every statistic)."""
    x = np.asarray(values, dtype=float)
    return x[np.isfinite(x)]


def t_interval(values: Sequence[float], confidence: float) -> tuple[float, float]:
    """Student-t interval of the mean of the finite ``values`` (NaN with fewer than 2)."""
    x = _finite(values)
    if len(x) < 2:
        return math.nan, math.nan
    se = x.std(ddof=1) / math.sqrt(len(x))
    if se == 0:
        return float(x.mean()), float(x.mean())
    low, high = stats.t.interval(confidence, len(x) - 1, loc=x.mean(), scale=se)
    return float(low), float(high)


def p_ttest(values: Sequence[float]) -> float:
    x = _finite(values)
    if len(x) < 2 or x.std(ddof=1) == 0:
        return math.nan
    return float(stats.ttest_1samp(x, 0.0).pvalue)


def p_wilcoxon(values: Sequence[float]) -> float:
    x = _finite(values)
    if len(x) < 2 or not np.any(x != 0):
        return math.nan
    return float(stats.wilcoxon(x).pvalue)


def _mean(values: Sequence[float]) -> float:
    x = _finite(values)
    return float(x.mean()) if len(x) else math.nan


def floored_gain(value: float, reference: float, higher_is_better: bool, floor: float) -> float:
    """Relative gain over ``reference`` whose denominator is at least ``floor`` for scores where
    higher is better (DSC, IoU, AUC, F1, accuracy, MCC: at most 1): a task that TS barely learns
    (a Dice of 0.002) would otherwise dominate every mean with a gain of x100. Errors in pixels
    (MRE, HD) keep the plain relative change."""
    if not higher_is_better or abs(reference) >= floor:
        return relative_gain(value, reference, higher_is_better)
    return (value - reference) / floor


def scores_on(scores: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of one split of a long score table (a table without a ``split`` column is
    validation, as compare wrote it before test splits)."""
    if "split" not in scores.columns:
        if split != "val":
            raise ValueError(f"the scores hold no {split!r} rows (no split column: validation only)")
        return scores
    return scores[scores["split"] == split]


def report_split(scores: pd.DataFrame, has_test: bool) -> tuple[str, str]:
    """The split a report is computed on, and the line saying so: test when the data has a test
    split and every served (grouping, seed, task) has test scores, else validation (a network
    trained before test scoring has none; it is named)."""
    if not has_test:
        return "val", "reported on: val (the data has no test split; networks chosen on val)"
    primary = scores[scores["primary"]]
    keys = ["grouping", "seed", "task"]
    served = primary[primary["split"] == "val"][[*keys, "network_key"]]
    tested = primary[primary["split"] == "test"][keys]
    lacking = served.merge(tested, on=keys, how="left", indicator=True)
    lacking = lacking[lacking["_merge"] == "left_only"]
    if lacking.empty:
        return "test", "reported on: test (networks chosen on val)"
    networks = sorted(set(lacking["network_key"]))
    return "val", (
        f"reported on: val (networks chosen on val): {len(networks)} served network(s) have no test "
        f"scores (trained before test scoring), e.g. {networks[0]}; remove them from the cache to "
        "retrain and report on test"
    )


def gains_frame(scores: pd.DataFrame, registry: TaskRegistry, floor: float = 0.0) -> pd.DataFrame:
    """Per grouping, seed and task: the primary value, TS's, the relative gain (denominator
    floored, see :func:`floored_gain`) and the direction-aware difference (TS rows have gain 0).
    ``scores`` hold one split (:func:`scores_on`)."""
    if "split" in scores.columns and scores["split"].nunique() > 1:
        raise ValueError("gains_frame takes the scores of one split (see scores_on)")
    primary = scores[scores["primary"]].copy()
    ref = primary[primary["grouping"] == REFERENCE].set_index(["seed", "task"])["value"]
    if ref.empty:
        raise ValueError("the scores hold no TS rows: every gain is relative to TS")
    rows = []
    for r in primary.itertuples(index=False):
        up = registry[r.task].primary_metric.higher_is_better
        base = float(ref.loc[(r.seed, r.task)])
        rows.append(
            {
                "grouping": r.grouping,
                "seed": r.seed,
                "task": r.task,
                "network": r.network,
                "network_size": r.network_size,
                "value": r.value,
                "ts": base,
                "gain": floored_gain(r.value, base, up, floor),
                "diff": (r.value - base) if up else (base - r.value),
                "floored": bool(up and abs(base) < floor),
            }
        )
    return pd.DataFrame(rows)


def per_task_metrics(scores: pd.DataFrame) -> pd.DataFrame:
    grouped = scores.groupby(["grouping", "task", "metric"], sort=False)["value"]
    return grouped.agg(mean="mean", std="std", seeds="count").reset_index()


def per_task(
    gains: pd.DataFrame, registry: TaskRegistry, sizes: Mapping[str, int], confidence: float
) -> pd.DataFrame:
    rows = []
    for (grouping, task), g in gains.groupby(["grouping", "task"], sort=False):
        spec = registry[task]
        low, high = t_interval(g["gain"].tolist(), confidence)
        rows.append(
            {
                "grouping": grouping,
                "task": task,
                "type": spec.kind.short,
                "clinical_group": spec.clinical_group,
                "n_train": int(sizes.get(task, 0)),
                "metric": spec.primary_metric.name,
                "higher_is_better": spec.primary_metric.higher_is_better,
                "mean": float(g["value"].mean()),
                "std": float(g["value"].std(ddof=1)) if len(g) > 1 else math.nan,
                "seeds": len(g),
                "ts_mean": float(g["ts"].mean()),
                "gain": _mean(g["gain"].tolist()),
                "gain_low": low,
                "gain_high": high,
                "diff": float(g["diff"].mean()),
                "floored": bool(g["floored"].any()),
                "network": g["network"].mode().iloc[0],
                "network_size": int(g["network_size"].mode().iloc[0]),
            }
        )
    return pd.DataFrame(rows)


def scopes(tasks: Sequence[str], registry: TaskRegistry) -> list[tuple[str, str, list[str]]]:
    """(scope, name, tasks): all tasks, each clinical group, each task type present."""
    out = [("all", "all", list(tasks))]
    for group in dict.fromkeys(registry[t].clinical_group for t in tasks):
        out.append(("clinical_group", group, [t for t in tasks if registry[t].clinical_group == group]))
    for kind in TYPES:
        members = [t for t in tasks if registry[t].kind.short == kind]
        if members:
            out.append(("type", kind, members))
    return out


def per_group(gains: pd.DataFrame, registry: TaskRegistry, confidence: float) -> pd.DataFrame:
    rows = []
    tasks = list(dict.fromkeys(gains["task"]))
    for grouping, g in gains[gains["grouping"] != REFERENCE].groupby("grouping", sort=False):
        for scope, name, members in scopes(tasks, registry):
            part = g[g["task"].isin(members)]
            per_seed = part.groupby("seed")["gain"].apply(lambda x: _mean(x.tolist())).tolist()
            task_means = part.groupby("task")["gain"].apply(lambda x: _mean(x.tolist()))
            low, high = t_interval(per_seed, confidence)
            rows.append(
                {
                    "grouping": grouping,
                    "scope": scope,
                    "name": name,
                    "n_tasks": int(np.isfinite(task_means).sum()),
                    "n_undefined": int((~np.isfinite(task_means)).sum()),
                    "n_floored": int(part.groupby("task")["floored"].any().sum()),
                    "delta_m": _mean(per_seed),
                    "ci_low": low,
                    "ci_high": high,
                    "seeds": len(per_seed),
                    "p_seeds": p_ttest(per_seed),
                    "p_tasks": p_wilcoxon(task_means.tolist()),
                    "negative_tasks": int((task_means < 0).sum()),
                }
            )
    return pd.DataFrame(rows, columns=GROUP_COLUMNS)


def negative_transfer(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every non-TS (grouping, task) with its size and gain, flagged; and per grouping the
    Spearman correlation of gain with training-set size."""
    rows = table[table["grouping"] != REFERENCE][
        [
            "grouping",
            "task",
            "type",
            "clinical_group",
            "n_train",
            "network_size",
            "gain",
            "gain_low",
            "gain_high",
        ]
    ].copy()
    rows["negative"] = rows["gain"] < 0
    rows["significant"] = rows["gain_high"] < 0
    rows = rows.sort_values(["grouping", "n_train"], kind="stable").reset_index(drop=True)
    corr = []
    for grouping, g in rows.groupby("grouping", sort=False):
        ok = g[np.isfinite(g["gain"])]
        varies = len(ok) > 2 and ok["n_train"].nunique() > 1 and ok["gain"].nunique() > 1
        rho = stats.spearmanr(ok["n_train"], ok["gain"]).statistic if varies else math.nan
        corr.append(
            {
                "grouping": grouping,
                "negative": int(g["negative"].sum()),
                "significant": int(g["significant"].sum()),
                "tasks": len(g),
                "spearman_gain_vs_size": float(rho),
            }
        )
    return rows, pd.DataFrame(corr)


# -- plots -------------------------------------------------------------------------------------


def plot_delta_m(frame: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    labels = list(dict.fromkeys(zip(frame["scope"], frame["name"], strict=True)))
    groupings = list(dict.fromkeys(frame["grouping"]))
    width = 0.8 / max(len(groupings), 1)
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.3 * len(labels) * len(groupings))), 4.5))
    x = np.arange(len(labels))
    for k, grouping in enumerate(groupings):
        g = frame[frame["grouping"] == grouping].set_index(["scope", "name"]).reindex(labels)
        mean = g["delta_m"].to_numpy(float)
        err = np.vstack([mean - g["ci_low"].to_numpy(float), g["ci_high"].to_numpy(float) - mean])
        at = x + (k - (len(groupings) - 1) / 2) * width
        ax.bar(at, mean, width, label=grouping)
        ax.errorbar(
            at,
            mean,
            yerr=np.nan_to_num(err),
            fmt="none",
            ecolor="black",
            capsize=2,
            lw=0.8,
        )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, [n for _, n in labels], rotation=45, ha="right")
    ax.set_ylabel("delta_m: mean relative gain vs TS")
    ax.legend(fontsize=8)
    ax.set_title("Relative gain over task-specific training (intervals over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gains(table: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    part = table[table["grouping"] != REFERENCE]
    grid = part.pivot(index="task", columns="grouping", values="gain")
    sizes = part.drop_duplicates("task").set_index("task")["n_train"]
    grid = grid.loc[sizes.sort_values().index, list(dict.fromkeys(part["grouping"]))]
    fig, ax = plt.subplots(figsize=(2 + 1.1 * grid.shape[1], 1.5 + 0.28 * grid.shape[0]))
    limit = symmetric_limit(grid)
    image = ax.imshow(grid.to_numpy(float), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=30, ha="right")
    ax.set_yticks(range(grid.shape[0]), [f"{t} ({sizes[t]})" for t in grid.index], fontsize=7)
    fig.colorbar(image, ax=ax, label="gain vs TS (red: negative)")
    ax.set_title("Gain per task (rows by training-set size)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_negative(rows: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7, 4.2))
    markers = dict(zip(TYPES, "osD^", strict=True))
    colours = []
    for k, (grouping, g) in enumerate(rows.groupby("grouping", sort=False)):
        colours.append((grouping, f"C{k}"))
        for kind, part in g.groupby("type"):
            ax.scatter(
                part["n_train"], part["gain"], color=f"C{k}", marker=markers.get(kind, "o"), s=22, alpha=0.8
            )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training-set size (log)")
    ax.set_ylabel("relative gain vs TS")
    ax.set_title("Negative transfer against data scale")
    handles = [Line2D([], [], color=c, marker="o", ls="", label=g) for g, c in colours]
    handles += [Line2D([], [], color="0.4", marker=m, ls="", label=k) for k, m in markers.items()]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- writing and printing ----------------------------------------------------------------------


def _markdown(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, floatfmt=".3f")


OVERALL_COLUMNS = [
    "grouping",
    "networks",
    "n_tasks",
    "delta_m",
    "ci_low",
    "ci_high",
    "p_seeds",
    "p_tasks",
    "negative_tasks",
]


def report_tables(
    scores: pd.DataFrame,
    registry: TaskRegistry,
    sizes: Mapping[str, int],
    confidence: float,
    floor: float,
    split: str,
) -> dict[str, pd.DataFrame]:
    """The report's tables on one split, each with a last column ``split``."""
    gains = gains_frame(scores_on(scores, split), registry, floor)
    tasks_table = per_task(gains, registry, sizes, confidence)
    negative, correlation = negative_transfer(tasks_table)
    tables = {
        "gains": gains,
        "per_task_metrics": per_task_metrics(scores_on(scores, split)),
        "per_task": tasks_table,
        "per_group": per_group(gains, registry, confidence),
        "negative_transfer": negative,
        "size_correlation": correlation,
    }
    for frame in tables.values():
        frame["split"] = split
    return tables


def write_report(
    out: Path,
    scores: pd.DataFrame,
    registry: TaskRegistry,
    sizes: Mapping[str, int],
    groupings: Sequence[Grouping],
    confidence: float,
    floor: float = 0.0,
    split: str = "val",
    reported_on: str | None = None,
) -> dict[str, pd.DataFrame]:
    """Write the report on ``split`` (``reported_on``: the line of report.md saying which split
    and why, see :func:`report_split`); on test, the per-task and per-group tables on
    validation too (``*_val.csv``, and delta_m over all tasks in report.md)."""
    out = Path(out)
    report = report_tables(scores, registry, sizes, confidence, floor, split)
    tasks_table, groups_table = report["per_task"], report["per_group"]
    negative, correlation = report["negative_transfer"], report["size_correlation"]
    networks = pd.DataFrame(
        [{"grouping": g.name, "networks": len(g.groups), "tasks": len(g.tasks)} for g in groupings]
    )
    report["groupings"] = networks
    for name, frame in report.items():
        frame.to_csv(out / f"{name}.csv", index=False)
    for name in ("per_task", "per_group", "negative_transfer"):
        (out / f"{name}.md").write_text(_markdown(report[name]) + "\n")
    on_val: list[str] = []
    if split != "val":
        val = report_tables(scores, registry, sizes, confidence, floor, "val")
        for name in ("per_task", "per_group"):
            val[name].to_csv(out / f"{name}_val.csv", index=False)
            report[f"{name}_val"] = val[name]
        val_overall = val["per_group"][val["per_group"]["scope"] == "all"].merge(networks, on="grouping")
        on_val = [
            "\n## All tasks on val (where the networks were chosen; optimistic)\n",
            _markdown(val_overall[OVERALL_COLUMNS]),
        ]
    overall = groups_table[groups_table["scope"] == "all"].merge(networks, on="grouping")
    text = [
        "# Comparison against task-specific training (TS)\n",
        f"{reported_on or f'reported on: {split}'}\n",
        f"Relative gain of each task's primary metric over TS of the same seed (for scores where "
        f"higher is better, against at least {floor:g}: n_floored tasks); intervals "
        f"{confidence:.0%} over seeds.\n",
        f"## All tasks ({split})\n",
        _markdown(overall[OVERALL_COLUMNS]),
        *on_val,
        f"\n## Per clinical group and task type ({split})\n",
        _markdown(groups_table[groups_table["scope"] != "all"]),
        f"\n## Negative transfer against training-set size ({split})\n",
        _markdown(correlation),
        "",
        _markdown(negative[negative["negative"]])
        if negative["negative"].any()
        else "No task has a negative mean gain in any grouping.",
        "",
    ]
    (out / "report.md").write_text("\n".join(text))
    if not groups_table.empty:
        plot_delta_m(groups_table, out / "delta_m.png")
        plot_gains(tasks_table, out / "gains.png")
        plot_negative(negative, out / "negative_transfer.png")
    return report


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if not np.isfinite(value) else f"{value:+.{digits}f}"


def print_report(console: Console, report: Mapping[str, pd.DataFrame], groupings: Sequence[Grouping]) -> None:
    groups = report["per_group"]
    split = str(groups["split"].iloc[0]) if "split" in groups and len(groups) else "val"
    chosen = " (networks chosen on val)" if split != "val" else ""
    table = Table(title=f"delta_m on {split}{chosen}: mean relative gain over TS (interval over seeds)")
    for column in ("grouping", "networks", "all", "interval", "p (seeds)", "p (tasks)", *TYPES, "negative"):
        table.add_column(column, justify="left" if column == "grouping" else "right")
    sizes = {g.name: len(g.groups) for g in groupings}
    for grouping in dict.fromkeys(groups["grouping"]):
        g = groups[groups["grouping"] == grouping].set_index(["scope", "name"])
        row = g.loc[("all", "all")]
        kinds = [_fmt(g.loc[("type", k), "delta_m"]) if ("type", k) in g.index else "" for k in TYPES]
        table.add_row(
            grouping,
            str(sizes.get(grouping, "")),
            _fmt(row["delta_m"]),
            f"[{_fmt(row['ci_low'])}, {_fmt(row['ci_high'])}]",
            "-" if not np.isfinite(row["p_seeds"]) else f"{row['p_seeds']:.3f}",
            "-" if not np.isfinite(row["p_tasks"]) else f"{row['p_tasks']:.3f}",
            *kinds,
            f"{int(row['negative_tasks'])}/{int(row['n_tasks'] + row['n_undefined'])}",
        )
    console.print(table)
