"""Proposals: groupings scored by a gain predictor, the search over one estimator's affinity, the
recommended proposal per estimator and the ranking table (issue 6). Torch-free: matrices, tables
and Optuna studies only (the ``taskgroup search`` stage, :mod:`taskgroup.stages.search`, reads the
run folders, plots and prints).
"""

from __future__ import annotations

import dataclasses
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score

from taskgroup.config import SearchConfig
from taskgroup.grouping.candidates import generate_candidates, pool_summary
from taskgroup.grouping.optimize import local_search, optuna_search
from taskgroup.grouping.partition import propose_partitions
from taskgroup.grouping.predict import GainPredictor
from taskgroup.grouping.select import select_milp
from taskgroup.groupings import BUILTIN, builtin_grouping
from taskgroup.tasks import TaskRegistry

REFERENCES = BUILTIN  # TS, CG and AU: scored by the same predictor, never proposed


@dataclasses.dataclass
class Proposal:
    name: str
    method: str
    estimator: str
    groups: tuple[tuple[str, ...], ...]
    gains: dict[str, float]  # each task's predicted gain in the network that serves it
    cost: float
    params: str = ""
    # each task's realised gain on the held-out test split, when its networks are trained and the
    # data has one (reported beside ``gains``, never used to rank or choose)
    test_gains: dict[str, float] | None = None

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.gains.values())))

    @property
    def test_mean(self) -> float:
        """Mean finite test gain (NaN when unknown)."""
        finite = [g for g in (self.test_gains or {}).values() if np.isfinite(g)]
        return float(np.mean(finite)) if finite else float("nan")

    @property
    def gain_source(self) -> str:
        """What ``gains`` are: "val" (realised by trained groups), "table" (a groups table's
        scores) or "predicted" (from an affinity estimator)."""
        return {"trained": "val", "table": "table"}.get(self.estimator, "predicted")

    @property
    def networks(self) -> int:
        return len(self.groups)

    @property
    def is_partition(self) -> bool:
        """No task in two networks (a selection may overlap)."""
        return len({t for g in self.groups for t in g}) == sum(map(len, self.groups))

    def served_labels(self, tasks: Sequence[str], predictor: GainPredictor | None = None) -> list[int]:
        """Group index serving each task (its best network when groups overlap)."""
        labels = []
        for t in tasks:
            homes = [k for k, g in enumerate(self.groups) if t in g]
            if len(homes) > 1 and predictor is not None:
                homes.sort(key=lambda k: -predictor.gain(t, self.groups[k]))
            labels.append(homes[0])
        return labels


def safe_label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _proposal(name, method, estimator, groups, predictor, params="") -> Proposal:
    return Proposal(
        name,
        method,
        estimator,
        tuple(tuple(g) for g in groups),
        predictor.served(groups),
        float(len(groups)),
        params,
    )


def clinical_groups(registry: TaskRegistry, tasks: Sequence[str]) -> list[tuple[str, ...]]:
    """The CG paradigm's groups cut to ``tasks`` (groups left empty dropped)."""
    return list(builtin_grouping("cg", registry).restrict(tasks).groups.values())


def baselines(predictor: GainPredictor, registry: TaskRegistry, estimator: str) -> list[Proposal]:
    tasks = list(predictor.tasks)
    cg = clinical_groups(registry, tasks)
    return [
        _proposal("ts", "ts", estimator, [(t,) for t in tasks], predictor),
        _proposal("cg", "cg", estimator, cg, predictor),
        _proposal("au", "au", estimator, [tuple(tasks)], predictor),
    ]


def search_estimator(
    estimator: str,
    predictor: GainPredictor,
    cfg: SearchConfig,
    registry: TaskRegistry,
    storage: str,
) -> tuple[list[Proposal], dict[str, Any], list]:
    tasks = list(predictor.tasks)
    proposals: list[Proposal] = []
    info: dict[str, Any] = {}
    prefix = safe_label(estimator)
    partitions = propose_partitions(predictor.affinity, tasks, cfg.n_groups, cfg.resolutions, cfg.seed)
    if "partition" in cfg.methods:
        for p in partitions:
            params = ",".join(f"{k}={v:g}" for k, v in p.params)
            name = f"{prefix}-{p.method}" + (f"-{params.replace('=', '')}" if params else "")
            proposals.append(_proposal(safe_label(name), p.method, estimator, p.groups, predictor, params))
    if "select" in cfg.methods:
        extra = [*clinical_groups(registry, tasks), tuple(tasks)]  # the CG networks and AU
        pool = generate_candidates(predictor, partitions, cfg.pairs, cfg.triples, extra, cfg.seed)
        info["pool"] = {"candidates": len(pool), "by_origin": pool_summary(pool)}
        for budget in cfg.budgets:
            start = time.perf_counter()
            chosen = select_milp(pool, budget, tasks, higher_is_better=True)
            info.setdefault("select_seconds", {})[f"{budget:g}"] = time.perf_counter() - start
            if chosen is None:
                continue
            groups = chosen.networks(pool)
            proposals.append(
                _proposal(
                    f"{prefix}-select-b{budget:g}",
                    "select",
                    estimator,
                    groups,
                    predictor,
                    f"budget={budget:g}",
                )
            )
    pareto: list = []
    if "optuna" in cfg.methods:
        start_from = [p.groups for p in partitions]
        result = optuna_search(
            predictor, cfg.max_groups, cfg.trials, storage, f"{prefix}-gain", False, cfg.seed, start_from
        )
        # single-task moves from TPE's best and from every graph partition: the best local optimum
        polished, _ = max(
            (local_search(predictor, groups, cfg.max_groups) for groups in [result.best, *start_from]),
            key=lambda found: found[1],
        )
        k = f"max_groups={cfg.max_groups}"
        proposals.append(_proposal(f"{prefix}-optuna", "optuna", estimator, result.best, predictor, k))
        proposals.append(
            _proposal(f"{prefix}-optuna-local", "optuna+local", estimator, polished, predictor, k)
        )
        front = optuna_search(
            predictor,
            cfg.max_groups,
            cfg.pareto_trials,
            storage,
            f"{prefix}-pareto",
            True,
            cfg.seed,
            [*start_from, result.best, polished],  # NSGA-II starts from what TPE and the moves found too
        )
        pareto = front.pareto
        for _value, networks, groups in pareto:
            proposals.append(
                _proposal(
                    f"{prefix}-pareto-n{networks}",
                    "nsga2",
                    estimator,
                    groups,
                    predictor,
                    f"networks={networks}",
                )
            )
        info["optuna"] = {
            "trials": result.trials,
            "distinct_partitions": result.distinct,
            "pareto_trials": front.trials,
            "pareto_front": [(v, n) for v, n, _ in pareto],
        }
    return proposals, info, pareto


def gain_front(proposals: Sequence[Proposal]) -> list[tuple[int, float]]:
    """The predicted gain / networks front: for each number of networks, the highest predicted
    mean gain, kept only where it is above every front point with fewer networks."""
    top: dict[int, float] = {}
    for p in proposals:
        top[p.networks] = max(top.get(p.networks, -np.inf), p.mean)
    front: list[tuple[int, float]] = []
    for n in sorted(top):
        if not front or top[n] > front[-1][1]:
            front.append((n, top[n]))
    return front


def front_knee(front: Sequence[tuple[int, float]]) -> int | None:
    """The knee of a gain / networks front (``kneed``'s Kneedle, Satopaa et al. 2011: the
    point farthest above the chord from the first point to the last, on the normalised curve),
    as a number of networks; None when the front has fewer than three points or no knee."""
    if len(front) < 3:
        return None
    from kneed import KneeLocator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no knee found" is a None, said by the caller
        knee = KneeLocator(
            [n for n, _ in front], [g for _, g in front], curve="concave", direction="increasing"
        ).knee
    return None if knee is None else round(float(knee))


def best_proposals(
    proposals: Sequence[Proposal],
    tolerance: float,
    rule: Literal["knee", "tolerance", "partition"] = "knee",
) -> dict[str, Proposal]:
    """Per estimator, the proposal the search recommends (TS, CG and AU are references, never
    chosen). ``rule="knee"``: on the predicted gain / networks front of the proposals, with AU
    (one network) as its first point, the knee (:func:`front_knee`); the highest-gain proposal
    with that many networks. Without a knee (a front of fewer than three points, or a straight
    or convex one), or ``rule="tolerance"``: the fewest networks within ``tolerance`` of the
    highest predicted mean gain (highest gain among those). ``rule="partition"``: the
    highest-gain partition (fewest networks on a tie; the tolerance rule when no proposal is a
    partition)."""
    best: dict[str, Proposal] = {}
    for estimator in dict.fromkeys(p.estimator for p in proposals):
        mine = [p for p in proposals if p.estimator == estimator and p.method not in REFERENCES]
        if not mine:
            continue
        partitions = [p for p in mine if p.is_partition] if rule == "partition" else []
        if partitions:
            best[estimator] = max(partitions, key=lambda p: (p.mean, -p.networks))
            continue
        if rule == "knee":
            anchor = [p for p in proposals if p.estimator == estimator and p.method == "au"]
            front = gain_front(anchor + mine)
            knee = front_knee(front)
            if knee is not None and knee in {p.networks for p in mine}:
                best[estimator] = max((p for p in mine if p.networks == knee), key=lambda p: p.mean)
                continue
        top = max(p.mean for p in mine)
        near = [p for p in mine if p.mean >= top - tolerance * abs(top)]
        best[estimator] = min(near, key=lambda p: (p.networks, -p.mean))
    return best


def ranking_frame(
    proposals: Sequence[Proposal],
    tasks: Sequence[str],
    truth: Sequence[int] | None,
    predictors: Mapping[str, GainPredictor],
) -> pd.DataFrame:
    tested = any(p.test_gains for p in proposals)  # test_gain:<task> columns when any is known
    rows = []
    for p in proposals:
        row: dict[str, Any] = {
            "estimator": p.estimator,
            "method": p.method,
            "name": p.name,
            "params": p.params,
            "networks": p.networks,
            "cost": p.cost,
            "mean_gain": p.mean,
            "mean_gain_on": p.gain_source,
            "test_mean_gain": p.test_mean,
        }
        if truth is not None:
            # a measured proposal (groups table) has no predictor: each task's first network
            row["ari"] = adjusted_rand_score(truth, p.served_labels(tasks, predictors.get(p.estimator)))
        row["groups"] = " | ".join("+".join(g) for g in p.groups)
        row.update({f"gain:{t}": p.gains[t] for t in tasks})
        if tested:
            row.update({f"test_gain:{t}": (p.test_gains or {}).get(t, np.nan) for t in tasks})
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values(["estimator", "mean_gain"], ascending=[True, False], kind="stable").reset_index(
        drop=True
    )
