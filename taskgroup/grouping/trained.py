"""The trained objective: Optuna over partitions whose value is a real short training (issue 6).

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
beside the choice (:meth:`TrainedGains.test_gains`, :meth:`TrainedGains.served_test_gains`) and
never used by the study.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import optuna

from taskgroup.config import RunConfig
from taskgroup.grouping.optimize import OptunaResult, decode, enqueue_start, groups_of, owned_study
from taskgroup.metrics.summary import relative_gain
from taskgroup.tasks import TaskRegistry
from taskgroup.training.data import TrainingData, prepare_data
from taskgroup.training.run import final_scores, network_folder, train_network

PRUNERS = ("median", "successive_halving", "none")


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r}; one of {', '.join(PRUNERS)}")


@dataclasses.dataclass
class TrainedGains:
    """Realised relative gains of groups, each group trained once into ``work_dir``."""

    cfg: RunConfig
    registry: TaskRegistry
    tasks: Sequence[str]
    work_dir: Path
    data: TrainingData | None = None
    trained: int = 0  # networks trained by this object (not found done)

    def __post_init__(self) -> None:
        self.tasks = list(self.tasks)
        self.work_dir = Path(self.work_dir)
        self._scores: dict[tuple[str, ...], dict[str, float]] = {}
        # per network, its members' primary test metric (None: no test scores)
        self._test: dict[tuple[str, ...], dict[str, float] | None] = {}

    def _data(self) -> TrainingData:
        if self.data is None:
            self.data = prepare_data(self.cfg.data, self.registry, self.tasks)
        return self.data

    @property
    def test_source(self) -> str | None:
        """Where the held-out test split comes from (None: the data has none)."""
        return self._data().test_source

    def folder(self, group: Sequence[str]) -> Path:
        key = tuple(sorted(group))
        return network_folder(self.work_dir, "+".join(key), self.cfg, key)

    def is_trained(self, group: Sequence[str]) -> bool:
        """Whether the group's network is trained (its scores are known without training)."""
        return tuple(sorted(group)) in self._scores or (self.folder(group) / "done.json").exists()

    def scores(self, group: Sequence[str]) -> dict[str, float]:
        """Each member's primary validation metric at the final step of the group's network."""
        key = tuple(sorted(group))
        if key not in self._scores:
            folder = self.folder(key)
            done = (folder / "done.json").exists()
            train_network(self.cfg, self.registry, key, folder, "+".join(key), self._data())
            self.trained += not done
            final = final_scores(folder)
            primary = {t: self.registry[t].primary_metric.name for t in key}
            self._scores[key] = {t: float(final[t]["metrics"][primary[t]]) for t in key}
            tested = all("test_metrics" in final[t] for t in key)
            self._test[key] = (
                {t: float(final[t]["test_metrics"][primary[t]]) for t in key} if tested else None
            )
        return self._scores[key]

    def test_scores(self, group: Sequence[str]) -> dict[str, float] | None:
        """Each member's primary held-out test metric at the same final step (None when the data
        has no test split, or the network was trained before test scoring)."""
        self.scores(group)
        return self._test[tuple(sorted(group))]

    def _over_alone(
        self, group: Sequence[str], values: dict[str, float], alone: dict[str, float]
    ) -> dict[str, float]:
        """Each member's relative gain of ``values`` over its value trained alone."""
        return {
            t: relative_gain(values[t], alone[t], self.registry[t].primary_metric.higher_is_better)
            for t in group
        }

    def gains(self, group: Sequence[str]) -> dict[str, float]:
        """Each member's relative gain in the group over the member trained alone (0 alone)."""
        if len(group) == 1:
            return {group[0]: 0.0}
        return self._over_alone(group, self.scores(group), {t: self.scores((t,))[t] for t in group})

    def test_gains(self, group: Sequence[str]) -> dict[str, float] | None:
        """:meth:`gains` on the held-out test split (None without test scores)."""
        values = self.test_scores(group)
        if values is None:
            return None
        if len(group) == 1:
            return {group[0]: 0.0}
        alone = {}
        for t in group:
            scores = self.test_scores((t,))
            if scores is None:
                return None
            alone[t] = scores[t]
        return self._over_alone(group, values, alone)

    def served_test_gains(self, groups: Sequence[Sequence[str]]) -> dict[str, float] | None:
        """Each task's realised test gain in the network that serves it: among the groups that
        hold it, the best on *validation* (its final primary metric), as ``taskgroup train``
        serves overlapping groups. None unless every network needed (the groups and each task
        alone) is already trained and has test scores: nothing is trained here."""
        needed = {tuple(sorted(g)) for g in groups} | {(t,) for g in groups for t in g}
        if not all(self.is_trained(g) for g in needed):
            return None
        out: dict[str, float] = {}
        for t in dict.fromkeys(t for g in groups for t in g):
            pick = max if self.registry[t].primary_metric.higher_is_better else min
            home = pick((g for g in groups if t in g), key=lambda g: self.scores(g)[t])
            gains = self.test_gains(home)
            if gains is None:
                return None
            out[t] = gains[t]
        return out


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else 0.0


def trained_objective(gains: TrainedGains, max_groups: int):
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
    gains: TrainedGains,
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
