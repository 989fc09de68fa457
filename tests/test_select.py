"""Network selection: the exact solvers agree with each other and with brute force, and reproduce
the published optimal network-selection curves of Standley et al. (2020)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from taskgroup.grouping import (
    Candidate,
    NetworkSelector,
    random_pool,
    read_network_table,
    score_selection,
    select_branch_and_bound,
    select_brute_force,
    select_milp,
)
from taskgroup.grouping.predict import higher_order_candidates, predicted_gains

# Standley et al.'s network_selection tables (MIT licence, copied with it from ../shared/external)
STANDLEY = Path(__file__).parent / "data" / "standley"
BUDGETS = [1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5]
# published "optimal network choice" curves (sum of test losses over the 5 tasks), README there
PUBLISHED = {
    "results": [0.5027, 0.4613, 0.4522, 0.4461, 0.4424, 0.4393, 0.4356, 0.4356, 0.4348],
    "results_large": [0.3599, 0.3548, 0.3173, 0.3145, 0.3061, 0.3049, 0.3019, 0.3019, 0.3017],
}


def _standley(name: str):
    return read_network_table(STANDLEY / f"{name}.txt"), read_network_table(STANDLEY / f"{name}_test.txt")


def test_reads_the_standley_layout():
    val, _ = _standley("results")
    assert len(val) == 36 and [c.cost for c in val[:6]] == [0.5] * 5 + [1.0]
    assert val[5].tasks == ("t0",) and val[6].tasks == ("t1",)
    assert val[10].tasks == ("t0", "t1") and val[-1].tasks == ("t0", "t1", "t2", "t3", "t4")
    assert val[0].scores == {"t0": 0.08021}


@pytest.mark.parametrize("setting", sorted(PUBLISHED))
def test_milp_reproduces_the_published_selection_curves(setting):
    val, test = _standley(setting)
    curve = [score_selection(select_milp(val, b), test) for b in BUDGETS]
    # the published curve has 4 decimals, some rounded and some cut (0.50278 is printed 0.5027,
    # 0.43555 as 0.4356): equal to within its last digit
    assert curve == pytest.approx(PUBLISHED[setting], abs=1e-4)


@pytest.mark.parametrize("setting", ["results", "results_large", "results_small_data", "results_alt"])
def test_solvers_agree_on_every_setting_and_budget(setting):
    val, _ = _standley(setting)
    for budget in BUDGETS:
        milp, bnb = select_milp(val, budget), select_branch_and_bound(val, budget)
        assert milp.total == pytest.approx(bnb.total, abs=1e-9), budget
        assert milp.cost <= budget + 1e-9 and bnb.cost <= budget + 1e-9


def _random_pool(rng: np.random.Generator, tasks: list[str], count: int) -> list[Candidate]:
    """Small pools with half-size singles and uneven costs, for the brute-force comparison."""
    pool = [Candidate((t,), {t: float(rng.uniform(0.5, 1))}, float(rng.choice([0.5, 1.0]))) for t in tasks]
    for _ in range(count):
        size = int(rng.integers(2, len(tasks) + 1))
        members = tuple(sorted(rng.choice(tasks, size, replace=False)))
        pool.append(
            Candidate(members, {t: float(rng.uniform(0.3, 1)) for t in members}, float(rng.uniform(0.5, 2)))
        )
    return pool


@pytest.mark.parametrize("higher_is_better", [False, True])
def test_milp_and_branch_and_bound_equal_brute_force_on_random_pools(higher_is_better):
    rng = np.random.default_rng(0)
    tasks = [f"task{k}" for k in range(5)]
    for _ in range(20):
        pool = _random_pool(rng, tasks, 8)
        budget = float(rng.uniform(1.5, 4))
        brute = select_brute_force(pool, budget, higher_is_better=higher_is_better)
        for solver in (select_milp, select_branch_and_bound):
            found = solver(pool, budget, higher_is_better=higher_is_better)
            assert (found is None) == (brute is None)
            if brute is not None:
                assert found.total == pytest.approx(brute.total, abs=1e-9)
                # every task is served by a chosen network that contains it, at its best score
                for task, c in found.served.items():
                    assert c in found.chosen and task in pool[c].tasks


def test_selector_is_sklearn_style_and_errors_name_the_problem():
    pool = [Candidate(("a",), {"a": 1.0}), Candidate(("a", "b"), {"a": 0.5, "b": 0.7})]
    sel = NetworkSelector(budget=1).fit(pool)
    assert sel.groups_ == [("a", "b")] and sel.selection_.total == pytest.approx(1.2)
    with pytest.raises(ValueError, match="no selection"):
        NetworkSelector(budget=0.5).fit(pool)
    with pytest.raises(ValueError, match="task\\(s\\) c"):
        select_milp(pool, 2, tasks=["a", "b", "c"])
    with pytest.raises(ValueError, match="no score for member"):
        Candidate(("a", "b"), {"a": 1.0})


def test_a_27_task_instance_covers_every_task_within_budget():
    """27 tasks and 400 random candidates (benchmarks/select_scale.py times the 3000-candidate
    instance of issue 6)."""
    pool = random_pool(np.random.default_rng(1), 27, 400)
    found = select_milp(pool, 6)
    assert found is not None and found.cost <= 6 and set(found.served) == {f"task{k}" for k in range(27)}
    singles = sum(pool[k].scores[f"task{k}"] for k in range(27))
    assert found.total < singles  # groups of cheaper total loss exist in the pool and are used


# Standley et al.'s higher-order approximation (HOA), setting 1, README in tests/data/standley
HOA_PUBLISHED = [0.5028, 0.4613, 0.4547, 0.4505, 0.4488, 0.4449, 0.4411, 0.4455, 0.4420]


def test_higher_order_approximation_reproduces_the_published_curve():
    """Selecting on HOA-predicted validation losses and scoring on test gives the published HOA
    curve at budgets 1-4. At 4.5 and 5 the optimum is tied on validation: task t1 has the same
    validation loss (0.1695) alone and in the pair (t1, t2), so a selection with the pair and
    one with t1's single-task network in its place (same cost) have equal totals; the MILP
    keeps the pair (test 0.44532 and 0.44176), the published curve took the single network
    (0.4455 and 0.4420, test loss 0.1696 against 0.1694). Both are asserted: the tie is real
    and the published values are the other side of it."""
    val, test = _standley("results")
    predicted = higher_order_candidates(val)
    assert predicted[-1].scores["t0"] == pytest.approx(np.mean([val[k].scores["t0"] for k in range(10, 14)]))
    selections = [select_milp(predicted, b) for b in BUDGETS]
    curve = [score_selection(s, test) for s in selections]
    assert curve[:7] == pytest.approx(HOA_PUBLISHED[:7], abs=1e-4)
    index = {(c.tasks, c.cost): k for k, c in enumerate(predicted)}
    pair, alone = index[("t1", "t2"), 1.0], index[("t1",), 1.0]
    assert predicted[pair].scores["t1"] == predicted[alone].scores["t1"]
    for budget, selection, published in zip(BUDGETS[7:], selections[7:], HOA_PUBLISHED[7:], strict=True):
        assert selection.served["t1"] == pair
        swapped = [alone if c == pair else c for c in selection.chosen]
        tied = select_milp([predicted[c] for c in swapped], budget)
        assert tied.total == pytest.approx(selection.total, abs=1e-12)
        tied_test = score_selection(tied, [test[c] for c in swapped])
        assert tied_test == pytest.approx(published, abs=1e-4)
        assert tied_test != pytest.approx(score_selection(selection, test), abs=1e-4)


def test_predicted_gains_are_the_mean_incoming_affinity():
    a = np.array([[0.0, 0.2, -0.4], [0.6, 0.0, np.nan], [0.1, 0.3, 0.0]])
    gains = predicted_gains(a, ["x", "y", "z"], ["x", "y", "z"])
    assert gains == pytest.approx({"x": 0.35, "y": 0.25, "z": -0.4})
    assert predicted_gains(a, ["x", "y", "z"], ["y"]) == {"y": 0.0}
