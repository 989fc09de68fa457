"""Candidate networks for 27 tasks, where the 2^27 groups cannot be enumerated (issue 6).

The pool network selection chooses from: every task alone (the TS networks), every group of the
proposed partitions, the union of every two groups of a partition (merges), the best Kernighan-Lin
cut of every group of four or more (splits), the ``pairs`` best pairs and the ``triples`` best
triples by predicted gain (a triple = a top pair and its best third task), and any extra groups
(the clinical groups, all tasks). Each is scored by the predictor; duplicates are dropped.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from taskgroup.grouping.partition import Partition, bisect, symmetrise
from taskgroup.grouping.predict import GainPredictor
from taskgroup.grouping.select import Candidate


def _group_total(predictor: GainPredictor, group: Sequence[str]) -> float:
    return float(sum(predictor.gains(group).values()))


def best_pairs(predictor: GainPredictor, count: int) -> list[tuple[str, ...]]:
    """The ``count`` pairs with the largest summed predicted gain of their two members."""
    scored = [(_group_total(predictor, p), p) for p in itertools.combinations(predictor.tasks, 2)]
    scored.sort(key=lambda x: -x[0])
    return [p for _, p in scored[:count]]


def best_triples(
    predictor: GainPredictor, pairs: Sequence[tuple[str, ...]], count: int
) -> list[tuple[str, ...]]:
    """Each pair with the third task that adds the most predicted gain; the ``count`` best."""
    order = {t: k for k, t in enumerate(predictor.tasks)}
    found: dict[frozenset, float] = {}
    for pair in pairs:
        rest = [t for t in predictor.tasks if t not in pair]
        if not rest:
            continue
        third = max(rest, key=lambda t: _group_total(predictor, (*pair, t)))
        triple = frozenset((*pair, third))
        found[triple] = _group_total(predictor, tuple(triple))
    ranked = sorted(found.items(), key=lambda x: -x[1])[:count]
    return [tuple(sorted(g, key=order.__getitem__)) for g, _ in ranked]


def generate_candidates(
    predictor: GainPredictor,
    partitions: Sequence[Partition],
    pairs: int = 50,
    triples: int = 50,
    extra: Iterable[Sequence[str]] = (),
    seed: int = 0,
) -> list[Candidate]:
    """The candidate pool (see the module doc), each network of cost 1, singles first."""
    tasks = list(predictor.tasks)
    order = {t: k for k, t in enumerate(tasks)}
    s = symmetrise(predictor.affinity)
    groups: dict[frozenset, str] = {}

    def add(group: Iterable[str], origin: str) -> None:
        key = frozenset(group)
        if key and key not in groups:
            groups[key] = origin

    for t in tasks:
        add((t,), "single")
    for p in partitions:
        for g in p.groups:
            add(g, p.method)
        for a, b in itertools.combinations(p.groups, 2):
            add((*a, *b), f"{p.method}:merge")
        for g in p.groups:
            if len(g) >= 4:
                for half in bisect(s, tasks, g, seed):
                    add(half, f"{p.method}:split")
    top = best_pairs(predictor, pairs)
    for pair in top:
        add(pair, "pair")
    for triple in best_triples(predictor, top, triples):
        add(triple, "triple")
    for g in extra:
        add(g, "extra")
    out = []
    for key, origin in groups.items():
        members = tuple(sorted(key, key=order.__getitem__))
        out.append(predictor.candidate(members, 1.0, f"{origin}:{'+'.join(members)}"))
    return out


def pool_summary(pool: Sequence[Candidate]) -> dict[str, int]:
    """How many candidates of each origin (for the run's meta): a name is ``origin:members``
    and task ids hold no ``:``."""
    out: dict[str, int] = {}
    for c in pool:
        origin = c.name.rsplit(":", 1)[0]
        out[origin] = out.get(origin, 0) + 1
    return dict(sorted(out.items(), key=lambda x: -x[1]))
