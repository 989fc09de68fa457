"""Train every network of a grouping and serve each task from its best network.

A paradigm is only a way to cut the tasks into sets: TS, CG, AU and any grouping file all go
through the stage :func:`taskgroup.stages.train.train_grouping`, which trains each network
(:func:`train_network`) with the one engine and then picks, for every task, the network that is
best for it on validation (overlapping groups, as in Standley et al. 2020); when the data has a
held-out test split, the chosen network's test metrics at the chosen step are reported beside
(``served.csv``: ``test_value``, ``test_<metric>``). A run folder holds::

    config.yaml  grouping.yaml  log.txt  metrics.csv  served.csv  [config_history.yaml]
    networks/<name>/  network.json  metrics.csv  best.json  done.json  checkpoints/{last.pt,best/}
                      [reused.json]

Finished networks are never retrained; an unfinished one resumes from its last checkpoint.

A run folder belongs to one config and one grouping: a run into a folder that holds another is
refused before any file is touched, with the differences. What is compared is what the networks
depend on (:func:`network_config`: model, data, training, registry), less what says only where
or how a run computes or what it reports (:data:`LOCAL_KEYS`: ``train.threads``,
``train.device``, ``data.skip_bad``, ``data.bad_report``): a run resumed with other threads, on
another device, or with ``--skip-bad`` after its data was refused, goes on. ``config.yaml`` and
``grouping.yaml`` are written once the data has loaded, so a first attempt refused for bad rows
leaves no config behind (the recovery: fix the data, or the same command with ``--skip-bad``).

The one exception is explicit: with ``resume_with_changes`` (``taskgroup train
--resume-with-changes``) the learning rates may differ, the recovery from a divergence (the
engine saved the state before it); the change is logged and recorded in ``config_history.yaml``
and in the ``network.json`` of each unfinished network, which continues with the new rates. A
finished network is not retrained and keeps its ``network.json`` (the config it was trained
with); the later config its results are reused under goes to its ``reused.json`` (and the
network is named in the run's history entry). One process writes a run folder at a time (a lock
beside its files; a second one is refused, naming the holder), and each network folder too.
Every file is written atomically (:mod:`taskgroup.runtime`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from taskgroup import workroot
from taskgroup.config import RunConfig, config_hash, load_run_config, to_mapping
from taskgroup.errors import ConfigError, TaskgroupError
from taskgroup.groupings import Grouping
from taskgroup.models import build_model
from taskgroup.runtime import atomic_write_text, lock_folder, timestamp
from taskgroup.tasks import TaskRegistry
from taskgroup.training.callbacks import CheckpointCallback, EvaluationCallback, ProgressCallback
from taskgroup.training.data import TrainingData
from taskgroup.training.distributed import DistInfo, barrier, init_distributed
from taskgroup.training.engine import Callback, Engine

log = logging.getLogger("taskgroup")


NETWORK_SECTIONS = ("model", "data", "train", "registry")

#: the config keys ``resume_with_changes`` lets differ from what a run folder holds
RESUMABLE_KEYS = ("train.lr_encoder", "train.lr_heads")
#: config keys a run or network folder may see changed: where or how it computes (threads, the
#: device), and which rows are left out and where they are listed (``skip_bad`` is the recovery
#: from a run refused for bad rows; on clean data it changes nothing)
LOCAL_KEYS = ("train.threads", "train.device", "data.skip_bad", "data.bad_report")
CONFIG_HISTORY = "config_history.yaml"
#: beside a finished network's network.json: the later configs its results were reused under
REUSED = "reused.json"
RESUME_FLAG = "--resume-with-changes"


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> dict[str, tuple]:
    """The dotted keys whose values differ between two config mappings: ``{key: (old, new)}``
    (a key only one side has counts, with ``None`` on the other; NaN equals NaN)."""
    changes: dict[str, tuple] = {}
    for key in [*old, *(k for k in new if k not in old)]:
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changes.update(config_changes(a, b, f"{name}."))
        elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            changes[name] = (a, b)
    return changes


def describe_changes(changes: Mapping[str, tuple], limit: int = 6) -> str:
    """``train.steps 12 -> 20, ...`` (the first ``limit``)."""
    shown = [f"{k} {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:limit]]
    more = f" and {len(changes) - limit} more" if len(changes) > limit else ""
    return ", ".join(shown) + more


def comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """A network config mapping (:func:`network_config`, or one a folder holds) without the
    :data:`LOCAL_KEYS`: what two runs must share to share a folder."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
    for key in LOCAL_KEYS:
        section, _, name = key.partition(".")
        if isinstance(out.get(section), dict):
            out[section].pop(name, None)
    return out


def refuse_changes(where: Path, what: str, changes: Mapping[str, tuple], resume_with_changes: bool) -> None:
    """Raise unless ``changes`` are all learning rates and ``resume_with_changes`` allows them."""
    if not changes:
        return
    others = {k: v for k, v in changes.items() if k not in RESUMABLE_KEYS}
    if resume_with_changes and not others:
        return
    message = f"{where} holds {what} trained with another config ({describe_changes(others or changes)})"
    if others:
        message += "; use another --out"
        if resume_with_changes:
            message += f" ({RESUME_FLAG} allows only {', '.join(RESUMABLE_KEYS)} to change)"
    else:
        message += (
            f": only learning rates differ; to continue it from its checkpoints with them, pass "
            f"{RESUME_FLAG} (the change is recorded), or use another --out"
        )
    raise ConfigError(message)


def check_run_folder(
    out_dir: Path, cfg: RunConfig, grouping: Grouping, resume_with_changes: bool = False
) -> dict[str, tuple]:
    """Refuse, before anything is written, a run into a folder that holds another grouping or
    another config (``cfg`` resolved as the folder's ``config.yaml`` is): another network config
    (:func:`network_config`) but for the :data:`LOCAL_KEYS`, so neither a section training never
    reads (affinity, compare, search) nor threads, device or bad-row handling count. Returns the
    config changes ``resume_with_changes`` allowed (learning rates), empty when none differs."""
    grouping_file, config_file = out_dir / "grouping.yaml", out_dir / "config.yaml"
    if grouping_file.exists():
        found = yaml.safe_load(grouping_file.read_text()) or {}
        found_groups = {str(g): list(ids) for g, ids in (found.get("groups") or {}).items()}
        groups = {g: list(ids) for g, ids in grouping.groups.items()}
        if found_groups != groups:
            raise ConfigError(
                f"{out_dir} holds a run of another grouping ({found.get('name')!r}: "
                f"{_describe_groups(found_groups)}; this one {grouping.name!r}: {_describe_groups(groups)}); "
                "a run folder belongs to one grouping: use another --out"
            )
    if not config_file.exists():
        return {}
    try:
        found_cfg = load_run_config(config_file)
    except (TaskgroupError, ValueError) as exc:
        raise ConfigError(
            f"{config_file}: not a run config of this version ({exc}); a run folder belongs to one "
            "config: use another --out"
        ) from None
    changes = config_changes(comparable(network_config(found_cfg)), comparable(network_config(cfg)))
    refuse_changes(out_dir, "a run", changes, resume_with_changes)
    return changes


def _describe_groups(groups: Mapping[str, list], limit: int = 4) -> str:
    shown = [f"{g}=[{', '.join(ids)}]" for g, ids in list(groups.items())[:limit]]
    return " ".join(shown) + (f" and {len(groups) - limit} more groups" if len(groups) > limit else "")


def _history_entry(changes: Mapping[str, tuple]) -> dict[str, Any]:
    return {"time": timestamp(), "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}}


def finished_networks(out_dir: Path, grouping: Grouping) -> list[str]:
    """The networks of ``grouping`` a run folder holds finished (``done.json``)."""
    return [n for n in grouping.groups if (Path(out_dir) / "networks" / safe_name(n) / "done.json").exists()]


def write_run_files(out_dir: Path, cfg: RunConfig, grouping: Grouping, changes: Mapping[str, tuple]) -> None:
    """``config.yaml`` and ``grouping.yaml`` of a new run folder; after allowed ``changes``, the
    new ``config.yaml`` and one more entry of ``config_history.yaml``, naming the networks that
    were finished before (their results stay those of the old config). A folder that holds this
    config (but for :data:`LOCAL_KEYS`) and grouping keeps its files as they are."""
    config_file, grouping_file = out_dir / "config.yaml", out_dir / "grouping.yaml"
    if changes:
        history_file = out_dir / CONFIG_HISTORY
        history = (yaml.safe_load(history_file.read_text()) or []) if history_file.exists() else []
        entry = _history_entry(changes)
        finished = finished_networks(out_dir, grouping)
        if finished:
            entry["finished_before"] = finished  # not retrained: trained with the old config
        history.append(entry)
        atomic_write_text(history_file, yaml.safe_dump(history, sort_keys=False))
    if changes or not config_file.exists():
        atomic_write_text(config_file, yaml.safe_dump(to_mapping(cfg), sort_keys=False))
    if not grouping_file.exists():
        atomic_write_text(grouping_file, grouping.to_yaml())


def final_scores(network_dir: Path) -> dict[str, dict[str, Any]]:
    """Every task's validation metrics at a network's last evaluation (its final weights):
    ``{task: {"step", "metrics"}}``, read from the network's ``metrics.csv``; with
    ``"test_metrics"`` too when that evaluation scored a held-out test split."""
    frame = pd.read_csv(Path(network_dir) / "metrics.csv")
    test = frame[frame["split"] == "test"]
    frame = frame[frame["split"] == "val"]
    out = {}
    for task, rows in frame.groupby("task", sort=False):
        step = rows["step"].max()
        last = rows[rows["step"] == step]
        out[str(task)] = {
            "step": int(step),
            "metrics": {str(m): float(v) for m, v in zip(last["metric"], last["value"], strict=True)},
        }
        last_test = test[(test["task"] == task) & (test["step"] == step)]
        if not last_test.empty:
            out[str(task)]["test_metrics"] = {
                str(m): float(v) for m, v in zip(last_test["metric"], last_test["value"], strict=True)
            }
    return out


@dataclasses.dataclass(frozen=True)
class NetworkResult:
    name: str
    tasks: tuple[str, ...]
    # task -> {"step", "value", "metrics"} on validation, + {"test_value", "test_metrics"} at that
    # step when the data has a test split (absent in networks trained before test scoring)
    best: dict[str, dict[str, Any]]
    out_dir: Path


@dataclasses.dataclass(frozen=True)
class RunResult:
    grouping: Grouping
    networks: dict[str, NetworkResult]
    served: pd.DataFrame  # one row per task: the network serving it (chosen on val), val and test metrics
    metrics: pd.DataFrame  # tidy: network, task, step, split, metric, value


def safe_name(name: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", name)


def network_config(cfg: RunConfig) -> dict[str, Any]:
    """The part of a run config a trained network depends on: model, data, training and registry
    (not the sections that only say what is measured, searched or compared around trainings).
    ``data.test_root`` is left out when unset: a network does not depend on it (the test split is
    only scored), and networks trained before it existed keep their hash and cached folders;
    ``data.bad_report`` (a file name) always. ``data.skip_bad`` is always written ``False``, its
    default (the value every cached network folder was hashed with), so adding ``--skip-bad``
    (on clean data it changes nothing) keeps every hash and cache."""
    config = {k: v for k, v in to_mapping(cfg).items() if k in NETWORK_SECTIONS}
    if config["data"].get("test_root") is None:
        config["data"] = {k: v for k, v in config["data"].items() if k != "test_root"}
    # where bad rows are listed says nothing about what a network learns
    config["data"] = {k: v for k, v in config["data"].items() if k not in ("bad_report", "workers")}
    config["data"]["skip_bad"] = False
    return workroot.identity(config)  # a worker's paths under its --work-root, as the queue has them


def network_hash(cfg: RunConfig, tasks: Sequence[str]) -> str:
    """What a network's results depend on: its network config and its task set."""
    return config_hash({"config": network_config(cfg), "tasks": sorted(tasks)})


def network_folder(work_dir: Path, name: str, cfg: RunConfig, tasks: Sequence[str]) -> Path:
    """Where a shared work folder keeps the network of ``tasks`` under ``cfg``: its readable name
    and the hash of what it depends on, so two configs never share a folder."""
    return Path(work_dir) / "networks" / f"{safe_name(name)[:80]}-{network_hash(cfg, tasks)}"


def train_network(
    cfg: RunConfig,
    registry: TaskRegistry,
    tasks: Sequence[str],
    out_dir: Path,
    name: str,
    data: TrainingData,
    callbacks: Sequence[Callback] = (),
    progress: Any = None,
    resume_with_changes: bool = False,
    resumable: bool = False,
) -> NetworkResult:
    """Train (or resume, or reuse) one network on ``tasks``. The folder is locked while it is
    (one process trains a network folder at a time: a second one gets a
    :class:`~taskgroup.runtime.FolderLocked`). A folder that holds a network of another config or
    task set is refused; with ``resume_with_changes``, one whose config differs only in learning
    rates resumes with the new ones (see :func:`check_network_folder`). ``resumable``: the
    folder is a run folder's network, resumed after a divergence with ``--resume-with-changes``
    (what the divergence message says; other folders are keyed by a hash of the rates)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist_info, device = init_distributed(cfg.train.device)
    with lock_folder(out_dir) if dist_info.is_main else contextlib.nullcontext():
        check_network_folder(out_dir, cfg, tasks, name, dist_info.is_main, resume_with_changes)
        done = out_dir / "done.json"
        if done.exists():
            return NetworkResult(name, tuple(tasks), json.loads(done.read_text())["best"], out_dir)
        engine_args = (dist_info, device, resumable)
        return _train_network(cfg, registry, tasks, out_dir, name, data, callbacks, progress, *engine_args)


def _train_network(
    cfg: RunConfig,
    registry: TaskRegistry,
    tasks: Sequence[str],
    out_dir: Path,
    name: str,
    data: TrainingData,
    callbacks: Sequence[Callback],
    progress: Any,
    dist_info: DistInfo,
    device: torch.device,
    resumable: bool,
) -> NetworkResult:
    """:func:`train_network` of an unfinished network, with its folder locked and checked."""
    done = out_dir / "done.json"
    specs = [registry[t] for t in tasks]
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, specs)
    evaluation = EvaluationCallback(cfg.train.eval_every)
    all_callbacks = [
        evaluation,
        *callbacks,
        CheckpointCallback(cfg.train.checkpoint_every),
        ProgressCallback(progress),
    ]
    engine = Engine(
        model, data, specs, cfg.train, cfg.data, out_dir, name, all_callbacks, device, dist_info, resumable
    )
    engine.run()
    if dist_info.is_main:
        atomic_write_text(done, json.dumps({"best": evaluation.best, "steps": engine.total_steps}, indent=1))
    barrier(dist_info)
    return NetworkResult(name, tuple(tasks), evaluation.best, out_dir)


def check_network_folder(
    out_dir: Path,
    cfg: RunConfig,
    tasks: Sequence[str],
    name: str,
    write: bool = True,
    resume_with_changes: bool = False,
) -> None:
    """``network.json`` of a network folder: written when new (the hash of what the network
    depends on, and that config); a folder of another network is refused (differences in
    :data:`LOCAL_KEYS` do not count). Allowed learning-rate changes (``resume_with_changes``) of
    an unfinished network take the new hash and are appended to its ``history``; a finished
    network keeps its ``network.json`` (it was trained with the old rates) and the change goes to
    its ``reused.json``, whose configs it is then reused under without the flag."""
    key = network_hash(cfg, tasks)
    meta = out_dir / "network.json"
    record = {"name": name, "tasks": list(tasks), "hash": key, "config": network_config(cfg)}
    if not meta.exists():
        if write:
            atomic_write_text(meta, json.dumps(record, indent=1))
        return
    found = json.loads(meta.read_text())
    reused_file = out_dir / REUSED
    reused = json.loads(reused_file.read_text()) if reused_file.exists() else []
    current = comparable(record["config"])
    if found.get("hash") == key or any(not config_changes(comparable(r["config"]), current) for r in reused):
        return
    if sorted(found.get("tasks", [])) != sorted(tasks) or "config" not in found:
        unknown = "" if "config" in found else " (its network.json, older, does not say which config)"
        raise ConfigError(
            f"{out_dir} holds a network trained with another config or task set{unknown}; use another --out"
        )
    changes = config_changes(comparable(found["config"]), current)
    refuse_changes(out_dir, "a network", changes, resume_with_changes)
    if not changes:  # only threads, device or bad-row handling differ
        return
    finished = (out_dir / "done.json").exists()
    if write and finished:
        entry = {
            **_history_entry(changes),
            "hash": key,
            "trained_with": found["hash"],
            "config": record["config"],
        }
        atomic_write_text(reused_file, json.dumps([*reused, entry], indent=1))
    elif write:
        record["history"] = [*found.get("history", []), {**_history_entry(changes), "hash": found["hash"]}]
        atomic_write_text(meta, json.dumps(record, indent=1))
    log.info(
        "network %s: config changed (%s)%s",
        name,
        describe_changes(changes),
        f" (finished before: not retrained, its results stay those of the old config; see {reused_file})"
        if finished
        else "",
    )


def serve_tasks(
    grouping: Grouping, networks: dict[str, NetworkResult], registry: TaskRegistry
) -> pd.DataFrame:
    """For each task, the network that is best for it on validation (by its primary metric):
    ``value`` and ``val_<metric>`` are that network's validation scores at its best step,
    ``test_value`` and ``test_<metric>`` its held-out test scores at the same step (NaN when the
    data has no test split, or the network was trained before test scoring)."""
    rows = []
    for task in grouping.tasks:
        spec = registry[task]
        primary = spec.primary_metric
        candidates = [(networks[n].best[task], n) for n in grouping.networks_of(task)]
        pick = max if primary.higher_is_better else min
        best, network = pick(candidates, key=lambda c: c[0]["value"])
        rows.append(
            {
                "task": task,
                "type": spec.kind.short,
                "clinical_group": spec.clinical_group,
                "network": network,
                "network_size": len(networks[network].tasks),
                "step": best["step"],
                "primary_metric": primary.name,
                "higher_is_better": primary.higher_is_better,
                "value": best["value"],
                **{f"val_{k}": v for k, v in best["metrics"].items()},
                "test_value": best.get("test_value", math.nan),
                **{f"test_{k}": best.get("test_metrics", {}).get(k, math.nan) for k in best["metrics"]},
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    tested = ["test_value", *(c for c in frame.columns if c.startswith("test_") and c != "test_value")]
    return frame[[c for c in frame.columns if not c.startswith("test_")] + tested]  # val, then test
