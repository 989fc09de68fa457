"""Studies: whole experiments as one YAML file, run by ``taskgroup study run studies/NAME.yaml``.

A study chains the commands of the package (``affinity`` -> ``search`` -> ``compare``) on one
run config, in one output folder::

    <out>/study.yaml               the study file as run, with the setting and overrides
    <out>/affinity/  search/  compare/        each stage's own output (see its command)
    <out>/<key>=<value>/...        the same per value when the study sweeps a config key
    <out>/sweep.csv, sweep.png     delta_m of every grouping against the swept value
    <out>/meta.json                stages, wall time per stage

A study file (typed: :class:`StudyConfig`)::

    name: grouping_search
    description: ...
    stages: [affinity, search, compare]
    affinity: [affinity.methods=[gradient]]        # overrides of a stage, every setting
    compare_groupings: [ts, cg, au, search:best]   # search:best = each estimator's best proposal
                                                   # (search:best_partition: its best partition)
    sweep: {key: data.train_fraction, values: [0.25, 0.5, 1.0]}     # optional
    settings:
      tiny: {config: ../configs/tiny.yaml, tasks: [...], set: [...], compare: [...]}
      full: {config: ../configs/full.yaml, needs_data: true, set: [...]}

Paths in a study file are relative to the file. Every stage resumes: a study stopped at any
point and run again redoes nothing it finished (the affinity probe run, the search's Optuna
studies and every compare network are reused).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Literal

import pandas as pd
import yaml
from rich.console import Console

from taskgroup.config import from_mapping, hide_password, load_run_config, load_yaml, to_mapping
from taskgroup.errors import ConfigError, did_you_mean
from taskgroup.groupings import BUILTIN
from taskgroup.plotting import pyplot
from taskgroup.tasks import load_registry

Stage = Literal["affinity", "search", "compare"]
BEST = "search:best"  # each estimator's best proposal (may overlap: a task served by its best network)
BEST_PARTITION = "search:best_partition"  # each estimator's best partition (every task in one network)


@dataclasses.dataclass(frozen=True)
class SettingConfig:
    """One way to run a study: its run config, overrides and tasks (empty: all)."""

    config: str
    set: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    needs_data: bool = False  # real data: ``--data ROOT`` is required
    workers: int = 1  # local worker processes of the trained stages
    sweep_values: tuple[float, ...] = ()  # this setting's values of the study's sweep (empty: the study's)
    affinity: tuple[str, ...] = ()  # overrides of one stage in this setting
    search: tuple[str, ...] = ()
    compare: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    key: str  # a run-config key, e.g. data.train_fraction
    values: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    name: str
    stages: tuple[Stage, ...]
    settings: dict[str, SettingConfig]
    description: str = ""
    affinity: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    compare: tuple[str, ...] = ()
    compare_groupings: tuple[str, ...] = ("ts", "cg", "au")
    sweep: SweepConfig | None = None

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a study needs at least one stage")
        if "search" in self.stages and "affinity" not in self.stages:
            raise ValueError("stage 'search' reads the affinity stage: list 'affinity' too")
        for token in (BEST, BEST_PARTITION):
            if token in self.compare_groupings and "search" not in self.stages:
                raise ValueError(f"compare_groupings names {token!r} but the study has no 'search' stage")


@dataclasses.dataclass
class StudyResult:
    out: Path
    folders: list[Path]  # one per sweep value (or the study folder)
    seconds: dict[str, float]


def load_study(path: str | Path) -> StudyConfig:
    path = Path(path)
    return from_mapping(StudyConfig, load_yaml(path), str(path))


def stage_overrides(
    study: StudyConfig,
    setting: SettingConfig,
    stage: Stage,
    overrides: tuple[str, ...] = (),
    point: tuple[str, ...] = (),
) -> list[str]:
    """The overrides one stage's run config is built with, later ones winning: the setting's
    ``set``, the study's and then the setting's overrides of the stage, the command line's
    ``--set`` (what the user types wins over the study file), and last the swept value
    (``point``: a sweep sets its key at every point)."""
    return [*setting.set, *getattr(study, stage), *getattr(setting, stage), *overrides, *point]


def _resolve(path: Path, name: str) -> str:
    p = Path(name).expanduser()
    return str(p if p.is_absolute() else (path.parent / p).resolve())


def best_groupings(search_dir: Path, which: str = "best") -> list[str]:
    """The grouping files of each estimator's ``best`` proposal (or ``best_partition``) of a
    search folder."""
    meta = json.loads((search_dir / "meta.json").read_text())
    files = dict.fromkeys(str(search_dir / "proposals" / f"{b['name']}.yaml") for b in meta[which].values())
    if not files:
        raise ConfigError(f"{search_dir}: the search made no proposal to compare")
    return list(files)


def run_study(
    path: str | Path,
    setting: str = "tiny",
    out: str | Path | None = None,
    data: str | Path | None = None,
    overrides: tuple[str, ...] = (),
    console: Console | None = None,
) -> StudyResult:
    from taskgroup.affinity import run_affinity
    from taskgroup.compare import run_compare
    from taskgroup.stages.search import run_search

    path = Path(path)
    study = load_study(path)
    console = console or Console()
    if setting not in study.settings:
        raise ConfigError(f"{path}: no setting {setting!r}; {did_you_mean(setting, list(study.settings))}")
    chosen = study.settings[setting]
    if chosen.needs_data and data is None:
        raise ConfigError(f"{path}: setting {setting!r} runs on real data: give --data ROOT")
    out = Path(out) if out is not None else Path("runs") / "studies" / f"{study.name}-{setting}"
    out.mkdir(parents=True, exist_ok=True)
    config = _resolve(path, chosen.config)
    typed = (*overrides, *([f"data.root={json.dumps(str(data))}"] if data is not None else []))
    record = {
        "study": str(path),
        "setting": setting,
        "overrides": [hide_password(o) for o in overrides],  # a storage URL's password stays out
        "data": str(data) if data else None,
    }
    study_file = to_mapping(load_yaml(path))  # its strings with URL passwords masked
    (out / "study.yaml").write_text(yaml.safe_dump({**record, **study_file}, sort_keys=False))
    tasks = list(chosen.tasks) or None
    seconds: dict[str, float] = {}
    points: list[tuple[float | None, Path]] = [(None, out)]
    sweep = study.sweep
    if sweep is not None:
        sweep = dataclasses.replace(sweep, values=chosen.sweep_values or sweep.values)
        points = [(v, out / f"{sweep.key}={v:g}") for v in sweep.values]
    registry = None

    @contextlib.contextmanager
    def stage(name: str):
        """A stage under a rule on the terminal, its wall time kept in ``seconds``."""
        start = time.perf_counter()
        console.rule(name.replace("/", ": "))
        yield
        seconds[name] = time.perf_counter() - start

    for value, folder in points:
        point = (f"{sweep.key}={value}",) if sweep is not None else ()
        label = folder.name if value is not None else study.name

        def cfg_for(section: Stage, *extra: str, point=point):
            return load_run_config(config, [*stage_overrides(study, chosen, section, typed, point), *extra])

        registry = registry or load_registry(cfg_for("compare").registry)
        if "affinity" in study.stages:
            with stage(f"{label}/affinity"):
                run_affinity(
                    cfg_for("affinity"), folder / "affinity", tasks, registry, chosen.workers, console=console
                )
        if "search" in study.stages:
            with stage(f"{label}/search"):
                search_cfg = cfg_for("search")
                run_search(
                    search_cfg.search,
                    registry,
                    folder / "search",
                    [folder / "affinity"],
                    console=console,
                    run_cfg=search_cfg,
                )
        if "compare" in study.stages:
            with stage(f"{label}/compare"):
                groupings: list[str] = []
                for g in study.compare_groupings:
                    if g in (BEST, BEST_PARTITION):
                        found = best_groupings(folder / "search", g.split(":")[1])
                        groupings += [f for f in found if f not in groupings]
                    elif g in BUILTIN:
                        groupings.append(g)
                    else:
                        groupings.append(_resolve(path, g))
                cfg = cfg_for("compare", f"compare.groupings={json.dumps(groupings)}")
                run_compare(cfg, folder / "compare", registry, tasks, chosen.workers, console=console)
    if sweep is not None and "compare" in study.stages:
        sweep_summary(out, sweep, [f for _, f in points])
    meta = {**record, "name": study.name, "stages": list(study.stages), "seconds": seconds}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    console.print(
        f"study {study.name} ({setting}) in {out}: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    )
    return StudyResult(out, [f for _, f in points], seconds)


def _sweep_label(grouping: str) -> str:
    """A grouping's label across swept values: a proposal's name changes with the value, its
    estimator (the name's prefix) and kind (a selection or a partition) do not."""
    if grouping in BUILTIN:
        return grouping
    kind = "best" if "-select-" in grouping else "best partition"
    return f"{kind} ({grouping.split('-')[0]})"


def sweep_summary(out: Path, sweep: SweepConfig, folders: list[Path]) -> pd.DataFrame:
    """delta_m (all tasks and per type) of every grouping at every swept value: sweep.csv and a
    plot of delta_m against the value with its intervals."""
    frames = []
    for value, folder in zip(sweep.values, folders, strict=True):
        frame = pd.read_csv(folder / "compare" / "per_group.csv")
        frame.insert(0, sweep.key, value)
        # a proposal's name changes with the value; its estimator (the name's prefix) does not
        frame.insert(2, "proposal", frame["grouping"])
        frame["grouping"] = frame["grouping"].map(_sweep_label)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(out / "sweep.csv", index=False)
    plt = pyplot()
    overall = table[table["scope"] == "all"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, (grouping, g) in enumerate(overall.groupby("grouping", sort=False)):
        g = g.groupby(sweep.key, as_index=False)[["delta_m", "ci_low", "ci_high"]].mean()
        ax.plot(g[sweep.key], g["delta_m"], marker="o", color=f"C{k}", label=grouping)
        ax.fill_between(g[sweep.key], g["ci_low"], g["ci_high"], color=f"C{k}", alpha=0.15)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel(sweep.key)
    ax.set_ylabel("delta_m vs TS (all tasks)")
    ax.set_title("Relative gain over task-specific training against " + sweep.key)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)
    return table
