"""``taskgroup compare``: groupings trained against TS, CG and AU, and the negative-transfer report."""

from __future__ import annotations

from taskgroup.compare.report import gains_frame, per_group, per_task, t_interval, write_report
from taskgroup.compare.run import (
    CompareResult,
    compare_jobs,
    resolve_groupings,
    run_compare,
    served_scores,
    study_name,
)

__all__ = [
    "CompareResult",
    "compare_jobs",
    "gains_frame",
    "per_group",
    "per_task",
    "resolve_groupings",
    "run_compare",
    "served_scores",
    "study_name",
    "t_interval",
    "write_report",
]
