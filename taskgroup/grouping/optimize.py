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
partitions (from the graph methods) are enqueued first, so the search starts from them; on a
resume, every start partition that no trial evaluated (and none waits to) is enqueued again, so
that a kill never loses one (:func:`enqueue_start`).

A study is run by one process at a time (:func:`owned_study`): on a SQLite file the process holds
the study's lock (an ``flock`` lock beside the file, as :func:`taskgroup.runtime.lock_folder`
locks a folder: a second process fails at once with a
:class:`~taskgroup.runtime.FolderLocked` naming the holder), and fails the trials that a killed
process left running, which would otherwise stay ``RUNNING`` forever. On a server storage
(PostgreSQL), which no file lock covers, running trials are left as they are (their process may
be alive on another machine); their start partitions are enqueued again all the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna

from taskgroup.grouping.partition import canonical_groups
from taskgroup.grouping.predict import GainPredictor
from taskgroup.locks import LockUnavailable, hold_lock

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


def groups_of(trial: optuna.trial.FrozenTrial) -> tuple[tuple[str, ...], ...]:
    """The (canonical) partition a trial evaluated."""
    return tuple(tuple(g) for g in trial.user_attrs["groups"])


def study_lock_path(storage: Any, study_name: str) -> Path | None:
    """The lock file of a study on a SQLite file, beside it (``.<file>.<study>.lock``); None for
    an in-memory study or another storage (a server's, which no file lock covers)."""
    if not isinstance(storage, str):
        return None
    from sqlalchemy.engine import make_url

    try:
        url = make_url(storage)
    except Exception:  # not a URL: optuna says so when it opens it
        return None
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    database = Path(url.database).expanduser().resolve()
    name = re.sub(r"[^\w.-]", "_", study_name)
    return database.parent / f".{database.name}.{name}.lock"


@contextlib.contextmanager
def _study_lock(path: Path | None, study_name: str) -> Iterator[bool]:
    """Hold a study's lock (yields whether it is held: False without a lock file, or on a file
    system that cannot lock files, where the study runs unlocked, with a warning)."""
    if path is None:
        yield False
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                hold_lock(
                    path,
                    busy=lambda holder: (
                        f"study {study_name!r} is being run by another taskgroup process ({holder}; "
                        f"lock {path}): two processes running one study would fail each other's "
                        "trials; wait for it to end, or search into another folder (--out) or storage"
                    ),
                    unavailable=lambda why: why,
                )
            )
        except LockUnavailable as exc:
            log.warning(
                "study %s: its lock %s cannot be taken (%s): the study runs unlocked, and trials "
                "left running by a killed process stay so",
                study_name,
                path,
                exc,
            )
            yield False
            return
        yield True


def fail_orphans(study: optuna.Study) -> int:
    """Fail the trials of ``study`` left running: only for a process that holds the study's lock,
    so that none of them is being run (their process was killed). Returns how many."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in running:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    if running:
        log.info(
            "study %s: %d trial(s) left running by a process that ended, failed: %s",
            study.study_name,
            len(running),
            ", ".join(str(t.number) for t in running),
        )
    return len(running)


@contextlib.contextmanager
def owned_study(storage: Any, study_name: str, **create: Any) -> Iterator[optuna.Study]:
    """Create or load (``optuna.create_study(..., load_if_exists=True)``) a study that this process
    runs alone: on a SQLite file it holds the study's lock while the block runs and fails the
    trials a killed process left running (see the module doc)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _study_lock(study_lock_path(storage, study_name), study_name) as locked:
        study = optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True, **create)
        if locked:
            fail_orphans(study)
        yield study


def enqueue_start(
    study: optuna.Study,
    start: Sequence[Sequence[Sequence[str]]],
    tasks: Sequence[str],
    max_groups: int,
    evaluated: Sequence[optuna.trial.TrialState] = (optuna.trial.TrialState.COMPLETE,),
) -> int:
    """Enqueue every start partition (of at most ``max_groups`` groups) that no trial in a state
    of ``evaluated`` holds and none waits to evaluate, each once; returns how many. Not optuna's
    ``skip_if_exists``: it skips a partition that any trial holds, a failed one too (a trial
    a kill caught running, failed by :func:`fail_orphans`), so that partition would be lost."""
    known: set[tuple[tuple[str, ...], ...]] = set()
    for t in study.get_trials(deepcopy=False):
        if t.state in evaluated and "groups" in t.user_attrs:
            known.add(groups_of(t))
        elif t.state == optuna.trial.TrialState.WAITING:
            params = t.system_attrs.get("fixed_params", t.params)
            labels = [params.get(f"g{k}") for k in range(len(tasks))]
            if all(isinstance(lab, int) for lab in labels):
                known.add(decode(labels, tasks))
    added = 0
    for groups in start:
        if len(groups) > max_groups:
            continue
        params = encode(groups, tasks)
        key = decode(list(params.values()), tasks)
        if key not in known:
            study.enqueue_trial(params)
            known.add(key)
            added += 1
    return added


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
    with owned_study(storage, study_name, sampler=sampler, directions=directions) as study:
        enqueue_start(study, start, tasks, max_groups)
        done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        if done < trials:
            study.optimize(
                _objective(predictor, tasks, max_groups, multi_objective),
                n_trials=trials - done,
                show_progress_bar=progress,
            )
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
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
