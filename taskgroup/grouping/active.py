"""Active search: predict every task set's realised gains, with uncertainty, from cheap affinity
and a few trainings chosen where they most change the selection (issue 27).

The quantity is ``g(S, t)``, the gain of task ``t`` trained in the set ``S`` over ``t`` alone
(higher is better; 0 for a task alone, by definition). A set is *measured* when an oracle has
trained it (:class:`TableOracle` reveals a published or exhaustive table's row only when asked;
the engine oracle trains through the job queue); every other set is *predicted*.

**The surrogate** (:class:`GainSurrogate`) is a Bayesian linear model,
:class:`sklearn.linear_model.BayesianRidge`, on features of ``(S, t)``:

- the pair terms ``x[u -> t] = 1 / (|S| - 1)`` for each partner ``u`` of ``S``: a pair's own
  effect, averaged over the partners as Standley et al.'s higher-order approximation (HOA)
  averages realised pair gains, so that measured pairs carry over to the larger sets that hold
  them and a larger set corrects them;
- the target task (one-hot) and the set size ``(|S| - 1) / (n - 1)``, per target: how much more
  than its pairs a task gains in a large set;
- each cheap estimator's affinity from the partners to ``t`` (mean, min, max over partners;
  z-scored over the pool), and optional per-task features (type, training size) as the mean over
  partners of "same as ``t``" and the target's own value.

Why this model: the posterior is closed form (a refit per round costs milliseconds, on pools of
thousands of sets); its evidence maximisation sets the prior and noise precisions from the data,
so a few measured sets neither overfit the pair terms nor leave the cheap features unused; and
the posterior over the coefficients is Gaussian, so joint samples of every set's gains (needed
by the acquisition) and intervals of a proposal's total gain (its members are correlated) come
from one covariance. A Gaussian process with a linear kernel is the same model at a higher cost;
an ensemble would give no joint posterior.

**The acquisition** is Thompson sampling of the selection: draw ``samples`` joint posterior
samples of every unmeasured set's gains (measured sets keep their measured gains), solve the
exact selection (:func:`~taskgroup.grouping.select.select_milp`) of each sample for each budget,
and train next the ``batch`` unmeasured sets chosen most often; sets no sample chooses are
never trained, however unsure the surrogate is of them, so the trainings go where the selection
is decided. Ties (and a batch larger than the chosen sets) go to the largest predictive spread.

Hand-written: the loop, the features and the Thompson step over an exact selection (no library
does sample-then-select acquisition over set-valued designs); the model, the solver and the rank
statistics are scikit-learn's and SciPy's.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from sklearn.linear_model import BayesianRidge

from taskgroup.grouping.select import Candidate, select_milp

TaskSet = tuple[str, ...]


def key(tasks: Sequence[str]) -> TaskSet:
    """A task set's canonical form (sorted ids)."""
    return tuple(sorted(tasks))


class TableOracle:
    """A table of measured task sets (``Candidate`` rows whose ``scores`` are member gains) that
    reveals a set's gains only when asked; :attr:`asked` is what was asked, in order."""

    def __init__(self, table: Sequence[Candidate]) -> None:
        self._rows = {key(c.tasks): c for c in table}
        self.tasks: tuple[str, ...] = tuple(sorted({t for c in table for t in c.tasks}))
        self.asked: list[TaskSet] = []

    @property
    def pool(self) -> list[TaskSet]:
        """Every set the oracle can measure: the table's rows."""
        return sorted(self._rows, key=lambda s: (len(s), s))

    def cost(self, tasks: TaskSet) -> float:
        return float(self._rows[key(tasks)].cost)

    def measure(self, sets: Sequence[TaskSet]) -> dict[TaskSet, dict[str, float]]:
        """The member gains of each set asked for (a set outside the table is a KeyError)."""
        out = {}
        for s in sets:
            row = self._rows[key(s)]
            self.asked.append(key(s))
            out[key(s)] = {t: float(row.scores[t]) for t in row.tasks}
        return out


@dataclasses.dataclass(frozen=True)
class CheapFeatures:
    """What is known before any training: affinity matrices (``A[u, t]``: source ``u`` to target
    ``t``, higher = ``u`` helps ``t``) by estimator name, and per-task attributes (for example
    ``type`` or ``log_train_size``) by name."""

    tasks: tuple[str, ...]
    affinity: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    categorical: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    numeric: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)


class GainSurrogate:
    """The Bayesian linear model of ``g(S, t)`` over a fixed pool of sets (see the module doc)."""

    def __init__(self, pool: Sequence[TaskSet], cheap: CheapFeatures) -> None:
        self.tasks = tuple(cheap.tasks)
        index = {t: i for i, t in enumerate(self.tasks)}
        self.pool = [key(s) for s in pool]
        # one row per (multi-task set, member): singles are 0 and never modelled
        self.rows: list[tuple[TaskSet, str]] = [(s, t) for s in self.pool if len(s) > 1 for t in s]
        self.row_of = {r: i for i, r in enumerate(self.rows)}
        n = len(self.tasks)
        pair_col = {(u, t): k for k, (u, t) in enumerate(itertools.permutations(self.tasks, 2))}
        blocks = []
        pairs = np.zeros((len(self.rows), len(pair_col)))
        target = np.zeros((len(self.rows), n))
        size = np.zeros((len(self.rows), n))
        for i, (s, t) in enumerate(self.rows):
            partners = [u for u in s if u != t]
            for u in partners:
                pairs[i, pair_col[(u, t)]] = 1.0 / len(partners)
            target[i, index[t]] = 1.0
            size[i, index[t]] = (len(s) - 1) / max(n - 1, 1)
        blocks += [pairs, target, size]
        cheap_cols = []
        for matrix in cheap.affinity.values():
            a = np.asarray(matrix, dtype=float)
            stats = np.zeros((len(self.rows), 3))
            for i, (s, t) in enumerate(self.rows):
                incoming = np.array([a[index[u], index[t]] for u in s if u != t])
                incoming = incoming[np.isfinite(incoming)]
                if incoming.size:
                    stats[i] = (incoming.mean(), incoming.min(), incoming.max())
            cheap_cols.append(stats)
        for attribute in cheap.categorical.values():
            same = np.array(
                [np.mean([attribute[u] == attribute[t] for u in s if u != t]) for s, t in self.rows]
            )
            cheap_cols.append(same[:, None])
        for attribute in cheap.numeric.values():
            own = np.array([attribute[t] for _, t in self.rows])
            partners = np.array([np.mean([attribute[u] for u in s if u != t]) for s, t in self.rows])
            cheap_cols.append(np.stack([own, partners - own], axis=1))
        if cheap_cols:
            extra = np.concatenate(cheap_cols, axis=1)
            spread = extra.std(axis=0)
            blocks.append((extra - extra.mean(axis=0)) / np.where(spread > 0, spread, 1.0))
        self.features = np.concatenate(blocks, axis=1)
        self.model: BayesianRidge | None = None

    def fit(self, measured: Mapping[TaskSet, Mapping[str, float]]) -> GainSurrogate:
        """Refit on every measured multi-task set's member gains (at least two values)."""
        idx = [self.row_of[(key(s), t)] for s, gains in measured.items() if len(s) > 1 for t in gains]
        y = [gains[t] for s, gains in measured.items() if len(s) > 1 for t in gains]
        if len(idx) < 2:
            raise ValueError(f"the surrogate needs at least two measured gains, got {len(idx)}")
        self.model = BayesianRidge(fit_intercept=True).fit(self.features[idx], np.asarray(y))
        return self

    @property
    def fitted(self) -> bool:
        return self.model is not None

    def predict(self) -> tuple[np.ndarray, np.ndarray]:
        """The mean and predictive standard deviation (noise included) of every row."""
        assert self.model is not None, "fit first"
        mean, std = self.model.predict(self.features, return_std=True)
        return mean, std

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """``count`` joint posterior samples of every row's gain (coefficients drawn from their
        Gaussian posterior, plus each row's observation noise), shape ``(count, rows)``."""
        assert self.model is not None, "fit first"
        m = self.model
        sigma = (m.sigma_ + m.sigma_.T) / 2
        coefs = rng.multivariate_normal(m.coef_, sigma, size=count, method="eigh")
        # scikit-learn centres X and y before fitting: intercept_ = y_offset - X_offset @ coef_
        y_offset = m.intercept_ + m.X_offset_ @ m.coef_
        centred = self.features - m.X_offset_
        noise = rng.normal(0.0, 1.0 / np.sqrt(m.alpha_), size=(count, len(self.rows)))
        return coefs @ centred.T + y_offset + noise

    def table(self, values: np.ndarray, measured: Mapping[TaskSet, Mapping[str, float]]) -> list[Candidate]:
        """Every pool set as a :class:`Candidate` whose member scores are ``values`` (one per row;
        a measured set keeps its measured gains, a single task 0)."""
        out = []
        for s in self.pool:
            if s in measured:
                scores = {t: float(measured[s][t]) for t in s}
            elif len(s) == 1:
                scores = {s[0]: 0.0}
            else:
                scores = {t: float(values[self.row_of[(s, t)]]) for t in s}
            out.append(Candidate(s, scores))
        return out


@dataclasses.dataclass(frozen=True)
class Round:
    """One round of the active search: the sets trained, each with the surrogate's error on it
    before it was measured (mean absolute error of its member gains; against the prior mean 0
    before the first fit), and their measured gains."""

    sets: tuple[TaskSet, ...]
    errors: tuple[float, ...]
    gains: Mapping[TaskSet, Mapping[str, float]] = dataclasses.field(default_factory=dict)

    @property
    def error_before(self) -> float:
        return float(np.mean(self.errors))


@dataclasses.dataclass
class ActiveResult:
    """What the search measured, in order, and the final surrogate's table."""

    measured: dict[TaskSet, dict[str, float]]
    rounds: list[Round]
    surrogate: GainSurrogate

    def predicted(self) -> tuple[np.ndarray, np.ndarray]:
        return self.surrogate.predict()

    def table(self) -> list[Candidate]:
        """Measured gains where a set was trained, the surrogate's mean elsewhere."""
        mean, _ = self.surrogate.predict()
        return self.surrogate.table(mean, self.measured)


def active_search(
    oracle: TableOracle,
    cheap: CheapFeatures,
    trainings: int,
    batch: int = 4,
    budgets: Sequence[float] = (2, 3, 4, 5),
    samples: int = 16,
    start_pairs: float = 0.5,
    seed: int = 0,
    measured: Mapping[TaskSet, Mapping[str, float]] | None = None,
    progress: Callable[[Round], None] | None = None,
) -> ActiveResult:
    """Train (ask ``oracle`` for) up to ``trainings`` multi-task sets, ``batch`` at a time,
    chosen by Thompson sampling of the selection (module doc), refitting after each batch; the
    first ``start_pairs`` of the trainings go to pairs drawn at random (the pair terms every
    larger set's prediction is built from).
    Single tasks are the reference and are not counted; ``measured`` resumes an earlier search
    (its sets are not asked again and count towards ``trainings``)."""
    rng = np.random.default_rng(seed)
    pool = oracle.pool
    surrogate = GainSurrogate(pool, cheap)
    known: dict[TaskSet, dict[str, float]] = {key(s): dict(g) for s, g in (measured or {}).items()}
    for s in pool:
        if len(s) == 1:
            known.setdefault(s, {s[0]: 0.0})
    rounds: list[Round] = []
    spent = sum(1 for s in known if len(s) > 1)
    while spent < trainings:
        if sum(len(g) for s, g in known.items() if len(s) > 1) >= 2:
            surrogate.fit(known)
        open_sets = [s for s in pool if s not in known]
        if not open_sets:
            break
        size = min(batch, trainings - spent)
        pairs_left = [s for s in open_sets if len(s) == 2]
        if surrogate.fitted and (spent >= start_pairs * trainings or not pairs_left):
            before, std = surrogate.predict()
            chosen = _thompson_batch(surrogate, std, known, open_sets, rng, size, budgets, samples)
        else:  # the start: pairs at random (each one a pair term of the model)
            pairs = pairs_left or list(open_sets)
            chosen = [pairs[i] for i in rng.choice(len(pairs), size=min(size, len(pairs)), replace=False)]
            before = np.zeros(len(surrogate.rows))  # the prior mean
        got = oracle.measure(chosen)
        errors = [
            float(np.mean([abs(before[surrogate.row_of[(s, t)]] - g) for t, g in got[s].items()]))
            for s in chosen
        ]
        known.update(got)
        spent += len(chosen)
        rounds.append(Round(tuple(chosen), tuple(errors), got))
        if progress is not None:
            progress(rounds[-1])
    surrogate.fit(known)
    return ActiveResult(known, rounds, surrogate)


def _thompson_batch(
    surrogate: GainSurrogate,
    std: np.ndarray,
    known: Mapping[TaskSet, Mapping[str, float]],
    open_sets: Sequence[TaskSet],
    rng: np.random.Generator,
    batch: int,
    budgets: Sequence[float],
    samples: int,
) -> list[TaskSet]:
    draws = surrogate.sample(rng, samples)
    votes: dict[TaskSet, int] = dict.fromkeys(open_sets, 0)
    for values in draws:
        table = surrogate.table(values, known)
        for budget in budgets:
            selection = select_milp(table, budget, surrogate.tasks, higher_is_better=True)
            if selection is None:
                continue
            for c in selection.chosen:
                if table[c].tasks in votes:
                    votes[table[c].tasks] += 1
    spread = {s: float(np.mean([std[surrogate.row_of[(s, t)]] for t in s])) for s in open_sets}
    ranked = sorted(open_sets, key=lambda s: (-votes[s], -spread[s], s))
    return ranked[:batch]
