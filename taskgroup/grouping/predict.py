"""Predicted scores of task groups from pairwise results (higher-order approximation).

Standley et al. (2020, HOA) and TAG (Fifty et al. 2021) predict a task's score in a group it was
never trained in as the mean of its scores over the pairs inside that group: for a group G and a
member t, ``score(t | G) = mean_{u in G, u != t} score(t | {t, u})``. Applied to measured pair
losses (:func:`higher_order_candidates`) this is Standley et al.'s HOA; applied to an affinity
matrix (:func:`predicted_gains`), the predicted relative gain of t in G is the mean incoming
affinity ``mean_u A[u, t]`` from its partners (0 alone).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from taskgroup.grouping.select import Candidate


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
    index = {t: k for k, t in enumerate(tasks)}
    out = {}
    for t in group:
        incoming = [affinity[index[u], index[t]] for u in group if u != t]
        incoming = [v for v in incoming if np.isfinite(v)]
        out[t] = float(np.mean(incoming)) if incoming else 0.0
    return out
