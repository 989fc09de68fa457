"""Optuna search over partitions of the tasks into at most K groups (issue 6).

Encoding (permutation-invariant): the group labels of a partition mean nothing, so a partition
is stored as its *restricted growth string*: tasks in a fixed order, task k takes a label in
``0..min(k, K - 1)`` (parameter ``g<k>``, one fixed integer distribution per task, as Optuna
needs), and the labels are then renumbered in order of first use. Every relabelling of a
partition decodes to the same groups; the canonical form is kept on the trial
(``user_attrs["groups"]``) and a partition seen before is not evaluated again (its value is
taken from the first trial that found it).

Objectives: the predicted mean gain of the partition (:meth:`GainPredictor.total`, maximised;
TPE), or that and the compute it costs (networks, minimised) with NSGA-II, whose Pareto front
is reported. Under the engine's per-task step budget a partition trains the same number of
samples whatever its groups (``steps_per_task`` x tasks x batch), so the compute axis of a
partition is its number of networks: encoders to train, store and run.

The studies live on an RDB storage (a SQLite file by default, a PostgreSQL URL works the same):
a search that is stopped resumes where it was, up to ``trials`` finished trials. Known
partitions (from the graph methods) are enqueued first, so the search starts from them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import optuna

from taskgroup.grouping.partition import canonical_groups
from taskgroup.grouping.predict import GainPredictor

log = logging.getLogger("taskgroup")


def canonical_labels(labels: Sequence[int]) -> list[int]:
    """Labels renumbered in order of first use (the restricted growth string)."""
    seen: dict[int, int] = {}
    return [seen.setdefault(int(lab), len(seen)) for lab in labels]


def decode(labels: Sequence[int], tasks: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    groups: dict[int, list[str]] = {}
    for t, lab in zip(tasks, canonical_labels(labels), strict=True):
        groups.setdefault(lab, []).append(t)
    return tuple(tuple(g) for g in groups.values())


def encode(groups: Sequence[Sequence[str]], tasks: Sequence[str]) -> dict[str, int]:
    """The parameters of a partition (its restricted growth string)."""
    where = {t: g for g, group in enumerate(groups) for t in group}
    missing = [t for t in tasks if t not in where]
    if missing:
        raise ValueError(f"the partition does not cover task(s) {', '.join(missing)}")
    return {f"g{k}": lab for k, lab in enumerate(canonical_labels([where[t] for t in tasks]))}


@dataclasses.dataclass
class OptunaResult:
    best: tuple[tuple[str, ...], ...]  # the partition of highest predicted gain
    best_value: float
    pareto: list[tuple[float, int, tuple[tuple[str, ...], ...]]]  # (gain, networks, groups)
    trials: int
    distinct: int  # distinct partitions evaluated
    pruned: int = 0  # trials stopped by the pruner (trained objective)


def _objective(predictor: GainPredictor, tasks: Sequence[str], max_groups: int, multi: bool):
    cache: dict[tuple, float] = {}  # decoded (canonical) partition -> predicted gain

    def objective(trial: optuna.Trial):
        labels = [trial.suggest_int(f"g{k}", 0, min(k, max_groups - 1)) for k in range(len(tasks))]
        groups = decode(labels, tasks)
        if groups not in cache:
            cache[groups] = predictor.total(groups)
        trial.set_user_attr("groups", [list(g) for g in groups])
        value = cache[groups]
        return (value, len(groups)) if multi else value

    return objective


def optuna_search(
    predictor: GainPredictor,
    max_groups: int,
    trials: int,
    storage: str | None = None,
    study_name: str = "search",
    multi_objective: bool = False,
    seed: int = 0,
    start: Sequence[Sequence[Sequence[str]]] = (),
    progress: bool = False,
) -> OptunaResult:
    """Run (or resume) the study to ``trials`` finished trials and read its result."""
    tasks = list(predictor.tasks)
    if max_groups < 1:
        raise ValueError(f"max_groups must be at least 1, got {max_groups}")
    if multi_objective:
        sampler: optuna.samplers.BaseSampler = optuna.samplers.NSGAIISampler(seed=seed)
        directions = ["maximize", "minimize"]
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=False)
        directions = ["maximize"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage, study_name=study_name, sampler=sampler, directions=directions, load_if_exists=True
    )
    if not study.trials:
        for groups in start:
            if len(groups) <= max_groups:
                study.enqueue_trial(encode(groups, tasks), skip_if_exists=True)
    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    if done < trials:
        study.optimize(
            _objective(predictor, tasks, max_groups, multi_objective),
            n_trials=trials - done,
            show_progress_bar=progress,
        )
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]

    def groups_of(t) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(g) for g in t.user_attrs["groups"])

    best_trial = max(complete, key=lambda t: (t.values[0], -len(t.user_attrs["groups"])))
    front = study.best_trials if multi_objective else [best_trial]
    pareto = sorted(
        {(float(t.values[0]), len(groups_of(t)), groups_of(t)) for t in front}, key=lambda x: (x[1], -x[0])
    )
    distinct = len({groups_of(t) for t in complete})
    return OptunaResult(groups_of(best_trial), float(best_trial.values[0]), pareto, len(complete), distinct)


def local_search(predictor: GainPredictor, groups: Sequence[Sequence[str]], max_groups: int) -> tuple:
    """Best-improvement moves of one task to another group (or a new one, within ``max_groups``)
    until none improves the predicted gain: the polish applied to the best Optuna partition and
    to every graph partition (hand-written: a few lines, no library does single-move ascent on
    a custom objective)."""
    current = [list(g) for g in groups]
    value = predictor.total(current)
    while True:
        best = None
        for a, group in enumerate(current):
            for t in group:
                targets = [b for b in range(len(current)) if b != a]
                if len(current) < max_groups and len(group) > 1:
                    targets.append(len(current))
                for b in targets:
                    trial = [list(g) for g in current] + ([[]] if b == len(current) else [])
                    trial[a].remove(t)
                    trial[b].append(t)
                    trial = [g for g in trial if g]
                    v = predictor.total(trial)
                    if v > value + 1e-12 and (best is None or v > best[0]):
                        best = (v, trial)
        if best is None:
            return canonical_groups(current, predictor.tasks), value
        value, current = best
