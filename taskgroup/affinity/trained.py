"""Affinity from trained networks: pairwise transfer (Standley et al. 2020) and task subsets
(higher-order, Li et al. 2023).

Both are sets of independent network trainings (:class:`taskgroup.training.jobs.NetworkJob`):
every task alone, then every pair (``pairwise``) or random subsets of a chosen size
(``subsets``). A task alone is one job whoever asks for it: ``pairwise`` and ``subsets`` share
their single-task networks, and a network already trained is never retrained.

Gains are direction-aware relative changes of a task's primary validation metric at its best
step (an early-stopped approximation, as Standley et al. train with a fixed budget):
``gain = (v - v_alone) / |v_alone|`` for DSC, IoU, accuracy, and the opposite sign for MRE.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import Ridge

from taskgroup.metrics.summary import relative_gain
from taskgroup.tasks import TaskRegistry
from taskgroup.training.jobs import NetworkJob


def single_jobs(tasks: Sequence[str], seed: int = 0) -> list[NetworkJob]:
    return [NetworkJob((t,), seed) for t in tasks]


def pairwise_jobs(tasks: Sequence[str], seed: int = 0) -> list[NetworkJob]:
    """Every task alone, then every unordered pair."""
    return single_jobs(tasks, seed) + [NetworkJob(p, seed) for p in itertools.combinations(tasks, 2)]


def subset_jobs(tasks: Sequence[str], size: int, count: int, seed: int = 0) -> list[NetworkJob]:
    """Every task alone, then ``count`` distinct random subsets of ``size`` tasks, drawn so that
    every task is in about the same number of them (each round is a random permutation cut into
    subsets)."""
    if not 2 <= size <= len(tasks):
        raise ValueError(f"subset size must be in 2..{len(tasks)}, got {size}")
    rng = np.random.default_rng([seed, 11])
    chosen: dict[tuple[str, ...], None] = {}
    attempts = 0
    while len(chosen) < count and attempts < 100 * count:
        order = [tasks[k] for k in rng.permutation(len(tasks))]
        for start in range(0, len(order) - size + 1, size):
            chosen.setdefault(tuple(sorted(order[start : start + size])), None)
            if len(chosen) == count:
                break
        attempts += 1
    return single_jobs(tasks, seed) + [NetworkJob(s, seed) for s in chosen]


def _value(best: Mapping[str, Any], task: str) -> float:
    return float(best[task]["value"])


def _gain(registry: TaskRegistry, task: str, value: float, alone: float) -> float:
    return relative_gain(value, alone, registry[task].primary_metric.higher_is_better)


def pairwise_matrix(
    results: Mapping[str, Mapping[str, Any]], tasks: Sequence[str], registry: TaskRegistry, seed: int = 0
) -> np.ndarray:
    """A[i, j] = gain of target j trained with source i over j alone; the diagonal is 0 (j with
    itself is j alone). NaN where a job is missing or the alone value is 0."""
    n = len(tasks)
    out = np.full((n, n), np.nan)
    alone = {
        t: _value(results[NetworkJob((t,), seed).key], t)
        for t in tasks
        if NetworkJob((t,), seed).key in results
    }
    for i, source in enumerate(tasks):
        for j, target in enumerate(tasks):
            if target not in alone:
                continue
            if i == j:
                out[i, j] = 0.0
                continue
            key = NetworkJob((source, target), seed).key
            if key in results:
                out[i, j] = _gain(registry, target, _value(results[key], target), alone[target])
    return out


def subsets_matrix(
    results: Mapping[str, Mapping[str, Any]],
    tasks: Sequence[str],
    registry: TaskRegistry,
    seed: int = 0,
    alpha: float = 1.0,
) -> np.ndarray:
    """For each target j, a ridge regression (scikit-learn) of j's gain in a subset on which
    other tasks the subset holds; the coefficient of source i is A[i, j] (the diagonal is 0).
    NaN for a target in no trained subset."""
    n = len(tasks)
    index = {t: k for k, t in enumerate(tasks)}
    out = np.full((n, n), np.nan)
    subsets = [NetworkJob.from_key(k) for k in results if len(NetworkJob.from_key(k).tasks) > 1]
    for j, target in enumerate(tasks):
        solo = NetworkJob((target,), seed).key
        if solo not in results:
            continue
        alone = _value(results[solo], target)
        rows, gains = [], []
        for job in subsets:
            if target not in job.tasks:
                continue
            member = np.zeros(n)
            member[[index[t] for t in job.tasks if t != target and t in index]] = 1.0
            rows.append(member)
            gains.append(_gain(registry, target, _value(results[job.key], target), alone))
        if not rows or not np.all(np.isfinite(gains)):
            continue
        # no intercept: the gain is measured against j alone (no partner = no gain), and with a
        # fixed subset size an intercept would be collinear with the membership sum
        model = Ridge(alpha=alpha, fit_intercept=False).fit(np.stack(rows), np.asarray(gains))
        out[:, j] = model.coef_
        out[j, j] = 0.0
    return out


def every_set_jobs(tasks: Sequence[str], seeds: Sequence[int]) -> list[NetworkJob]:
    """Every non-empty subset of ``tasks`` (2^n - 1 networks) for each seed, singles first (the
    exhaustive truth table of ``benchmarks/truth_table.py``)."""
    sets = [s for k in range(1, len(tasks) + 1) for s in itertools.combinations(tasks, k)]
    return [NetworkJob(s, seed) for seed in seeds for s in sets]


def groups_table(
    results: Mapping[str, Mapping[str, Any]],
    sets: Sequence[Sequence[str]],
    seeds: Sequence[int],
    registry: TaskRegistry,
    key: str = "value",
) -> pd.DataFrame:
    """Trained task sets as a ``taskgroup search --groups-table``: one row per set (``tasks``
    joined by ``+``), each member's gain over its single-task network of the same seed (the
    primary metric's ``key``: ``value`` on validation, ``test_value`` on test), averaged over
    ``seeds``; empty where a member's gain is undefined (a missing result or an alone value of
    0); ``cost`` 1 per network."""
    rows = []
    for members in sets:
        row: dict[str, Any] = {"tasks": "+".join(sorted(members))}
        for task in sorted(members):
            gains = []
            for seed in seeds:
                alone = results.get(NetworkJob((task,), seed).key, {}).get(task, {}).get(key)
                value = results.get(NetworkJob(tuple(members), seed).key, {}).get(task, {}).get(key)
                if alone is not None and value is not None:
                    gains.append(_gain(registry, task, float(value), float(alone)))
            ok = len(gains) == len(seeds) and all(math.isfinite(g) for g in gains)
            row[task] = statistics.mean(gains) if ok else None
        row["cost"] = 1.0
        rows.append(row)
    return pd.DataFrame(rows)
