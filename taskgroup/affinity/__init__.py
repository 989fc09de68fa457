"""The search layer's first half: inter-task affinity by several estimators (``taskgroup affinity``)."""

from __future__ import annotations

from taskgroup.affinity.corrections import CORRECTIONS, correct
from taskgroup.affinity.probes import AffinityProbe, probe_parameters
from taskgroup.affinity.report import planted_separation, read_matrix
from taskgroup.affinity.run import AffinityResult, run_affinity
from taskgroup.affinity.trained import pairwise_jobs, pairwise_matrix, subset_jobs, subsets_matrix

__all__ = [
    "CORRECTIONS",
    "AffinityProbe",
    "AffinityResult",
    "correct",
    "pairwise_jobs",
    "pairwise_matrix",
    "planted_separation",
    "probe_parameters",
    "read_matrix",
    "run_affinity",
    "subset_jobs",
    "subsets_matrix",
]
