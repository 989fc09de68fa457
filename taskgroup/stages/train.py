"""``taskgroup train``: every network of a grouping trained into a run folder and every task
served from its best network (the run folder and its rules: :mod:`taskgroup.training.run`).

A stage: it sets up the run (CPU threads, distributed, the folder's lock and config check, the
data, the pretrained encoder) and trains through :func:`taskgroup.training.run.train_network`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pandas as pd
from rich.console import Console

from taskgroup.config import RunConfig
from taskgroup.groupings import Grouping
from taskgroup.runtime import atomic_write_text, configure_cpu, lock_folder
from taskgroup.tasks import TaskRegistry, load_registry
from taskgroup.training.callbacks import ProgressCallback
from taskgroup.training.data import TrainingData, prepare_data
from taskgroup.training.distributed import init_distributed
from taskgroup.training.pretrain import resolve_pretrained
from taskgroup.training.run import (
    CONFIG_HISTORY,
    RESUME_FLAG,
    NetworkResult,
    RunResult,
    check_run_folder,
    describe_changes,
    log,
    safe_name,
    serve_tasks,
    train_network,
    write_run_files,
)

__all__ = ["train_grouping"]


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
    resume_with_changes: bool = False,
) -> RunResult:
    """Train every network of ``grouping`` into ``out_dir`` and serve every task. The folder is
    locked for the run; one of another config or grouping is refused before anything is written
    (``resume_with_changes``: but for learning rates, see the module doc)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    registry = registry or load_registry(cfg.registry)
    configure_cpu(cfg.train.threads)
    dist_info, _ = init_distributed(cfg.train.device)
    with lock_folder(out_dir) if dist_info.is_main else contextlib.nullcontext():
        # compared as the folder holds it (the encoder's path), before pretraining it if need be
        changes = check_run_folder(
            out_dir, resolve_pretrained(cfg, build=False), grouping, resume_with_changes
        )
        handler = _log_to(out_dir / "log.txt") if dist_info.is_main else logging.NullHandler()
        try:
            # the data first: bad data is refused before minutes of pretraining
            data = prepare_data(cfg.data, registry, grouping.tasks, report_dir=out_dir)
            cfg = resolve_pretrained(cfg)
            # only now: a run refused for its data leaves no config.yaml to block the fixed rerun
            if dist_info.is_main:
                write_run_files(out_dir, cfg, grouping, changes)
            if changes:
                log.info(
                    "config changed (%s): %s; recorded in %s",
                    RESUME_FLAG,
                    describe_changes(changes),
                    CONFIG_HISTORY,
                )
            return _train_networks(
                cfg, grouping, out_dir, registry, data, console, resume_with_changes, dist_info.is_main
            )
        finally:
            log.removeHandler(handler)
            handler.close()


def _train_networks(
    cfg: RunConfig,
    grouping: Grouping,
    out_dir: Path,
    registry: TaskRegistry,
    data: TrainingData,
    console: Console | None,
    resume_with_changes: bool,
    main: bool,
) -> RunResult:
    """The part of :func:`train_grouping` that runs with the folder locked, its data loaded and
    its files written."""
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
                resume_with_changes=resume_with_changes,
                resumable=True,
            )
    served = serve_tasks(grouping, networks, registry)
    frames = [
        pd.read_csv(n.out_dir / "metrics.csv")
        for n in networks.values()
        if (n.out_dir / "metrics.csv").exists()
    ]
    metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if main:
        atomic_write_text(out_dir / "served.csv", served.to_csv(index=False))
        atomic_write_text(out_dir / "metrics.csv", metrics.to_csv(index=False))
    return RunResult(grouping, networks, served, metrics)
