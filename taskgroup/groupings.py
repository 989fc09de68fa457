"""Groupings: ways to cut the tasks into networks (TS, CG, AU, or any file).

A grouping is a tuple of named groups of task ids. Groups may overlap: a task trained in several
networks is served by the one that is best for it on validation (as in Standley et al. 2020 and
TAG). Built in: ``ts`` (one network per task), ``cg`` (the registry's clinical groups), ``au``
(one network of all tasks). A file is YAML, either ``groups: {name: [task, ...]}`` or
``groups: [[task, ...], ...]`` (names are then g1, g2, ...); the search writes the first form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import yaml

from taskgroup.config import load_yaml
from taskgroup.errors import ConfigError, did_you_mean
from taskgroup.tasks import TaskRegistry

BUILTIN = ("ts", "cg", "au")


@dataclasses.dataclass(frozen=True)
class Grouping:
    name: str
    groups: dict[str, tuple[str, ...]]

    @property
    def tasks(self) -> tuple[str, ...]:
        """Every task the grouping trains, each once, in first-seen order."""
        return tuple(dict.fromkeys(t for ids in self.groups.values() for t in ids))

    def networks_of(self, task: str) -> tuple[str, ...]:
        return tuple(g for g, ids in self.groups.items() if task in ids)

    def restrict(self, tasks: Sequence[str]) -> Grouping:
        """The grouping on ``tasks`` only: other tasks removed, groups left empty dropped."""
        keep = set(tasks)
        groups = {g: tuple(t for t in ids if t in keep) for g, ids in self.groups.items()}
        return Grouping(self.name, {g: ids for g, ids in groups.items() if ids})

    def to_yaml(self) -> str:
        return yaml.safe_dump(
            {"name": self.name, "groups": {g: list(ids) for g, ids in self.groups.items()}}, sort_keys=False
        )


def builtin_grouping(name: str, registry: TaskRegistry) -> Grouping:
    if name == "ts":
        return Grouping("ts", {t: (t,) for t in registry.ids})
    if name == "cg":
        return Grouping("cg", {g: ids for g, ids in registry.clinical_groups.items()})
    if name == "au":
        return Grouping("au", {"all": registry.ids})
    raise ConfigError(f"unknown built-in grouping {name!r}; {did_you_mean(name, BUILTIN)}")


def load_grouping(spec: str | Path, registry: TaskRegistry) -> Grouping:
    """``ts``, ``cg``, ``au`` or a grouping YAML file; every task must be in the registry."""
    if str(spec) in BUILTIN:
        return builtin_grouping(str(spec), registry)
    path = Path(spec)
    data = load_yaml(path)
    raw = data.get("groups")
    if isinstance(raw, list):
        raw = {f"g{i + 1}": ids for i, ids in enumerate(raw)}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected 'groups:' as a mapping name -> [tasks] or a list of task lists")
    groups: dict[str, tuple[str, ...]] = {}
    for name, ids in raw.items():
        if not isinstance(ids, list) or not ids:
            raise ConfigError(f"{path}: group {name!r} must be a non-empty list of task ids")
        for t in ids:
            if t not in registry:
                raise ConfigError(
                    f"{path}: group {name!r} names unknown task {t!r}; {did_you_mean(str(t), registry.ids)}"
                )
        if len(set(ids)) != len(ids):
            raise ConfigError(f"{path}: group {name!r} lists a task twice")
        groups[str(name)] = tuple(ids)
    return Grouping(str(data.get("name", path.stem)), groups)
