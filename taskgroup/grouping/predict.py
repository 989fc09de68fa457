"""Predicted scores of task groups from pairwise results (higher-order approximation).

Standley et al. (2020, HOA) and TAG (Fifty et al. 2021) predict a task's score in a group it was
never trained in as the mean of its scores over the pairs inside that group: for a group G and a
member t, ``score(t | G) = mean_{u in G, u != t} score(t | {t, u})``. Applied to measured pair
losses (:func:`higher_order_candidates`) this is Standley et al.'s HOA; applied to an affinity
matrix (:func:`predicted_gains`, :class:`GainPredictor`), the predicted relative gain of t in G
is the mean incoming affinity ``mean_u A[u, t]`` from its partners (0 alone).

``combine="sum"`` (:class:`GainPredictor`) predicts instead the *sum* of the incoming
affinities, ``sum_u A[u, t]``: the first-order effect on t of its partners' updates when each
partner adds its own training steps to the network (as in this engine, where a network trains
``steps_per_task`` steps per member, and in TAG's lookahead, where a group's update is the sum
of its members' updates). A partner then adds its affinity rather than diluting the others': a
weakly attached member costs the group nothing, a member that hurts its partners costs what it
hurts. The mean served gain of a partition is then ``2 / n`` times the sum of the symmetrised
affinity inside its groups, the objective of correlation clustering (Bansal et al. 2004): a
group is worth splitting exactly when its parts hurt each other, so the number of networks
follows from the signs of the affinity rather than from a budget.

Data scale (:class:`GainPredictor`): the M2DINO paper finds that grouping helps data-rich tasks
and hurts small ones. Two configurable terms let per-task training-set sizes ``n_t`` enter the
prediction (both off at 0), after a third that concerns the estimate itself:

- ``partners`` = m0 (``combine="mean"`` only): the mean over m partners is an average of m
  noisy pair estimates, so it is shrunk towards 0 (the gain alone) by ``m / (m + m0)`` (the
  posterior mean of a normal mean with m0 = noise variance / signal variance). Without it, the
  maximum of the predicted gain is a set of small groups that fit the noise of a few pairs;
  with it, a larger group of equally good partners is predicted better than its parts;

- ``shrink`` = n0: the estimate for t is multiplied by ``n_t / (n_t + n0)``, pulling the
  predicted change of a task with few examples towards 0 (its affinity is measured on few
  distinct images, so it is the least reliable);
- ``penalty`` = beta: a predicted *loss* of t is multiplied by
  ``1 + beta * max(0, log2(median_n / n_t))``: negative transfer into a task with less data than
  the median task counts more (a small task is swamped by its partners' gradients).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from taskgroup.grouping.select import Candidate

if TYPE_CHECKING:
    from taskgroup.config import SearchConfig


def higher_order_candidates(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The pool with every network of three or more tasks re-scored by HOA from the pool's
    pairs (singles and pairs keep their measured scores; costs unchanged)."""
    pairs = {frozenset(c.tasks): c for c in candidates if len(c.tasks) == 2}
    out = []
    for cand in candidates:
        if len(cand.tasks) < 3:
            out.append(cand)
            continue
        scores = {}
        for t in cand.tasks:
            partners = [pairs[frozenset((t, u))].scores[t] for u in cand.tasks if u != t]
            scores[t] = float(np.mean(partners))
        out.append(Candidate(cand.tasks, scores, cand.cost, cand.name))
    return out


def predicted_gains(affinity: np.ndarray, tasks: Sequence[str], group: Sequence[str]) -> dict[str, float]:
    """Each member's predicted relative gain in ``group``: the mean affinity from its partners
    (source rows, target columns; NaN entries skipped; 0 for a task alone)."""
    return GainPredictor(affinity, tasks).gains(group)


@dataclasses.dataclass
class GainPredictor:
    """Predicted gain of every member of a group from an affinity matrix: the mean
    (``combine="mean"``) or the sum (``"sum"``) of its partners' affinity to it, optionally
    data-scale-aware (see the module doc). ``sizes``: training examples per task (needed when
    ``shrink`` or ``penalty`` is not 0)."""

    affinity: np.ndarray
    tasks: Sequence[str]
    sizes: Mapping[str, int] | None = None
    partners: float = 0.0
    shrink: float = 0.0
    penalty: float = 0.0
    combine: Literal["mean", "sum"] = "mean"

    def __post_init__(self) -> None:
        self.affinity = np.asarray(self.affinity, dtype=float)
        self.tasks = list(self.tasks)
        n = len(self.tasks)
        if self.affinity.shape != (n, n):
            raise ValueError(f"affinity matrix of shape {self.affinity.shape} for {n} tasks")
        self.index = {t: k for k, t in enumerate(self.tasks)}
        if min(self.partners, self.shrink, self.penalty) < 0:
            raise ValueError(
                f"partners, shrink and penalty must be >= 0, got {self.partners}, {self.shrink}, {self.penalty}"
            )
        if self.combine not in ("mean", "sum"):
            raise ValueError(f"combine must be 'mean' or 'sum', got {self.combine!r}")
        if (self.shrink or self.penalty) and not self.sizes:
            raise ValueError("a data-scale-aware prediction (shrink or penalty) needs per-task sizes")
        if self.sizes:
            missing = [t for t in self.tasks if t not in self.sizes]
            if missing:
                raise ValueError(f"no training-set size for task(s) {', '.join(missing)}")
            self.median = float(np.median([self.sizes[t] for t in self.tasks]))

    @classmethod
    def from_config(
        cls,
        affinity: np.ndarray,
        tasks: Sequence[str],
        sizes: Mapping[str, int] | None,
        cfg: SearchConfig,
    ) -> GainPredictor:
        """The predictor a search with ``cfg`` uses (``search.partners``, ``shrink``,
        ``penalty``, ``gain``): one place for ``taskgroup search`` and whatever re-scores its
        groupings later."""
        return cls(affinity, tasks, sizes, cfg.partners, cfg.shrink, cfg.penalty, cfg.gain)

    @property
    def scale_aware(self) -> bool:
        return bool(self.shrink or self.penalty)

    def _adjust(self, values: np.ndarray, members: Sequence[str], partners: int) -> np.ndarray:
        """The partner shrinkage (of a mean) and the data-scale terms (module doc) on raw gains."""
        if self.combine == "mean" and self.partners and partners > 0:
            values = values * (partners / (partners + self.partners))
        if not self.scale_aware:
            return values
        n = np.array([float(self.sizes[t]) for t in members])  # type: ignore[index]
        values = values * n / (n + self.shrink)
        if self.penalty:
            factor = 1.0 + self.penalty * np.maximum(0.0, np.log2(self.median / n))
            values = np.where(values < 0, values * factor, values)
        return values

    def gains(self, group: Sequence[str]) -> dict[str, float]:
        """Each member's mean (or summed) incoming affinity from its partners (NaN entries
        skipped; 0 alone), then adjusted (:meth:`_adjust`)."""
        unknown = [t for t in group if t not in self.index]
        if unknown:
            raise ValueError(f"task(s) {', '.join(unknown)} not in the affinity matrix")
        idx = [self.index[t] for t in group]
        block = self.affinity[np.ix_(idx, idx)].copy()
        np.fill_diagonal(block, np.nan)
        finite = np.isfinite(block)
        counts = finite.sum(axis=0)
        summed = np.where(finite, block, 0.0).sum(axis=0)
        raw = summed if self.combine == "sum" else np.where(counts > 0, summed / np.maximum(counts, 1), 0.0)
        adjusted = self._adjust(raw, group, len(group) - 1)
        return {t: float(v) for t, v in zip(group, adjusted, strict=True)}

    def gain(self, task: str, group: Sequence[str]) -> float:
        return self.gains(group)[task]

    def candidate(self, group: Sequence[str], cost: float = 1.0, name: str = "") -> Candidate:
        return Candidate(tuple(group), self.gains(group), cost, name)

    def served(self, groups: Sequence[Sequence[str]]) -> dict[str, float]:
        """Each task's predicted gain in the best of the groups that contain it (groups may
        overlap: a task is served by its best network, as in network selection)."""
        out: dict[str, float] = {}
        for group in groups:
            for t, g in self.gains(group).items():
                out[t] = max(out.get(t, -np.inf), g)
        return out

    def total(self, groups: Sequence[Sequence[str]]) -> float:
        """Mean served gain over the tasks (the objective of the partition search)."""
        served = self.served(groups)
        return float(np.mean(list(served.values()))) if served else 0.0
