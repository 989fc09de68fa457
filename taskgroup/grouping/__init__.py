"""Grouping: turn measured affinity or trained-group results into groupings (issue 6).

A torch-free library on matrices and tables (numpy, pandas, scikit-learn, networkx, SciPy,
Optuna); the ``taskgroup search`` stage that reads run folders, trains, plots and prints is
:mod:`taskgroup.stages.search`.
``predict``: predicted gains from affinity (HOA; data-scale-aware). ``select``: exact network selection (Standley et al. 2020) by a mixed-integer
program and by branch and bound, candidates from tables. ``partition``: graph partitioning of the symmetrised affinity
(networkx Louvain, greedy modularity, Kernighan-Lin; scikit-learn spectral, agglomerative).
``candidates``: the pool for 27 tasks. ``optimize``: Optuna over partitions (TPE, NSGA-II).
``proposals``: proposals scored by a predictor, the search of one estimator, the recommended
proposal and the ranking. ``trained_search``: the Optuna study whose trials train their
partitions (through a gains object the stage gives).
"""

from __future__ import annotations

from taskgroup.grouping.partition import GraphPartitioner, Partition, propose_partitions, symmetrise
from taskgroup.grouping.predict import GainPredictor, higher_order_candidates, predicted_gains
from taskgroup.grouping.select import (
    Candidate,
    NetworkSelector,
    Selection,
    random_pool,
    read_network_table,
    score_selection,
    select_branch_and_bound,
    select_brute_force,
    select_milp,
)

__all__ = [
    "Candidate",
    "GainPredictor",
    "GraphPartitioner",
    "NetworkSelector",
    "Partition",
    "Selection",
    "higher_order_candidates",
    "predicted_gains",
    "propose_partitions",
    "random_pool",
    "read_network_table",
    "score_selection",
    "select_branch_and_bound",
    "select_brute_force",
    "select_milp",
    "symmetrise",
]
