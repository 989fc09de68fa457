"""The task registry: the 27 FM_UIA 2026 tasks as typed, frozen data.

Tasks are data (a :class:`TaskSpec`), not classes. The registry is read from
``configs/fmuia2026.yaml`` (or any file of the same shape) and validated when loaded: an unknown
task type, a duplicate id, or a clinical group that names an unknown task is an error naming the
file and the task.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from taskgroup.config import load_yaml
from taskgroup.errors import ConfigError, did_you_mean

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_REGISTRY = CONFIG_DIR / "fmuia2026.yaml"


class TaskKind(enum.StrEnum):
    """A task type; the value is the CSV's ``task_name`` (note the capital R of Regression)."""

    SEGMENTATION = "segmentation"
    CLASSIFICATION = "classification"
    DETECTION = "detection"
    REGRESSION = "Regression"

    @property
    def short(self) -> str:
        """The short name used in tables: seg, cls, det, reg."""
        return {"segmentation": "seg", "classification": "cls", "detection": "det"}.get(self.value, "reg")

    @classmethod
    def parse(cls, name: str, where: str = "") -> TaskKind:
        """Parse a task type by CSV name or short name; an unknown one lists the valid ones."""
        aliases = {k.value: k for k in cls} | {k.short: k for k in cls}
        if name in aliases:
            return aliases[name]
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}unknown task type {name!r}; {did_you_mean(name, aliases)}")


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One metric of a task and its direction."""

    name: str
    higher_is_better: bool


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task of the benchmark.

    ``num_classes`` follows the challenge CSV: segmentation = classes including background,
    classification = classes, detection = 1 (one box), regression = number of keypoints.
    """

    id: str
    kind: TaskKind
    num_classes: int
    organ: str
    clinical_group: str
    train_images: int
    metrics: tuple[MetricSpec, ...]
    class_names: tuple[str, ...] = ()
    hflip_changes_label: bool = False

    @property
    def num_keypoints(self) -> int:
        if self.kind is not TaskKind.REGRESSION:
            raise AttributeError(f"task {self.id} is {self.kind.value}, it has no keypoints")
        return self.num_classes

    @property
    def primary_metric(self) -> MetricSpec:
        return self.metrics[0]

    def metric(self, name: str) -> MetricSpec:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(
            f"task {self.id} has no metric {name!r}; {did_you_mean(name, [m.name for m in self.metrics])}"
        )


@dataclasses.dataclass(frozen=True)
class TaskRegistry:
    """The tasks of a benchmark and its clinical grouping (used by the CG paradigm)."""

    name: str
    tasks: tuple[TaskSpec, ...]
    clinical_groups: Mapping[str, tuple[str, ...]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {t.id: t for t in self.tasks})

    def __getitem__(self, task_id: str) -> TaskSpec:
        try:
            return self._by_id[task_id]  # type: ignore[attr-defined]
        except KeyError:
            raise KeyError(f"unknown task {task_id!r}; {did_you_mean(task_id, self.ids)}") from None

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._by_id  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(t.id for t in self.tasks)

    def of_kind(self, kind: TaskKind) -> tuple[TaskSpec, ...]:
        return tuple(t for t in self.tasks if t.kind is kind)

    def subset(self, task_ids: Sequence[str]) -> TaskRegistry:
        """The registry restricted to some tasks (clinical groups restricted likewise)."""
        chosen = [self[t] for t in task_ids]
        keep = {t.id for t in chosen}
        groups = {g: tuple(t for t in ids if t in keep) for g, ids in self.clinical_groups.items()}
        return TaskRegistry(self.name, tuple(chosen), {g: ids for g, ids in groups.items() if ids})


_TASK_KEYS = {
    "id",
    "type",
    "num_classes",
    "organ",
    "clinical_group",
    "train_images",
    "class_names",
    "hflip_changes_label",
}


def parse_registry(data: Mapping[str, Any], source: str) -> TaskRegistry:
    """Validate a registry mapping (the YAML's content); ``source`` names it in errors."""
    unknown = set(data) - {"name", "metrics", "tasks", "clinical_groups"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key {sorted(unknown)[0]!r}")
    metrics: dict[TaskKind, tuple[MetricSpec, ...]] = {}
    for kind_name, spec in (data.get("metrics") or {}).items():
        kind = TaskKind.parse(kind_name, f"{source}: metrics")
        specs = []
        for metric, direction in spec.items():
            if direction not in ("higher", "lower"):
                raise ConfigError(
                    f"{source}: metric {kind_name}.{metric}: direction must be 'higher' or 'lower', got {direction!r}"
                )
            specs.append(MetricSpec(metric, direction == "higher"))
        metrics[kind] = tuple(specs)
    tasks: list[TaskSpec] = []
    seen: set[str] = set()
    for i, row in enumerate(data.get("tasks") or []):
        where = f"{source}: tasks[{i}]"
        if not isinstance(row, Mapping) or "id" not in row:
            raise ConfigError(f"{where}: each task needs at least an id")
        task_id = str(row["id"])
        where = f"{source}: task {task_id}"
        extra = set(row) - _TASK_KEYS
        if extra:
            raise ConfigError(
                f"{where}: unknown key {sorted(extra)[0]!r}; {did_you_mean(sorted(extra)[0], _TASK_KEYS)}"
            )
        if task_id in seen:
            raise ConfigError(f"{where}: duplicate task id {task_id!r}")
        seen.add(task_id)
        kind = TaskKind.parse(str(row.get("type")), where)
        if kind not in metrics:
            raise ConfigError(f"{where}: no metrics are defined for type {kind.value!r}")
        num = row.get("num_classes")
        if not isinstance(num, int) or isinstance(num, bool):
            raise ConfigError(f"{where}: num_classes must be an integer, got {num!r}")
        minimum = {TaskKind.SEGMENTATION: 2, TaskKind.CLASSIFICATION: 2, TaskKind.REGRESSION: 1}.get(kind, 1)
        if num < minimum or (kind is TaskKind.DETECTION and num != 1):
            raise ConfigError(
                f"{where}: num_classes {num} is invalid for {kind.value} (detection: exactly 1; segmentation and classification: >= 2; Regression: >= 1 keypoint)"
            )
        names = tuple(str(n) for n in row.get("class_names") or ())
        if names and len(names) != num:
            raise ConfigError(f"{where}: {len(names)} class_names for num_classes {num}")
        tasks.append(
            TaskSpec(
                id=task_id,
                kind=kind,
                num_classes=num,
                organ=str(row.get("organ", "")),
                clinical_group=str(row.get("clinical_group", "")),
                train_images=int(row.get("train_images", 0)),
                metrics=metrics[kind],
                class_names=names,
                hflip_changes_label=bool(row.get("hflip_changes_label", False)),
            )
        )
    if not tasks:
        raise ConfigError(f"{source}: no tasks")
    groups: dict[str, tuple[str, ...]] = {}
    owner: dict[str, str] = {}
    for group, members in (data.get("clinical_groups") or {}).items():
        for task_id in members:
            if task_id not in seen:
                raise ConfigError(
                    f"{source}: clinical group {group!r} names unknown task {task_id!r}; {did_you_mean(task_id, seen)}"
                )
            if task_id in owner:
                raise ConfigError(
                    f"{source}: task {task_id!r} is in clinical groups {owner[task_id]!r} and {group!r}"
                )
            owner[task_id] = group
        groups[str(group)] = tuple(members)
    if groups:
        missing = [t.id for t in tasks if t.id not in owner]
        if missing:
            raise ConfigError(f"{source}: task {missing[0]!r} is in no clinical group")
        for t in tasks:
            if t.clinical_group and t.clinical_group != owner[t.id]:
                raise ConfigError(
                    f"{source}: task {t.id!r} says clinical_group {t.clinical_group!r} but is listed under {owner[t.id]!r}"
                )
    return TaskRegistry(str(data.get("name", Path(source).stem)), tuple(tasks), groups)


def load_registry(path: str | Path | None = None) -> TaskRegistry:
    """Load and validate a registry file (default: ``configs/fmuia2026.yaml``)."""
    path = Path(path) if path is not None else DEFAULT_REGISTRY
    return _load_registry_cached(path.resolve())


@cache
def _load_registry_cached(path: Path) -> TaskRegistry:
    return parse_registry(load_yaml(path), str(path))
