"""Network selection (Standley et al., ICML 2020, section 3.3; TAG, Fifty et al. 2021).

Given candidate networks, each a set of tasks with a score per member task (a measured
validation loss or metric, or one predicted from affinity) and a cost, and a budget on the total
cost: choose networks so that every task is served by one chosen network that contains it, each
task by its best chosen network, optimising the sum over tasks of the served scores.

Three exact solvers that must agree:

- :func:`select_milp`: a mixed-integer program solved by HiGHS through ``scipy.optimize.milp``:
  binary ``x_c`` (network c chosen) and assignment ``y_ct`` in [0, 1] (task t served by c),
  ``sum_c y_ct = 1``, ``y_ct <= x_c``, ``sum_c cost_c x_c <= budget``; minimise
  ``sum s_ct y_ct`` (scores negated when higher is better). Given x, the best assignment is
  integral, so only x needs integrality. Sparse constraints: thousands of candidates on 27 tasks
  solve in seconds.
- :func:`select_branch_and_bound`: depth-first include/exclude over the candidates with the bound
  "each task at the best of what is chosen or still available" (hand-written: the search space is
  small pools, where it is a check on the MILP; no well-kept library offers this selection).
- :func:`select_brute_force`: every affordable subset (tests, tiny pools).

Candidates from tables: :func:`read_network_table` (Standley et al.'s per-network loss files) and
:func:`read_groups_table` (trained groups with measured per-task scores, ``taskgroup search
--groups-table``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from taskgroup.errors import DataError

if TYPE_CHECKING:
    from taskgroup.tasks import TaskRegistry

EPS = 1e-9


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A network that may be trained: its tasks, each member's score, its cost."""

    tasks: tuple[str, ...]
    scores: Mapping[str, float]
    cost: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        missing = [t for t in self.tasks if t not in self.scores]
        if missing:
            raise ValueError(f"candidate {self.label}: no score for member task(s) {', '.join(missing)}")
        if self.cost <= 0:
            raise ValueError(f"candidate {self.label}: cost must be positive, got {self.cost}")

    @property
    def label(self) -> str:
        return self.name or "+".join(self.tasks)


@dataclasses.dataclass(frozen=True)
class Selection:
    """Chosen candidates (indices into the pool), the candidate serving each task, the total of
    the served scores and the cost spent."""

    chosen: tuple[int, ...]
    served: Mapping[str, int]
    total: float
    cost: float

    def networks(self, candidates: Sequence[Candidate]) -> list[tuple[str, ...]]:
        return [candidates[c].tasks for c in self.chosen]


def _task_list(candidates: Sequence[Candidate], tasks: Sequence[str] | None) -> list[str]:
    if tasks is not None:
        return list(tasks)
    seen: dict[str, None] = {}
    for c in candidates:
        seen.update(dict.fromkeys(c.tasks))
    return list(seen)


def _value_matrix(
    candidates: Sequence[Candidate], tasks: Sequence[str], higher_is_better: bool
) -> np.ndarray:
    """(C, T) values to minimise: the score (negated when higher is better), +inf for non-members."""
    sign = -1.0 if higher_is_better else 1.0
    index = {t: k for k, t in enumerate(tasks)}
    values = np.full((len(candidates), len(tasks)), np.inf)
    for c, cand in enumerate(candidates):
        for t in cand.tasks:
            if t in index:
                values[c, index[t]] = sign * float(cand.scores[t])
    return values


def _selection(
    chosen: Sequence[int],
    candidates: Sequence[Candidate],
    tasks: Sequence[str],
    values: np.ndarray,
    sign: float,
) -> Selection:
    chosen = tuple(sorted(chosen))
    served, total = {}, 0.0
    for k, task in enumerate(tasks):
        best = min(chosen, key=lambda c: (values[c, k], c))
        served[task] = best
        total += sign * values[best, k]
    return Selection(chosen, served, total, float(sum(candidates[c].cost for c in chosen)))


def _problem(
    candidates: Sequence[Candidate], tasks: Sequence[str] | None, higher_is_better: bool
) -> tuple[list[str], np.ndarray, float]:
    """What every solver starts from: the task list, the (C, T) values to minimise and the sign
    that turns a minimised total back into scores; a task no candidate contains is an error."""
    tasks = _task_list(candidates, tasks)
    values = _value_matrix(candidates, tasks, higher_is_better)
    uncovered = [t for k, t in enumerate(tasks) if not np.isfinite(values[:, k]).any()]
    if uncovered:
        raise ValueError(f"no candidate network contains task(s) {', '.join(uncovered)}")
    return tasks, values, -1.0 if higher_is_better else 1.0


def select_milp(
    candidates: Sequence[Candidate],
    budget: float,
    tasks: Sequence[str] | None = None,
    higher_is_better: bool = False,
    time_limit: float | None = None,
) -> Selection | None:
    """The optimal selection by a mixed-integer program (HiGHS); None if no selection within
    ``budget`` serves every task."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    tasks, values, sign = _problem(candidates, tasks, higher_is_better)
    n_c, n_t = values.shape
    pairs = np.argwhere(np.isfinite(values))  # (P, 2): candidate, task of each y variable
    n_y = len(pairs)
    n = n_c + n_y
    # scores are shifted per task by their minimum (each task is served exactly once, so the
    # optimum is unchanged) to keep the objective well scaled
    shift = np.array([values[np.isfinite(values[:, k]), k].min() for k in range(n_t)])
    objective = np.concatenate([np.zeros(n_c), values[pairs[:, 0], pairs[:, 1]] - shift[pairs[:, 1]]])
    y = np.arange(n_y)
    # each task served once: rows 0..T-1
    assign = coo_matrix((np.ones(n_y), (pairs[:, 1], n_c + y)), shape=(n_t, n))
    # y_ct - x_c <= 0
    link = coo_matrix(
        (
            np.concatenate([np.ones(n_y), -np.ones(n_y)]),
            (np.concatenate([y, y]), np.concatenate([n_c + y, pairs[:, 0]])),
        ),
        shape=(n_y, n),
    )
    costs = np.array([c.cost for c in candidates], dtype=float)
    spend = coo_matrix((costs, (np.zeros(n_c, dtype=int), np.arange(n_c))), shape=(1, n))
    constraints = [
        LinearConstraint(assign, 1.0, 1.0),
        LinearConstraint(link, -np.inf, 0.0),
        LinearConstraint(spend, -np.inf, budget + EPS),
    ]
    integrality = np.concatenate([np.ones(n_c), np.zeros(n_y)])
    options = {"time_limit": time_limit} if time_limit else {}
    result = milp(
        objective, constraints=constraints, integrality=integrality, bounds=Bounds(0, 1), options=options
    )
    if result.x is None:
        return None
    chosen = [c for c in range(n_c) if result.x[c] > 0.5]
    return _selection(chosen, candidates, tasks, values, sign)


def select_branch_and_bound(
    candidates: Sequence[Candidate],
    budget: float,
    tasks: Sequence[str] | None = None,
    higher_is_better: bool = False,
) -> Selection | None:
    """The optimal selection by depth-first branch and bound; for small pools (tens)."""
    tasks, values, sign = _problem(candidates, tasks, higher_is_better)
    costs = np.array([c.cost for c in candidates], dtype=float)
    # visit cheap, strong candidates first so that a good incumbent prunes early
    order = sorted(
        range(len(candidates)),
        key=lambda c: (costs[c], np.nanmean(np.where(np.isfinite(values[c]), values[c], np.nan))),
    )
    vals, cst = values[order], costs[order]
    n = len(order)
    suffix = np.full((n + 1, len(tasks)), np.inf)  # best value of each task among candidates k..
    for k in range(n - 1, -1, -1):
        suffix[k] = np.minimum(suffix[k + 1], vals[k])
    best_total, best_set = np.inf, None

    def visit(k: int, spent: float, current: np.ndarray, chosen: list[int]) -> None:
        nonlocal best_total, best_set
        bound = np.minimum(current, suffix[k]).sum()
        if not np.isfinite(bound) or bound >= best_total - EPS:
            return
        if np.isfinite(current).all():
            total = current.sum()
            if total < best_total - EPS:
                best_total, best_set = total, list(chosen)
        if k == n:
            return
        if spent + cst[k] <= budget + EPS:
            chosen.append(k)
            visit(k + 1, spent + cst[k], np.minimum(current, vals[k]), chosen)
            chosen.pop()
        visit(k + 1, spent, current, chosen)

    visit(0, 0.0, np.full(len(tasks), np.inf), [])
    if best_set is None:
        return None
    return _selection([order[k] for k in best_set], candidates, tasks, values, sign)


def select_brute_force(
    candidates: Sequence[Candidate],
    budget: float,
    tasks: Sequence[str] | None = None,
    higher_is_better: bool = False,
) -> Selection | None:
    """Every affordable subset of the pool (2^C: tests and tiny pools only)."""
    tasks, values, sign = _problem(candidates, tasks, higher_is_better)
    best_total, best = np.inf, None
    for size in range(1, len(candidates) + 1):
        for subset in itertools.combinations(range(len(candidates)), size):
            if sum(candidates[c].cost for c in subset) > budget + EPS:
                continue
            total = values[list(subset)].min(axis=0).sum()
            if np.isfinite(total) and total < best_total - EPS:
                best_total, best = total, subset
    if best is None:
        return None
    return _selection(best, candidates, tasks, values, sign)


SOLVERS = {
    "milp": select_milp,
    "branch_and_bound": select_branch_and_bound,
    "brute_force": select_brute_force,
}


class NetworkSelector:
    """scikit-learn-style: ``NetworkSelector(budget).fit(candidates).selection_``."""

    def __init__(self, budget: float, solver: str = "milp", higher_is_better: bool = False) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
        self.budget = budget
        self.solver = solver
        self.higher_is_better = higher_is_better

    def fit(self, candidates: Sequence[Candidate], tasks: Sequence[str] | None = None) -> NetworkSelector:
        self.candidates_ = list(candidates)
        self.selection_ = SOLVERS[self.solver](
            self.candidates_, self.budget, tasks=tasks, higher_is_better=self.higher_is_better
        )
        if self.selection_ is None:
            raise ValueError(f"no selection of the candidates within budget {self.budget} serves every task")
        self.groups_ = self.selection_.networks(self.candidates_)
        return self


def score_selection(selection: Selection, candidates: Sequence[Candidate]) -> float:
    """The total of each task's score in ``candidates`` (e.g. the test table) for the network
    that served it in ``selection`` (chosen on another table, e.g. validation)."""
    return float(sum(candidates[c].scores[t] for t, c in selection.served.items()))


def random_pool(rng: np.random.Generator, n_tasks: int, count: int, max_size: int = 7) -> list[Candidate]:
    """A random instance: every task alone (cost 1, loss in [0.5, 1]) and ``count`` random
    groups of 2..``max_size`` tasks (cost 1, member losses in [0.3, 1]); for tests and
    benchmarks of the solvers."""
    tasks = [f"task{k}" for k in range(n_tasks)]
    pool = [Candidate((t,), {t: float(rng.uniform(0.5, 1))}) for t in tasks]
    for _ in range(count):
        size = int(rng.integers(2, max_size + 1))
        members = tuple(sorted(rng.choice(tasks, size, replace=False)))
        pool.append(Candidate(members, {t: float(rng.uniform(0.3, 1)) for t in members}))
    return pool


def read_network_table(path: str | Path, tasks: Sequence[str] | None = None) -> list[Candidate]:
    """A per-network loss table in the layout of Standley et al.'s ``network_selection`` files:
    tab-separated, one column per task, an empty field for a task outside the network. Row 1
    holds the half-size single-task networks (cost 0.5 each, one candidate per task); every other
    row is one network of cost 1."""
    path = Path(path)
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines() if line.strip()]
    width = max(len(r) for r in rows)
    tasks = list(tasks or [f"t{k}" for k in range(width)])
    if len(tasks) != width:
        raise ValueError(f"{path}: {width} columns but {len(tasks)} task names")
    out: list[Candidate] = []
    for number, row in enumerate(rows, start=1):
        fields = row + [""] * (width - len(row))
        try:
            scores = {tasks[k]: float(v) for k, v in enumerate(fields) if v.strip()}
        except ValueError as exc:
            raise ValueError(f"{path}, row {number}: {exc}") from None
        if number == 1:
            out += [Candidate((t,), {t: s}, 0.5, f"half:{t}") for t, s in scores.items()]
        else:
            out.append(Candidate(tuple(scores), scores, 1.0))
    return out


def _number(value: Any, path: Path, line: int, what: str) -> float | None:
    """A table cell as a finite number, None when empty; anything else is an error naming the
    file, the line and the column."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{path}, line {line}: {what} is {value!r}, not a number") from None
    if not np.isfinite(number):
        raise DataError(f"{path}, line {line}: {what} is {value!r}, not a finite number")
    return number


def read_groups_table(path: Path, registry: TaskRegistry) -> list[Candidate]:
    """Trained groups with measured per-task scores: CSV, one row per network, column ``tasks``
    (ids joined by ``+``), optional ``cost``, and one column per task holding that member's
    score (higher is better, e.g. the relative gain over its single-task network)."""
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: cannot read the groups table: {exc}") from None
    if "tasks" not in frame.columns:
        raise DataError(f"{path}: no 'tasks' column (ids joined by '+')")
    out = []
    for row_number, row in enumerate(frame.to_dict("records"), start=2):
        members = tuple(str(row["tasks"]).split("+"))
        scores = {}
        for t in members:
            if t not in registry:
                raise DataError(f"{path}, line {row_number}: unknown task {t!r}")
            value = _number(row.get(t), path, row_number, f"the score of member task {t!r}")
            if value is None:
                raise DataError(f"{path}, line {row_number}: no score for member task {t!r}")
            scores[t] = value
        cost = _number(row.get("cost"), path, row_number, "the cost")
        cost = 1.0 if cost is None else cost
        if cost <= 0:
            raise DataError(
                f"{path}, line {row_number}: the cost is {cost:g}; a network's cost must be positive"
            )
        out.append(Candidate(members, scores, cost, "+".join(members)))
    return out
