"""Train every network of a grouping and serve each task from its best network.

A paradigm is only a way to cut the tasks into sets: TS, CG, AU and any grouping file all go
through :func:`train_grouping`, which trains each network with the one engine and then picks, for
every task, the network that is best for it on validation (overlapping groups, as in Standley et
al. 2020); when the data has a held-out test split, the chosen network's test metrics at the
chosen step are reported beside (``served.csv``: ``test_value``, ``test_<metric>``). A run folder
holds::

    config.yaml  grouping.yaml  log.txt  metrics.csv  served.csv
    networks/<name>/  network.json  metrics.csv  best.json  done.json  checkpoints/{last.pt,best/}

Finished networks are never retrained; an unfinished one resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from rich.console import Console

from taskgroup.config import RunConfig, config_hash, to_mapping
from taskgroup.errors import ConfigError
from taskgroup.groupings import Grouping
from taskgroup.models import build_model
from taskgroup.runtime import configure_cpu
from taskgroup.tasks import TaskRegistry, load_registry
from taskgroup.training.callbacks import CheckpointCallback, EvaluationCallback, ProgressCallback
from taskgroup.training.data import TrainingData, prepare_data
from taskgroup.training.distributed import barrier, init_distributed
from taskgroup.training.engine import Callback, Engine

log = logging.getLogger("taskgroup")


NETWORK_SECTIONS = ("model", "data", "train", "registry")


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
    only scored), and networks trained before it existed keep their hash and cached folders."""
    config = {k: v for k, v in to_mapping(cfg).items() if k in NETWORK_SECTIONS}
    if config["data"].get("test_root") is None:
        config["data"] = {k: v for k, v in config["data"].items() if k != "test_root"}
    return config


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
) -> NetworkResult:
    """Train (or resume, or reuse) one network on ``tasks``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist_info, device = init_distributed(cfg.train.device)
    key = network_hash(cfg, tasks)
    meta = out_dir / "network.json"
    if meta.exists():
        found = json.loads(meta.read_text())
        if found.get("hash") != key:
            raise ConfigError(
                f"{out_dir} holds a network trained with another config or task set; use another --out"
            )
    elif dist_info.is_main:
        meta.write_text(json.dumps({"name": name, "tasks": list(tasks), "hash": key}, indent=1))
    done = out_dir / "done.json"
    if done.exists():
        return NetworkResult(name, tuple(tasks), json.loads(done.read_text())["best"], out_dir)
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
    engine = Engine(model, data, specs, cfg.train, cfg.data, out_dir, name, all_callbacks, device, dist_info)
    engine.run()
    if dist_info.is_main:
        done.write_text(json.dumps({"best": evaluation.best, "steps": engine.total_steps}, indent=1))
    barrier(dist_info)
    return NetworkResult(name, tuple(tasks), evaluation.best, out_dir)


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


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def train_grouping(
    cfg: RunConfig,
    grouping: Grouping,
    out_dir: str | Path,
    registry: TaskRegistry | None = None,
    console: Console | None = None,
) -> RunResult:
    """Train every network of ``grouping`` into ``out_dir`` and serve every task."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    registry = registry or load_registry(cfg.registry)
    configure_cpu(cfg.train.threads)
    dist_info, _ = init_distributed(cfg.train.device)
    from taskgroup.training.pretrain import resolve_pretrained  # it trains through this module

    cfg = resolve_pretrained(cfg)
    if dist_info.is_main:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_mapping(cfg), sort_keys=False))
        (out_dir / "grouping.yaml").write_text(grouping.to_yaml())
    handler = _log_to(out_dir / "log.txt") if dist_info.is_main else logging.NullHandler()
    try:
        data = prepare_data(cfg.data, registry, grouping.tasks, report_dir=out_dir)
        log.info(
            "data: %s (networks chosen on the %s; %s)",
            data.root,
            data.val_source,
            f"reported on the {data.test_source} too" if data.test_source else "no test split",
        )
        networks: dict[str, NetworkResult] = {}
        progress = ProgressCallback.make_progress(console)
        with progress:
            for name, tasks in grouping.groups.items():
                networks[name] = train_network(
                    cfg,
                    registry,
                    tasks,
                    out_dir / "networks" / safe_name(name),
                    name,
                    data,
                    progress=progress,
                )
        served = serve_tasks(grouping, networks, registry)
        frames = [
            pd.read_csv(n.out_dir / "metrics.csv")
            for n in networks.values()
            if (n.out_dir / "metrics.csv").exists()
        ]
        metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if dist_info.is_main:
            served.to_csv(out_dir / "served.csv", index=False)
            metrics.to_csv(out_dir / "metrics.csv", index=False)
        return RunResult(grouping, networks, served, metrics)
    finally:
        log.removeHandler(handler)
        handler.close()
