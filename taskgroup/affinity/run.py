"""``taskgroup affinity``: measure inter-task affinity by several estimators into one run folder.

    <out>/config.yaml
    <out>/probe_run/            the multi-task training the probes ran in (engine run folder;
                                probe_run_1, ... for the further seeds of affinity.runs)
    <out>/jobs/                 networks of the trained estimators; <out>/jobs.db their queue
    <out>/<method>/             matrix.csv, long.parquet, heatmap.png, meta.json (see report.py)

``lookahead``, ``gradient``, ``readout`` and ``attribution`` share one real AU-style training of the given tasks
with an :class:`AffinityProbe` (repeated over ``affinity.runs`` seeds and averaged);
``pairwise`` and ``subsets`` queue their networks on one Optuna study (single-task networks
shared) and run ``workers`` local worker processes on it; more machines join with
``taskgroup worker --storage URL --study NAME``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from rich.console import Console

from taskgroup.affinity.corrections import correct, unestimated
from taskgroup.affinity.probes import (
    ATTRIBUTION_QUANTITIES,
    GRADIENT_QUANTITIES,
    LOOKAHEAD_QUANTITIES,
    READOUT_QUANTITIES,
    AffinityProbe,
)
from taskgroup.affinity.report import planted_separation, print_summary, write_method
from taskgroup.affinity.trained import pairwise_jobs, pairwise_matrix, subset_jobs, subsets_matrix
from taskgroup.config import RunConfig, config_hash, from_mapping, hide_password, to_mapping
from taskgroup.data.synthetic import planted_labels
from taskgroup.errors import ConfigError
from taskgroup.matrices import REPORTED, AffinityMatrix
from taskgroup.runtime import configure_cpu, load_state, save_state
from taskgroup.tasks import TaskRegistry, load_registry
from taskgroup.training import ProgressCallback, data_tasks, prepare_data, train_network
from taskgroup.training.jobs import (
    NetworkJob,
    create_queue,
    job_results,
    job_seconds,
    sqlite_url,
    storage_for,
    work_off,
)
from taskgroup.training.run import network_config

log = logging.getLogger("taskgroup")

#: each probe method's quantities (its own rows of the long table)
PROBE_QUANTITIES = {
    "lookahead": LOOKAHEAD_QUANTITIES,
    "gradient": GRADIENT_QUANTITIES,
    "readout": READOUT_QUANTITIES,
    "attribution": ATTRIBUTION_QUANTITIES,
}
PROBE_METHODS = tuple(PROBE_QUANTITIES)
TRAINED_METHODS = ("pairwise", "subsets")
STUDY = "affinity"


@dataclasses.dataclass
class AffinityResult:
    tasks: list[str]
    matrices: dict[str, np.ndarray]  # method -> reported matrix
    folders: dict[str, Path]
    separation: dict[str, dict[str, Any]]  # method -> planted-group separation (synthetic data)

    def affinity_matrices(self) -> dict[str, AffinityMatrix]:
        """Method -> its reported matrix as an :class:`AffinityMatrix` (its meta: the method's
        folder and, on synthetic data, the planted-group separation)."""
        return {
            method: AffinityMatrix(
                tuple(self.tasks),
                matrix,
                method,
                REPORTED,
                {
                    **({"folder": str(self.folders[method])} if method in self.folders else {}),
                    **({"planted_separation": self.separation[method]} if method in self.separation else {}),
                },
            )
            for method, matrix in self.matrices.items()
        }


def _types(tasks: Sequence[str], registry: TaskRegistry) -> list[str]:
    return [registry[t].kind.short for t in tasks]


def _separation(matrix: np.ndarray, tasks: Sequence[str], synthetic: bool) -> dict[str, Any] | None:
    return planted_separation(matrix, planted_labels(tasks), tasks) if synthetic else None


def probe_cadence(every: int, total_steps: int, min_probes: int) -> int:
    """The steps between two probes of a run of ``total_steps``: ``every``, unless that gives
    fewer than ``min_probes`` probes (a run of few tasks), then ``total_steps // min_probes``
    (at least 1), so that every method measures whatever the number of tasks."""
    if total_steps // every >= min_probes:
        return every
    return max(1, total_steps // min_probes)


def run_probes(
    cfg: RunConfig, registry: TaskRegistry, tasks: list[str], out_dir: Path, console: Console
) -> tuple[list[AffinityProbe], dict[str, Any]]:
    """``affinity.runs`` multi-task trainings of ``tasks`` with the probes (seeds ``train.seed``,
    ``train.seed + 1``, ...; folders ``probe_run``, ``probe_run_1``, ...); each resumes, and a
    finished one is reused. The data is prepared once, by the first run that trains, and shared
    by the others: the runs differ in ``train`` alone, and a training reads its data without
    changing it (as the networks of a grouping share theirs)."""
    aff = cfg.affinity
    probes = []
    data = None
    start = time.perf_counter()
    total = dataclasses.replace(cfg.train, steps_per_task=aff.steps_per_task or cfg.train.steps_per_task)
    total = total.total_steps(len(tasks))
    every = probe_cadence(aff.every, total, aff.min_probes)
    lookahead_every = probe_cadence(aff.lookahead_every or aff.every, total, aff.min_probes)
    for name, asked, used in (
        ("every", aff.every, every),
        ("lookahead_every", aff.lookahead_every, lookahead_every),
    ):
        if asked is not None and used != asked:
            log.info(
                "affinity.%s %d gives fewer than affinity.min_probes=%d probes in a run of %d steps "
                "(%d tasks): probing every %d steps",
                name,
                asked,
                aff.min_probes,
                total,
                len(tasks),
                used,
            )
    for run in range(aff.runs):
        train = dataclasses.replace(
            cfg.train,
            steps_per_task=aff.steps_per_task or cfg.train.steps_per_task,
            seed=cfg.train.seed + run,
        )
        run_cfg = dataclasses.replace(cfg, train=train)
        probe = AffinityProbe(
            every,
            lookahead="lookahead" in aff.methods,
            gradient="gradient" in aff.methods,
            blocks=aff.blocks,
            batch=aff.probe_batch,
            lookahead_every=lookahead_every,
            readout="readout" in aff.methods,
            readout_batches=aff.readout_batches,
            attribution="attribution" in aff.methods,
            attribution_images=aff.attribution_images,
            attribution_layer=aff.attribution_layer,
            attribution_map=aff.attribution_map,
            occlusion_cell=aff.occlusion_cell,
        )
        run_dir = out_dir / ("probe_run" if run == 0 else f"probe_run_{run}")
        saved = run_dir / "probes.pt"
        if saved.exists():
            probe.load_state_dict(load_state(saved))
            missing = sorted(q for q in _wanted(aff.methods) if q not in probe.values)
            if missing:
                raise ConfigError(
                    f"{run_dir}: this probe training was run without {', '.join(missing)} "
                    f"(asked by affinity.methods {list(aff.methods)}); measure into another --out"
                )
        else:
            if data is None:
                data = prepare_data(cfg.data, registry, tasks, report_dir=out_dir)
                console.print(
                    f"data: {data.root} (validation: {data.val_source})", highlight=False, soft_wrap=True
                )
            with ProgressCallback.make_progress(console) as progress:
                train_network(run_cfg, registry, tasks, run_dir, "affinity", data, [probe], progress)
            save_state(probe.state_dict(), saved)
        probes.append(probe)
    steps = aff.runs * train.total_steps(len(tasks))
    cost = {
        "wall_seconds": time.perf_counter() - start,
        "training_steps": steps,
        "probe_seconds": sum(p.cost["seconds"] for p in probes),
        "probes": sum(p.cost["probes"] for p in probes),
        "probe_every": every,
        "lookahead_every": lookahead_every,
        "forward_passes": steps + sum(p.cost["forward"] for p in probes),
        "backward_passes": steps + sum(p.cost["backward"] for p in probes),
        "lookahead_optimiser_steps": sum(p.cost["optimiser_steps"] for p in probes),
        "trainings": aff.runs,
    }
    return probes, cost


def _wanted(methods: Sequence[str]) -> set[str]:
    """The probe quantities the given methods report."""
    return {q for m in methods for q in PROBE_QUANTITIES.get(m, ())}


def mean_over_runs(probes: Sequence[AffinityProbe]) -> dict[str, np.ndarray]:
    """Each quantity averaged over the probes of each run, then over the runs: the quantities
    every run recorded (runs measured with more methods than asked, reused from the folder,
    keep their other quantities to themselves)."""
    per_run = [p.matrices() for p in probes]
    common = [name for name in per_run[0] if all(name in m for m in per_run)]
    return {name: np.nanmean(np.stack([m[name] for m in per_run]), axis=0) for name in common}


def queue_name(storage: Any, job_cfg: RunConfig) -> str:
    """The study the trained estimators' networks are queued on: ``affinity-<hash>`` of the
    networks' config, so that runs of other configs on one storage never share a queue (and a
    run of the same networks shares theirs, as compare does). A queue of an earlier taskgroup
    (the study ``affinity``) of exactly this config is kept, so its folders resume."""
    legacy = [s for s in storage.get_all_studies() if s.study_name == STUDY]
    if legacy and "config" in legacy[0].user_attrs:
        try:  # read as this taskgroup reads it (fields added since take their defaults)
            stored = from_mapping(RunConfig, legacy[0].user_attrs["config"], f"study {STUDY}")
        except ConfigError:  # a config this taskgroup cannot read is not this run's
            stored = None
        if stored is not None and network_config(stored) == network_config(job_cfg):
            return STUDY
    return f"{STUDY}-{config_hash(network_config(job_cfg))}"


def run_trained(
    cfg: RunConfig,
    registry: TaskRegistry,
    tasks: list[str],
    out_dir: Path,
    workers: int,
    console: Console | None = None,
    devices: Sequence[str] = (),
    work_root: Path | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Queue the pairwise/subsets networks and work them off with ``workers`` processes (on
    ``devices``, one GPU per worker, see :func:`taskgroup.training.jobs.work_off`)."""
    aff = cfg.affinity
    seed = cfg.train.seed
    jobs: dict[str, NetworkJob] = {}
    if "pairwise" in aff.methods:
        jobs.update({j.key: j for j in pairwise_jobs(tasks, seed)})
    if "subsets" in aff.methods:
        jobs.update({j.key: j for j in subset_jobs(tasks, aff.subset_size, aff.subsets, seed)})
    job_cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            cfg.train, steps_per_task=aff.trained_steps_per_task, steps=aff.trained_steps or cfg.train.steps
        ),
    )
    url = aff.storage or sqlite_url(out_dir / "jobs.db")
    storage = storage_for(url, aff.heartbeat, aff.grace)
    name = queue_name(storage, job_cfg)
    study = create_queue(storage, name, job_cfg, list(jobs.values()), out_dir / "jobs", work_root)
    line = (
        f"affinity: {len(jobs)} networks on study {name!r} of {hide_password(url)} "
        f"(more machines: taskgroup worker --storage URL --study {name})"
    )
    log.info(line)
    if console is not None:
        console.print(line, highlight=False, soft_wrap=True)
    start = time.perf_counter()
    work_off(study, url, workers, aff.heartbeat, aff.grace, cfg.train.threads, registry, devices, work_root)
    # the study may hold other runs' jobs too (pairwise then subsets on one folder): only the
    # networks these methods use are counted, whoever trained them and when
    results = {k: v for k, v in job_results(study).items() if k in jobs}
    seconds = job_seconds(study, set(jobs))
    steps = sum(job_cfg.train.total_steps(len(NetworkJob.from_key(k).tasks)) for k in results)
    cost = {
        "wall_seconds": time.perf_counter() - start,
        "training_seconds": seconds,
        "trainings": len(results),
        "training_steps": steps,
        "forward_passes": steps,
        "backward_passes": steps,
        "workers": max(workers, len(devices)),
        **({"devices": list(devices)} if devices else {}),
        "storage": hide_password(url),
    }
    return results, cost


def run_affinity(
    cfg: RunConfig,
    out_dir: str | Path,
    tasks: Sequence[str] | None = None,
    registry: TaskRegistry | None = None,
    workers: int = 1,
    console: Console | None = None,
    devices: Sequence[str] = (),
    work_root: Path | None = None,
) -> AffinityResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    console = console or Console()
    registry = registry or load_registry(cfg.registry)
    tasks = data_tasks(cfg.data, registry, tasks or None, console)  # a root of some tasks: those
    configure_cpu(cfg.train.threads)
    from taskgroup.training.pretrain import resolve_pretrained

    cfg = resolve_pretrained(cfg)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(to_mapping(cfg), sort_keys=False))
    synthetic = cfg.data.root is None
    aff = cfg.affinity
    types = _types(tasks, registry)
    matrices: dict[str, np.ndarray] = {}
    folders: dict[str, Path] = {}
    separation: dict[str, dict[str, Any]] = {}
    config = to_mapping(cfg)

    def report(method: str, matrix: np.ndarray, rows, meta, quantities=None) -> None:
        sep = _separation(matrix, tasks, synthetic)
        meta = {**meta, "config": config}
        if sep:
            meta["planted_separation"] = sep
            separation[method] = sep
        matrices[method] = matrix
        folders[method] = write_method(out_dir, method, matrix, tasks, registry, rows, meta, quantities)
        print_summary(console, method, matrix, tasks, registry, separation=sep)

    if any(m in aff.methods for m in PROBE_METHODS):
        probes, cost = run_probes(cfg, registry, tasks, out_dir, console)
        mean = mean_over_runs(probes)
        missing = sorted(_wanted(aff.methods) - set(mean))
        if missing:  # min_probes >= 1 makes this unreachable from a fresh run; kept as the guard
            raise ConfigError(
                f"{out_dir}: the probe trainings took no measurement of {', '.join(missing)}; "
                f"lower affinity.every / lookahead_every or raise affinity.min_probes"
            )
        rows = [{**row, "run": k} for k, probe in enumerate(probes) for row in probe.trajectory(tasks)]

        def report_probe(method: str, key: str, extra: dict, saved: dict) -> None:
            """A probe method's folder: its matrix (``mean[key]`` corrected) and its own rows."""
            left = unestimated(mean[key], types, aff.correction)
            if left:
                log.warning(
                    "%s: the %s correction cannot be estimated for %s (fewer than two pairs): left as measured",
                    method,
                    aff.correction,
                    ", ".join(left),
                )
            meta = {
                "cost": cost,
                "correction": aff.correction,
                "correction_not_estimated": left,
                **extra,
                "runs": len(probes),
            }
            reported = correct(mean[key], types, aff.correction)
            own = [r for r in rows if r["quantity"] in PROBE_QUANTITIES[method]]
            report(method, reported, own, meta, saved)

        if "lookahead" in aff.methods:
            report_probe(
                "lookahead",
                "lookahead",
                {
                    "normalisation": "Z = 1 - L_j(after) / L_j(before), divided by the encoder learning rate "
                    "of its step (TAG); lookahead_raw.csv holds Z undivided",
                    "averaged_over_probes": sum(len(p.steps.get("lookahead", [])) for p in probes),
                },
                {"uncorrected": mean["lookahead"], "lookahead_raw": mean["lookahead_raw"]},
            )
        if "gradient" in aff.methods:
            report_probe(
                "gradient",
                "cosine",
                {
                    "reported": "cosine similarity of the per-task gradients on the shared parameters, "
                    "averaged over probes, then corrected",
                    "averaged_over_probes": sum(len(p.steps.get("cosine", [])) for p in probes),
                    "quantities": {
                        "cosine": "cosine similarity (uncorrected)",
                        "first_order": "lr * <g_i, g_j> / L_j: first-order lookahead (plain SGD step)",
                        "conflict": "share of probes with <g_i, g_j> < 0 (conflict rate)",
                    },
                },
                {"cosine": mean["cosine"], "first_order": mean["first_order"], "conflict": mean["conflict"]},
            )
        if "readout" in aff.methods:
            report_probe(
                "readout",
                "readout",
                {
                    "reported": "cosine similarity of the tasks' readout profiles (mean |F * dL/dF| per "
                    "channel of the shared feature map, at the end of the training), averaged over runs, "
                    "then corrected",
                    "readout_batches": aff.readout_batches,
                },
                {"uncorrected": mean["readout"]},
            )
            for k, probe in enumerate(probes):
                name = "profiles.csv" if k == 0 else f"profiles_{k}.csv"
                frame = pd.DataFrame(probe.profiles, index=tasks)
                frame.columns = [f"channel_{c}" for c in frame.columns]
                frame.to_csv(folders["readout"] / name, index_label="task")
        if "attribution" in aff.methods:
            report_probe(
                "attribution",
                "attribution",
                {
                    "reported": "cosine similarity of the tasks' attribution maps (|F * ds/dF| summed over "
                    "the channels of F, per token, for a label-free score s of each head's output; F the "
                    "shared feature map, or the patch embeddings with attribution_layer 'input'; with "
                    "attribution_map 'occlusion', the L1 change of the head's output when each "
                    "occlusion_cell square of the image is blanked; with 'hybrid', occlusion for the "
                    "classification heads and gradient times input per cell for the others) on a "
                    "shared probe set, averaged over its images and over runs, then corrected",
                    "attribution_images_per_task": aff.attribution_images,
                    "attribution_layer": aff.attribution_layer,
                    "attribution_map": aff.attribution_map,
                    "occlusion_cell": aff.occlusion_cell,
                },
                {"uncorrected": mean["attribution"]},
            )
    if any(m in aff.methods for m in TRAINED_METHODS):
        results, cost = run_trained(cfg, registry, tasks, out_dir, workers, console, devices, work_root)
        for method, build in (("pairwise", pairwise_matrix), ("subsets", subsets_matrix)):
            if method not in aff.methods:
                continue
            matrix = build(results, tasks, registry, cfg.train.seed)
            rows = [
                {
                    "quantity": "gain",
                    "step": None,
                    "source": s,
                    "target": t,
                    "value": matrix[i, j],
                    "lr": None,
                }
                for i, s in enumerate(tasks)
                for j, t in enumerate(tasks)
            ]
            report(
                method,
                matrix,
                rows,
                {
                    "cost": cost,
                    "gain": "direction-aware relative gain of the target's primary validation metric (best step) "
                    "over the target trained alone",
                    "steps_per_task": aff.trained_steps_per_task,
                    **({"steps_per_network": aff.trained_steps} if aff.trained_steps else {}),
                },
            )
    return AffinityResult(tasks, matrices, folders, separation)
