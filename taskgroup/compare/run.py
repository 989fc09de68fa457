"""``taskgroup compare``: train every network of every grouping, once, and score every task.

    <out>/config.yaml               the resolved run config
    <out>/groupings/<name>.yaml     the groupings compared (on the compared tasks)
    <out>/scores.csv, .parquet      long: grouping, seed, task, network, split, metric, value
    <out>/per_task.csv, .md ...     the report (see :mod:`taskgroup.compare.report`)
    <out>/meta.json                 config, groupings, jobs, cost, the queue's storage and study

Every network of every grouping and seed is a :class:`~taskgroup.training.jobs.NetworkJob`
(task set + seed) on one Optuna study whose name carries the hash of the network config: a task
set trained for TS, CG, AU and a proposal alike is one job, trained once, and a second compare
run on the same cache (``compare.cache``) and storage trains nothing it already has. The queue is
worked off by this process and ``workers - 1`` local processes; ``taskgroup worker --storage URL
--study NAME`` adds machines (a killed worker's job is resumed from its last checkpoint by
another, see :mod:`taskgroup.training.jobs`).

The protocol of Standley et al. 2020: a task's serving network (among its grouping's networks
that train it) is chosen on validation; when the data has a held-out test split, the report is
computed on test (the long table holds both splits; ``*_val.csv`` the report's tables on val).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from rich.console import Console

from taskgroup.config import CompareConfig, RunConfig, config_hash, hide_password, to_mapping
from taskgroup.errors import ConfigError
from taskgroup.groupings import BUILTIN, Grouping, load_grouping
from taskgroup.runtime import configure_cpu
from taskgroup.tasks import TaskRegistry, load_registry
from taskgroup.training.jobs import (
    NetworkJob,
    create_queue,
    job_results,
    job_seconds,
    sqlite_url,
    storage_for,
    work_off,
)
from taskgroup.training.run import network_config, safe_name


@dataclasses.dataclass
class CompareResult:
    out: Path
    groupings: list[Grouping]
    scores: pd.DataFrame  # long: grouping, seed, task, network, network_size, split, metric, value, primary
    report: dict[str, pd.DataFrame]  # per_task, per_task_metrics, per_group, negative_transfer
    jobs: list[NetworkJob]
    trained_here: int  # networks this process trained (0 when every one was in the cache)
    study: str
    storage: str
    split: str = "val"  # the split the report is computed on ("test" when the data has one)


def resolve_groupings(
    specs: Sequence[str | Path], registry: TaskRegistry, tasks: Sequence[str] | None = None
) -> tuple[list[Grouping], list[str]]:
    """The groupings to compare, all on one task set: ``tasks`` when given, else the tasks of
    the grouping files (which must agree), else every task of the registry. Built-in groupings
    (TS, CG, AU) are restricted to the task set; a file must train every task of it."""
    if not specs:
        raise ConfigError("compare: no grouping given")
    loaded = [(str(s), load_grouping(s, registry)) for s in specs]
    files = [(s, g) for s, g in loaded if s not in BUILTIN]
    if tasks is not None:
        chosen = list(tasks)
    elif files:
        chosen = [t for t in registry.ids if t in set(files[0][1].tasks)]
    else:
        chosen = list(registry.ids)
    groupings: list[Grouping] = []
    names: set[str] = set()
    for spec, grouping in loaded:
        if spec in BUILTIN:
            grouping = grouping.restrict(chosen)
        else:
            missing = [t for t in chosen if t not in grouping.tasks]
            extra = [t for t in grouping.tasks if t not in chosen]
            if missing or extra:
                what = f"does not train task(s) {', '.join(missing)}" if missing else ""
                what += ("; " if what else "") + (f"trains task(s) {', '.join(extra)} " if extra else "")
                raise ConfigError(
                    f"{spec}: grouping {grouping.name!r} {what.strip()} — every compared grouping must "
                    f"train the same tasks ({len(chosen)}: {', '.join(chosen)})"
                )
        name, k = grouping.name, 2
        while name in names:  # two files naming their grouping alike
            name, k = f"{grouping.name}_{k}", k + 1
        names.add(name)
        groupings.append(dataclasses.replace(grouping, name=name))
    if "ts" not in names:
        groupings.insert(0, load_grouping("ts", registry).restrict(chosen))  # the reference of every gain
    return groupings, chosen


def seeds_of(cfg: RunConfig) -> list[int]:
    return [cfg.train.seed + k for k in range(cfg.compare.seeds)]


def compare_jobs(groupings: Sequence[Grouping], seeds: Sequence[int]) -> list[NetworkJob]:
    """Every network of every grouping and seed, each distinct (task set, seed) once."""
    jobs: dict[str, NetworkJob] = {}
    for seed in seeds:
        for grouping in groupings:
            for ids in grouping.groups.values():
                job = NetworkJob(tuple(sorted(ids)), seed)
                jobs.setdefault(job.key, job)
    return list(jobs.values())


def study_name(cfg: RunConfig) -> str:
    """One queue per network config: networks of equal config are shared by compare runs."""
    return "compare-" + config_hash(network_config(cfg))


def _selected(entry: Mapping[str, Any], task: str, registry: TaskRegistry, select: str) -> float:
    primary = registry[task].primary_metric.name
    return float(entry["value"] if select == "best" else entry["metrics"][primary])


def served_scores(
    groupings: Sequence[Grouping],
    results: Mapping[str, Mapping[str, Any]],
    registry: TaskRegistry,
    seeds: Sequence[int],
    select: str = "final",
) -> pd.DataFrame:
    """Long table of every task's metrics in every grouping and seed, from the network that
    serves it (the best on validation among the grouping's networks that train it): rows of
    split "val", and of split "test" (the same network and step) when its results hold test
    metrics."""
    rows = []
    for grouping in groupings:
        for seed in seeds:
            for task in grouping.tasks:
                spec = registry[task]
                options = []
                for name in grouping.networks_of(task):
                    key = NetworkJob(tuple(sorted(grouping.groups[name])), seed).key
                    entry = results[key][task]
                    options.append((_selected(entry, task, registry, select), name, key, entry))
                pick = max if spec.primary_metric.higher_is_better else min
                _, name, key, entry = pick(options, key=lambda o: o[0])
                splits = {"val": entry["metrics"], "test": entry.get("test_metrics", {})}
                for split, metrics in splits.items():
                    for metric, value in metrics.items():
                        rows.append(
                            {
                                "grouping": grouping.name,
                                "seed": seed,
                                "task": task,
                                "network": name,
                                "network_key": key,
                                "network_size": len(grouping.groups[name]),
                                "step": int(entry["step"]),
                                "split": split,
                                "metric": metric,
                                "value": float(value),
                                "primary": metric == spec.primary_metric.name,
                            }
                        )
    return pd.DataFrame(rows)


def run_compare(
    cfg: RunConfig,
    out_dir: str | Path,
    registry: TaskRegistry | None = None,
    tasks: Sequence[str] | None = None,
    workers: int = 1,
    console: Console | None = None,
    devices: Sequence[str] = (),
    work_root: Path | None = None,
) -> CompareResult:
    from taskgroup.compare.report import print_report, report_split, write_report
    from taskgroup.training.data import data_tasks, prepare_data
    from taskgroup.training.pretrain import resolve_pretrained

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    console = console or Console()
    registry = registry or load_registry(cfg.registry)
    comp: CompareConfig = cfg.compare
    if tasks is None and all(str(s) in BUILTIN for s in comp.groupings):
        tasks = data_tasks(cfg.data, registry, console=console)  # a root of some of the tasks compares those
    groupings, tasks = resolve_groupings(comp.groupings, registry, tasks)
    configure_cpu(cfg.train.threads)
    cfg = resolve_pretrained(cfg)
    (out / "config.yaml").write_text(yaml.safe_dump(to_mapping(cfg), sort_keys=False))
    (out / "groupings").mkdir(exist_ok=True)
    for g in groupings:
        (out / "groupings" / f"{safe_name(g.name)}.yaml").write_text(g.to_yaml())
    seeds = seeds_of(cfg)
    jobs = compare_jobs(groupings, seeds)
    cache = Path(comp.cache).expanduser() if comp.cache else out
    url = comp.storage or sqlite_url(cache / "jobs.db")
    cache.mkdir(parents=True, exist_ok=True)
    name = study_name(cfg)
    study = create_queue(storage_for(url, comp.heartbeat, comp.grace), name, cfg, jobs, cache, work_root)
    console.print(
        f"compare: {len(groupings)} groupings x {len(seeds)} seed(s) = {len(jobs)} distinct networks "
        f"(study {name!r} on {hide_password(url)}; more machines: taskgroup worker --storage URL --study {name})"
    )
    trained = work_off(
        study, url, workers, comp.heartbeat, comp.grace, cfg.train.threads, registry, devices, work_root
    )
    results = job_results(study, comp.select)
    missing = [j.key for j in jobs if j.key not in results]
    if missing:
        raise ConfigError(f"compare: {len(missing)} network(s) not trained, e.g. {missing[0]}")
    scores = served_scores(groupings, results, registry, seeds, comp.select)
    scores.to_csv(out / "scores.csv", index=False)
    scores.to_parquet(out / "scores.parquet", index=False)
    data = prepare_data(dataclasses.replace(cfg.data, preload=False), registry, tasks)  # nothing decoded
    sizes = {t: data.train.size(t) for t in tasks}
    split, reported_on = report_split(scores, data.test is not None)
    report = write_report(
        out, scores, registry, sizes, groupings, comp.confidence, comp.floor, split, reported_on
    )
    console.print(f"data: {data.root} (validation: {data.val_source})", highlight=False, soft_wrap=True)
    console.print(reported_on)
    meta = {
        "config": to_mapping(cfg),
        "tasks": tasks,
        "groupings": {g.name: {k: list(v) for k, v in g.groups.items()} for g in groupings},
        "seeds": seeds,
        "select": comp.select,
        "chosen_on": "val",
        "reported_on": split,
        "reported_on_note": reported_on,
        "test_source": data.test_source,
        "floor": comp.floor,
        "train_sizes": sizes,
        "storage": hide_password(url),
        "study": name,
        "cache": str(cache),
        "cost": {
            "wall_seconds": time.perf_counter() - start,
            "networks": len(jobs),
            "networks_trained_here": trained,
            "training_seconds_all_attempts": job_seconds(study, {j.key for j in jobs}),
            "workers": workers,
        },
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print_report(console, report, groupings)
    return CompareResult(out, groupings, scores, report, jobs, trained, name, url, split)
