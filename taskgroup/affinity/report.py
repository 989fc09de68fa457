"""What an affinity run writes and prints.

Per method, a folder ``<out>/<method>/`` with:

- ``matrix.csv``: the matrix the method reports (after its correction), rows = source, columns =
  target (the first header cell says ``source \\ target``); the diagonal (a task on itself) is
  kept and listed in ``meta.json`` as excluded from every summary;
- ``<quantity>.csv``: every other quantity measured (raw matrix, cosine, conflict rate ...);
- ``long.parquet``: method, quantity, step, source, target, value, lr, run (which probe run, for
  ``affinity.runs`` > 1) and ``diagonal``, per probe or per trained job;
- ``readout/profiles.csv`` (``profiles_<k>.csv`` for run k > 0): each task's readout profile over
  the channels of the shared feature map;
- ``heatmap.png``: the matrix ordered by hierarchical clustering (scipy, average linkage on the
  symmetrised matrix), with strips for clinical group and task type, the diagonal greyed;
- ``meta.json``: the config, the convention, the correction, the cost actually spent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from taskgroup.matrices import CORNER as CORNER  # the first header cell, kept importable here
from taskgroup.matrices import REPORTED, AffinityMatrix
from taskgroup.plotting import pyplot, symmetric_limit
from taskgroup.tasks import TaskRegistry


def matrix_frame(matrix: np.ndarray, tasks: Sequence[str]) -> pd.DataFrame:
    """The labelled frame of ``matrix`` over ``tasks`` (:meth:`AffinityMatrix.frame`)."""
    return AffinityMatrix(tuple(tasks), matrix, "").frame()


def read_matrix(path: str | Path) -> pd.DataFrame:
    """A matrix CSV written here, back as a labelled frame (source rows, target columns); a
    thin wrapper of :meth:`AffinityMatrix.from_csv` for the callers that want the frame."""
    return AffinityMatrix.from_csv(path).frame()


def cluster_order(matrix: np.ndarray) -> list[int]:
    """Leaf order of an average-linkage clustering of the symmetrised matrix (high = close)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    n = len(matrix)
    if n < 3:
        return list(range(n))
    sym = np.nan_to_num(0.5 * (matrix + matrix.T))
    np.fill_diagonal(sym, 0.0)
    distance = sym.max() - sym
    np.fill_diagonal(distance, 0.0)
    return leaves_list(linkage(squareform(distance, checks=False), "average")).tolist()


def plot_heatmap(
    matrix: np.ndarray,
    tasks: Sequence[str],
    registry: TaskRegistry,
    title: str,
    path: Path,
    boxes: Sequence[Sequence[str]] | None = None,
) -> None:
    """The matrix ordered by hierarchical clustering, or, given ``boxes`` (disjoint groups of
    tasks), ordered group by group (clustered inside each) with every group boxed."""
    import matplotlib

    plt = pyplot()

    order = cluster_order(matrix)
    if boxes:
        rank = {k: r for r, k in enumerate(order)}
        index = {t: k for k, t in enumerate(tasks)}
        order = [index[t] for g in boxes for t in sorted(g, key=lambda t: rank[index[t]])]
    names = [tasks[k] for k in order]
    shown = matrix[np.ix_(order, order)].astype(float).copy()
    np.fill_diagonal(shown, np.nan)
    limit = symmetric_limit(shown)
    n = len(names)
    fig, ax = plt.subplots(figsize=(3 + 0.32 * n, 2.5 + 0.32 * n))
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.8")
    image = ax.imshow(shown, cmap=cmap, vmin=-limit, vmax=limit)
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("target")
    ax.set_ylabel("source")
    groups = sorted({registry[t].clinical_group for t in names})
    kinds = sorted({registry[t].kind.short for t in names})
    palette = matplotlib.colormaps["tab10"]
    for k, t in enumerate(names):  # strips: clinical group left/top, task type right/bottom
        g = palette(groups.index(registry[t].clinical_group) % 10)
        c = palette((kinds.index(registry[t].kind.short) + 5) % 10)
        ax.add_patch(plt.Rectangle((-1.6, k - 0.5), 0.5, 1, color=g, clip_on=False))
        ax.add_patch(plt.Rectangle((k - 0.5, -1.6), 1, 0.5, color=g, clip_on=False))
        ax.add_patch(plt.Rectangle((n - 0.4, k - 0.5), 0.5, 1, color=c, clip_on=False))
        ax.add_patch(plt.Rectangle((k - 0.5, n - 0.4), 1, 0.5, color=c, clip_on=False))
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette(groups.index(g) % 10)) for g in groups]
    handles += [plt.Rectangle((0, 0), 1, 1, color=palette((kinds.index(c) + 5) % 10)) for c in kinds]
    start = 0
    for group in boxes or ():
        ax.add_patch(
            plt.Rectangle((start - 0.5, start - 0.5), len(group), len(group), fill=False, lw=1.6, ec="black")
        )
        start += len(group)
    ax.legend(handles, groups + kinds, fontsize=6, loc="upper left", bbox_to_anchor=(1.15, 1.0))
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.12, label="effect of source on target")
    how = "ordered by proposed group, boxed" if boxes else "clustered"
    ax.set_title(f"{title} ({how}; diagonal grey; strips: clinical group, task type)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def long_frame(method: str, rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=["quantity", "step", "source", "target", "value", "lr", "run"])
    frame.insert(0, "method", method)
    frame["diagonal"] = frame["source"] == frame["target"]
    return frame


def write_method(
    out_dir: Path,
    method: str,
    matrix: np.ndarray,
    tasks: Sequence[str],
    registry: TaskRegistry,
    long_rows: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    quantities: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write one method's folder (see the module doc); returns it."""
    folder = Path(out_dir) / method
    folder.mkdir(parents=True, exist_ok=True)
    AffinityMatrix(tuple(tasks), matrix, method, REPORTED, meta).to_csv(folder / f"{REPORTED}.csv")
    for name, values in (quantities or {}).items():
        AffinityMatrix(tuple(tasks), values, method, name).to_csv(folder / f"{name}.csv")
    long_frame(method, long_rows).to_parquet(folder / "long.parquet", index=False)
    plot_heatmap(matrix, tasks, registry, method, folder / "heatmap.png")
    full = {
        "method": method,
        "convention": "A[i, j] = effect of source i (rows) on target j (columns); positive = i helps j",
        "diagonal": "kept in the files, excluded from every summary",
        "tasks": list(tasks),
        **meta,
    }
    (folder / "meta.json").write_text(json.dumps(full, indent=1, default=str))
    return folder


def off_diagonal(matrix: np.ndarray) -> np.ndarray:
    return ~np.eye(len(matrix), dtype=bool) & np.isfinite(matrix)


def planted_separation(
    matrix: np.ndarray, labels: Sequence[int], tasks: Sequence[str] | None = None
) -> dict[str, Any]:
    """Mean off-diagonal affinity within planted groups and across them, the gap in units of
    the across-pairs' standard deviation (how clearly the truth shows), and the tasks nearer
    another planted group than their own (``misplaced``: per task the mean of the symmetrised
    affinity, both directions, to the other members of each group; a partition built from the
    matrix can hardly put such a task in its own group)."""
    labels = np.asarray(labels)
    same = np.equal.outer(labels, labels)
    mask = off_diagonal(matrix)
    within, across = matrix[mask & same], matrix[mask & ~same]
    spread = across.std() if across.size > 1 else float("nan")
    gap = within.mean() - across.mean()
    names = list(tasks) if tasks is not None else [str(i) for i in range(len(labels))]
    finite = np.where(mask, matrix, 0.0)
    both = finite + finite.T
    count = mask.astype(float) + mask.T.astype(float)
    misplaced = []
    for i, own in enumerate(labels):
        means = {}
        for g in np.unique(labels):
            members = (labels == g) & (count[i] > 0)
            if members.any():
                means[g] = both[i, members].sum() / count[i, members].sum()
        if own in means and max(means.values()) > means[own]:
            misplaced.append(names[i])
    return {
        "within": float(within.mean()),
        "across": float(across.mean()),
        "gap": float(gap),
        "gap_sd": float(gap / spread) if spread and spread > 0 else float("nan"),
        "misplaced": misplaced,
    }


def agreement(matrices: Mapping[str, np.ndarray], reference: str) -> pd.DataFrame:
    """Spearman rank correlation of each method's off-diagonal entries with the ``reference``
    method's (e.g. every cheap estimator against trained ``pairwise`` transfer), over the
    entries both have finite; one row per other method."""
    from scipy.stats import spearmanr

    ref = matrices[reference]
    mask = off_diagonal(ref) & np.isfinite(ref)
    rows = []
    for method, matrix in matrices.items():
        if method == reference:
            continue
        both = mask & np.isfinite(matrix)
        rho, p = spearmanr(matrix[both], ref[both])
        rows.append(
            {
                "method": method,
                "reference": reference,
                "spearman": float(rho),
                "p": float(p),
                "pairs": int(both.sum()),
            }
        )
    return pd.DataFrame(rows)


def incoming(matrix: np.ndarray, tasks: Sequence[str], registry: TaskRegistry, by: str) -> pd.Series:
    """Mean incoming transfer (over sources, off-diagonal) per clinical group or task type."""
    mask = off_diagonal(matrix)
    per_target = [
        np.mean(matrix[:, j][mask[:, j]]) if mask[:, j].any() else np.nan for j in range(len(tasks))
    ]
    key = (
        (lambda t: registry[t].clinical_group)
        if by == "clinical_group"
        else (lambda t: registry[t].kind.short)
    )
    return pd.Series(per_target, index=[key(t) for t in tasks]).groupby(level=0).mean()


def print_summary(
    console: Console,
    method: str,
    matrix: np.ndarray,
    tasks: Sequence[str],
    registry: TaskRegistry,
    top: int = 5,
    separation: Mapping[str, float] | None = None,
) -> None:
    mask = off_diagonal(matrix)
    pairs = sorted(
        (
            (matrix[i, j], tasks[i], tasks[j])
            for i in range(len(tasks))
            for j in range(len(tasks))
            if mask[i, j]
        ),
        reverse=True,
    )
    table = Table(title=f"{method}: strongest pairs (source -> target)")
    table.add_column("sign")
    table.add_column("source")
    table.add_column("target")
    table.add_column("value", justify="right")
    for label, chosen in (("+", pairs[:top]), ("-", pairs[::-1][:top])):
        for value, source, target in chosen:
            table.add_row(label, source, target, f"{value:+.4g}")
    console.print(table)
    table = Table(title=f"{method}: mean incoming transfer")
    table.add_column("clinical group / type")
    table.add_column("mean", justify="right")
    for by in ("clinical_group", "type"):
        for name, value in incoming(matrix, tasks, registry, by).items():
            table.add_row(str(name), f"{value:+.4g}")
    console.print(table)
    if separation:
        console.print(
            f"{method}: planted groups: within {separation['within']:+.4g}, across {separation['across']:+.4g}, "
            f"gap {separation['gap_sd']:+.2f} sd; nearer another group than their own: "
            f"{', '.join(separation.get('misplaced', [])) or 'none'}"
        )
