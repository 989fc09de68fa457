"""Realised gains of groups for the trained objective (:mod:`taskgroup.grouping.trained_search`):
every group a network trained through the engine (:func:`taskgroup.training.run.train_network`)
once, in a folder keyed by task set and config hash; its members scored at the network's final
validation evaluation (and, when the data has a held-out test split, at the same step on test).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from taskgroup.config import RunConfig
from taskgroup.metrics.summary import relative_gain
from taskgroup.tasks import TaskRegistry
from taskgroup.training.data import TrainingData, prepare_data
from taskgroup.training.run import final_scores, network_folder, train_network


@dataclasses.dataclass
class TrainedGains:
    """Realised relative gains of groups, each group trained once into ``work_dir``."""

    cfg: RunConfig
    registry: TaskRegistry
    tasks: Sequence[str]
    work_dir: Path
    data: TrainingData | None = None
    trained: int = 0  # networks trained by this object (not found done)

    def __post_init__(self) -> None:
        self.tasks = list(self.tasks)
        self.work_dir = Path(self.work_dir)
        self._scores: dict[tuple[str, ...], dict[str, float]] = {}
        # per network, its members' primary test metric (None: no test scores)
        self._test: dict[tuple[str, ...], dict[str, float] | None] = {}

    def _data(self) -> TrainingData:
        if self.data is None:
            self.data = prepare_data(self.cfg.data, self.registry, self.tasks)
        return self.data

    @property
    def test_source(self) -> str | None:
        """Where the held-out test split comes from (None: the data has none)."""
        return self._data().test_source

    def folder(self, group: Sequence[str]) -> Path:
        key = tuple(sorted(group))
        return network_folder(self.work_dir, "+".join(key), self.cfg, key)

    def is_trained(self, group: Sequence[str]) -> bool:
        """Whether the group's network is trained (its scores are known without training)."""
        return tuple(sorted(group)) in self._scores or (self.folder(group) / "done.json").exists()

    def scores(self, group: Sequence[str]) -> dict[str, float]:
        """Each member's primary validation metric at the final step of the group's network."""
        key = tuple(sorted(group))
        if key not in self._scores:
            folder = self.folder(key)
            done = (folder / "done.json").exists()
            train_network(self.cfg, self.registry, key, folder, "+".join(key), self._data())
            self.trained += not done
            final = final_scores(folder)
            primary = {t: self.registry[t].primary_metric.name for t in key}
            self._scores[key] = {t: float(final[t]["metrics"][primary[t]]) for t in key}
            tested = all("test_metrics" in final[t] for t in key)
            self._test[key] = (
                {t: float(final[t]["test_metrics"][primary[t]]) for t in key} if tested else None
            )
        return self._scores[key]

    def test_scores(self, group: Sequence[str]) -> dict[str, float] | None:
        """Each member's primary held-out test metric at the same final step (None when the data
        has no test split, or the network was trained before test scoring)."""
        self.scores(group)
        return self._test[tuple(sorted(group))]

    def _over_alone(
        self, group: Sequence[str], values: dict[str, float], alone: dict[str, float]
    ) -> dict[str, float]:
        """Each member's relative gain of ``values`` over its value trained alone."""
        return {
            t: relative_gain(values[t], alone[t], self.registry[t].primary_metric.higher_is_better)
            for t in group
        }

    def gains(self, group: Sequence[str]) -> dict[str, float]:
        """Each member's relative gain in the group over the member trained alone (0 alone)."""
        if len(group) == 1:
            return {group[0]: 0.0}
        return self._over_alone(group, self.scores(group), {t: self.scores((t,))[t] for t in group})

    def test_gains(self, group: Sequence[str]) -> dict[str, float] | None:
        """:meth:`gains` on the held-out test split (None without test scores)."""
        values = self.test_scores(group)
        if values is None:
            return None
        if len(group) == 1:
            return {group[0]: 0.0}
        alone = {}
        for t in group:
            scores = self.test_scores((t,))
            if scores is None:
                return None
            alone[t] = scores[t]
        return self._over_alone(group, values, alone)

    def served_test_gains(self, groups: Sequence[Sequence[str]]) -> dict[str, float] | None:
        """Each task's realised test gain in the network that serves it: among the groups that
        hold it, the best on *validation* (its final primary metric), as ``taskgroup train``
        serves overlapping groups. None unless every network needed (the groups and each task
        alone) is already trained and has test scores: nothing is trained here."""
        needed = {tuple(sorted(g)) for g in groups} | {(t,) for g in groups for t in g}
        if not all(self.is_trained(g) for g in needed):
            return None
        out: dict[str, float] = {}
        for t in dict.fromkeys(t for g in groups for t in g):
            pick = max if self.registry[t].primary_metric.higher_is_better else min
            home = pick((g for g in groups if t in g), key=lambda g: self.scores(g)[t])
            gains = self.test_gains(home)
            if gains is None:
                return None
            out[t] = gains[t]
        return out
