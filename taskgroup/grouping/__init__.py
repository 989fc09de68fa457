"""Grouping: turn measured affinity or trained-group results into groupings (issue 6).

Imports no torch. ``select``: exact network selection (Standley et al. 2020) by a mixed-integer
program and by branch and bound.
"""

from __future__ import annotations

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
    "NetworkSelector",
    "Selection",
    "random_pool",
    "read_network_table",
    "score_selection",
    "select_branch_and_bound",
    "select_brute_force",
    "select_milp",
]
