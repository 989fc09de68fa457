"""Analyses of a study's output folder, for the notebooks (which hold no logic of their own).

A study folder (``taskgroup study run``) holds ``affinity/``, ``search/`` and ``compare/``; any of
them may be missing. Everything here reads those folders and returns tables (pandas) or
matplotlib figures:

- :func:`received_transfer`: each task's mean incoming affinity per estimator, with its
  training-set size (does transfer into a task depend on its data scale?);
- :func:`type_sensitivity`: mean affinity per (source type, target type) block per estimator;
- :func:`estimator_agreement`: Spearman correlation of every estimator's pairs with a
  reference estimator (trained ``pairwise`` by default);
- :func:`realised_agreement`: does an estimator predict the gains the compared groupings really
  had? Spearman correlation of each (grouping, task)'s predicted gain
  (:class:`~taskgroup.grouping.predict.GainPredictor` on the grouping's networks) with its
  realised relative gain over TS;
- :func:`estimator_cost`: what each estimator cost (its ``meta.json``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from taskgroup.affinity.report import agreement, off_diagonal, read_matrix
from taskgroup.config import SearchConfig, from_mapping
from taskgroup.errors import ConfigError
from taskgroup.grouping.predict import GainPredictor
from taskgroup.groupings import load_grouping
from taskgroup.plotting import pyplot, symmetric_limit
from taskgroup.tasks import TaskRegistry


@dataclasses.dataclass(frozen=True)
class StudyOutput:
    root: Path
    affinity: Path | None
    search: Path | None
    compare: Path | None

    def sizes(self) -> dict[str, int]:
        """Per-task training-set sizes recorded by the compare or search stage."""
        for folder in (self.compare, self.search):
            if folder is not None and (folder / "meta.json").exists():
                sizes = json.loads((folder / "meta.json").read_text()).get("train_sizes")
                if sizes:
                    return {k: int(v) for k, v in sizes.items()}
        raise ConfigError(f"{self.root}: no compare/ or search/ meta.json with training-set sizes")

    def search_config(self) -> SearchConfig:
        """The search config the study's search ran with (its ``meta.json``; the defaults when
        there was no search). Searches written before ``search.gain`` existed predicted the mean
        over partners; keys a later version dropped are ignored."""
        meta = self.search / "meta.json" if self.search is not None else None
        if meta is None or not meta.exists():
            return SearchConfig()
        ran = dict(json.loads(meta.read_text()).get("config", {}))
        ran.setdefault("gain", "mean")
        known = {f.name for f in dataclasses.fields(SearchConfig)}
        return from_mapping(SearchConfig, {k: v for k, v in ran.items() if k in known}, f"{meta}: config")


def open_study(path: str | Path) -> StudyOutput:
    """A study output folder (or one sweep value's folder inside it)."""
    root = Path(path)

    def part(name: str) -> Path | None:
        return root / name if (root / name).is_dir() else None

    out = StudyOutput(root, part("affinity"), part("search"), part("compare"))
    if out.affinity is None and out.compare is None:
        raise ConfigError(f"{root}: not a study output folder (no affinity/ or compare/ inside)")
    return out


def matrices(study: StudyOutput) -> dict[str, pd.DataFrame]:
    """Every estimator's reported matrix (rows source, columns target)."""
    if study.affinity is None:
        return {}
    return {p.parent.name: read_matrix(p) for p in sorted(study.affinity.glob("*/matrix.csv"))}


def received_transfer(
    mats: Mapping[str, pd.DataFrame], registry: TaskRegistry, sizes: Mapping[str, int]
) -> pd.DataFrame:
    rows = []
    for method, frame in mats.items():
        m = frame.to_numpy(float)
        mask = off_diagonal(m) & np.isfinite(m)
        for j, task in enumerate(frame.columns):
            column = m[:, j][mask[:, j]]
            spec = registry[task]
            rows.append(
                {
                    "method": method,
                    "task": task,
                    "type": spec.kind.short,
                    "clinical_group": spec.clinical_group,
                    "n_train": int(sizes.get(task, 0)),
                    "received": float(column.mean()) if column.size else np.nan,
                }
            )
    return pd.DataFrame(rows)


def size_correlation(received: pd.DataFrame) -> pd.DataFrame:
    """Per estimator: Spearman correlation of received transfer with training-set size."""
    rows = []
    for method, g in received.groupby("method", sort=False):
        ok = g[np.isfinite(g["received"])]
        varies = len(ok) > 2 and ok["n_train"].nunique() > 1 and ok["received"].nunique() > 1
        rho, p = stats.spearmanr(ok["n_train"], ok["received"]) if varies else (np.nan, np.nan)
        rows.append({"method": method, "spearman": float(rho), "p": float(p), "tasks": len(ok)})
    return pd.DataFrame(rows)


def type_sensitivity(mats: Mapping[str, pd.DataFrame], registry: TaskRegistry) -> pd.DataFrame:
    rows = []
    for method, frame in mats.items():
        m = frame.to_numpy(float)
        mask = off_diagonal(m) & np.isfinite(m)
        kinds = np.array([registry[t].kind.short for t in frame.index])
        for source in dict.fromkeys(kinds):
            for target in dict.fromkeys(kinds):
                block = mask & (kinds[:, None] == source) & (kinds[None, :] == target)
                rows.append(
                    {
                        "method": method,
                        "source_type": source,
                        "target_type": target,
                        "mean": float(m[block].mean()) if block.any() else np.nan,
                        "pairs": int(block.sum()),
                    }
                )
    return pd.DataFrame(rows)


def estimator_agreement(mats: Mapping[str, pd.DataFrame], reference: str = "pairwise") -> pd.DataFrame:
    if reference not in mats:
        return pd.DataFrame(columns=["method", "reference", "spearman", "p", "pairs"])
    return agreement({k: v.to_numpy(float) for k, v in mats.items()}, reference)


def realised_agreement(study: StudyOutput, registry: TaskRegistry) -> pd.DataFrame:
    """Per estimator: predicted vs realised gain over the (grouping, task) pairs of the compare
    stage (TS left out: its gain is 0 by definition), Spearman and the pairs used."""
    if study.compare is None:
        return pd.DataFrame(columns=["method", "spearman", "p", "pairs"])
    table = pd.read_csv(study.compare / "per_task.csv")
    table = table[(table["grouping"] != "ts") & np.isfinite(table["gain"])]
    groupings = {
        p.stem: load_grouping(p, registry) for p in sorted((study.compare / "groupings").glob("*.yaml"))
    }
    sizes = study.sizes()
    search_cfg = study.search_config()  # the search's own predictor
    rows = []
    for method, frame in matrices(study).items():
        tasks = list(frame.index)
        predictor = GainPredictor.from_config(np.nan_to_num(frame.to_numpy(float)), tasks, sizes, search_cfg)
        predicted, realised = [], []
        for grouping, g in table.groupby("grouping"):
            spec = groupings.get(str(grouping))
            if spec is None or not set(spec.tasks) <= set(tasks):
                continue
            served = predictor.served(list(spec.groups.values()))
            for r in g.itertuples(index=False):
                predicted.append(served[r.task])
                realised.append(r.gain)
        varies = len(predicted) > 2 and len(set(predicted)) > 1 and len(set(realised)) > 1
        rho, p = stats.spearmanr(predicted, realised) if varies else (np.nan, np.nan)
        rows.append({"method": method, "spearman": float(rho), "p": float(p), "pairs": len(predicted)})
    return pd.DataFrame(rows)


def estimator_cost(study: StudyOutput) -> pd.DataFrame:
    rows = []
    for meta_file in sorted(study.affinity.glob("*/meta.json")) if study.affinity else ():
        meta = json.loads(meta_file.read_text())
        cost = meta.get("cost", {})
        sep = meta.get("planted_separation", {})
        rows.append(
            {
                "method": meta_file.parent.name,
                "wall_seconds": cost.get("wall_seconds"),
                "trainings": cost.get("trainings"),
                "training_steps": cost.get("training_steps"),
                "forward_passes": cost.get("forward_passes"),
                "backward_passes": cost.get("backward_passes"),
                "planted_gap_sd": sep.get("gap_sd"),
            }
        )
    return pd.DataFrame(rows)


# -- figures -----------------------------------------------------------------------------------


def _panels(table: pd.DataFrame, width: float, height: float):
    """A figure with one panel per estimator (``method`` column) in a row: (figure, [(axes, method)])."""
    methods = list(dict.fromkeys(table["method"]))
    columns = max(len(methods), 1)
    fig, axes = pyplot().subplots(1, columns, figsize=(width * columns, height), squeeze=False)
    return fig, list(zip(axes[0], methods, strict=False))


def plot_received(received: pd.DataFrame):
    """Received transfer vs training-set size, one panel per estimator."""
    fig, panels = _panels(received, 4.2, 3.6)
    for ax, method in panels:
        g = received[received["method"] == method]
        for k, (kind, part) in enumerate(g.groupby("type")):
            ax.scatter(part["n_train"], part["received"], color=f"C{k}", label=kind, s=22)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(method)
        ax.set_xlabel("training-set size (log)")
        ax.set_ylabel("mean incoming affinity")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_type_sensitivity(table: pd.DataFrame):
    """Mean affinity per (source type, target type), one panel per estimator."""
    fig, panels = _panels(table, 3.6, 3.2)
    for ax, method in panels:
        grid = table[table["method"] == method].pivot(
            index="source_type", columns="target_type", values="mean"
        )
        limit = symmetric_limit(grid)
        image = ax.imshow(grid.to_numpy(float), cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_xticks(range(grid.shape[1]), grid.columns)
        ax.set_yticks(range(grid.shape[0]), grid.index)
        ax.set_xlabel("target type")
        ax.set_ylabel("source type")
        ax.set_title(method)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def to_png(fig) -> bytes:
    """A figure as PNG bytes (``IPython.display.Image(data=...)`` shows it whatever the backend),
    and closed."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    pyplot().close(fig)
    return buffer.getvalue()
