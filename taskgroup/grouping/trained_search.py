"""The trained objective: Optuna over partitions whose value is a real short training (issue 6).

Torch-free: the study asks a :class:`GroupGains` (the stage's
:class:`~taskgroup.stages.trained_gains.TrainedGains`, which trains the networks) for the
realised gains of each group.

Where the predicted objective (:mod:`taskgroup.grouping.optimize`) scores a partition from an
affinity matrix, this one trains it: every group of a trial's partition is a network trained
through the engine (:func:`taskgroup.training.run.train_network`), each task scored at its
network's final validation evaluation, and the trial's value is the mean relative gain of the
tasks over each task trained alone (direction-aware; a task whose single-task score is exactly 0
has no relative gain and is left out of the mean). A network (task set) is trained once for the
whole study, whichever trials contain it (folders keyed by task set and config hash), so a
stopped search resumes without retraining anything. The study is run by one process at a time,
as the predicted one (:func:`~taskgroup.grouping.optimize.owned_study`): on a resume, a trial a
kill caught running is failed and its start partition, if it was one, tried again (a start
partition is done once a trial completed or pruned it).

Pruning: the groups of a trial are trained largest first; after each one the trial reports the
mean gain of the tasks trained so far at step = their number, and the study's pruner (median by
default, any Optuna pruner) may stop it before its remaining networks are trained.

Everything is chosen on validation; when the data has a held-out test split, the same networks'
test scores (at the same final step) give each partition's realised *test* gain, reported
beside the choice (``TrainedGains.test_gains``, ``TrainedGains.served_test_gains``) and
never used by the study.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import optuna

from taskgroup.grouping.optimize import OptunaResult, decode, enqueue_start, groups_of, owned_study

PRUNERS = ("median", "successive_halving", "none")


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r}; one of {', '.join(PRUNERS)}")


class GroupGains(Protocol):
    """What the trained objective measures through: the tasks, and per group (trained once)
    each member's primary validation metric and its relative gain over the member alone."""

    tasks: Sequence[str]

    def scores(self, group: Sequence[str]) -> dict[str, float]: ...

    def gains(self, group: Sequence[str]) -> dict[str, float]: ...


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else 0.0


def trained_objective(gains: GroupGains, max_groups: int):
    tasks = gains.tasks

    def objective(trial: optuna.Trial) -> float:
        labels = [trial.suggest_int(f"g{k}", 0, min(k, max_groups - 1)) for k in range(len(tasks))]
        groups = decode(labels, tasks)
        trial.set_user_attr("groups", [list(g) for g in groups])
        seen: list[float] = []
        done = 0
        for group in sorted(groups, key=lambda g: (-len(g), g)):
            seen += list(gains.gains(group).values())
            done += len(group)
            trial.report(_mean(seen), step=done)
            if done < len(tasks) and trial.should_prune():
                raise optuna.TrialPruned(f"mean gain {_mean(seen):+.4f} after {done} tasks")
        return _mean(seen)

    return objective


def trained_search(
    gains: GroupGains,
    max_groups: int,
    trials: int,
    storage: str | None = None,
    study_name: str = "trained",
    seed: int = 0,
    start: Sequence[Sequence[Sequence[str]]] = (),
    pruner: str = "median",
) -> OptunaResult:
    """Run (or resume) a TPE study of trained partitions to ``trials`` finished (complete or
    pruned) trials, started from the ``start`` partitions; every task alone is trained first
    (the reference of every gain)."""
    tasks = gains.tasks
    for t in tasks:
        gains.scores((t,))
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    with owned_study(
        storage,
        study_name,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True, group=False),
        pruner=make_pruner(pruner),
    ) as study:
        # a pruned start partition was judged: only those the study has not seen are tried again
        enqueue_start(study, start, tasks, max_groups, evaluated=finished)
        done = sum(t.state in finished for t in study.trials)
        if done < trials:
            study.optimize(trained_objective(gains, max_groups), n_trials=trials - done, catch=())
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"study {study_name}: every trial was pruned; raise the number of trials")
    best = max(complete, key=lambda t: (t.value, -len(t.user_attrs["groups"])))
    return OptunaResult(
        groups_of(best),
        float(best.value),
        [(float(best.value), len(groups_of(best)), groups_of(best))],
        len(complete),
        len({groups_of(t) for t in complete}),
        sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
    )
