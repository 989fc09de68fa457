"""Typed, frozen configuration: YAML mapped onto dataclasses, command-line overrides on top.

As in the DINOv3 evaluation configs: a config is a tree of frozen dataclasses; a YAML file gives
values for some fields; ``key.sub=value`` overrides are applied on top; an unknown key is an error
that names the file and the key, and the resolved config is written next to every result.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from taskgroup.errors import ConfigError, did_you_mean

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a clear error names the file when it is not one."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping copy."""
    result: dict[str, Any] = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. data.image_size=64")
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return result


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, strictly: unknown keys and wrong types are errors.

    ``where`` names the source (file and key path) in error messages.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    data = data or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - set(fields)
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{where}: unknown key {key!r}; {did_you_mean(key, fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where}: {exc}") from None
    except ValueError as exc:  # __post_init__ validation
        raise ConfigError(f"{where}: {exc}") from None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits no type of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            valid = [str(m.value) for m in tp]
            raise ConfigError(f"{where}: {value!r} is invalid; {did_you_mean(str(value), valid)}") from None
    if origin in (tuple, list, Sequence):
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(
                _convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, where): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        return Path(value)
    return value


#: metadata of a field left out of :func:`to_mapping` while it holds its default: a key added
#: later that does not change what is computed keeps the plain form (``config.yaml``, config
#: hashes, cached network folders) of every config that leaves it unset as it was
OMIT_DEFAULT = {"omit_default": True}


def to_mapping(config: Any) -> Any:
    """The plain (YAML-writable) form of a config, for saving the resolved config of a run.

    Passwords of URLs (a PostgreSQL storage) are masked (:func:`hide_password`): the plain form
    is what is written to files and job queues, never a secret. So a config read back from it
    (:func:`from_mapping`) holds no password: a worker takes its storage from ``--storage`` or
    ``TASKGROUP_STORAGE``, never from the queued config."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {
            f.name: to_mapping(getattr(config, f.name))
            for f in dataclasses.fields(config)
            if not (f.metadata.get("omit_default") and getattr(config, f.name) == f.default)
        }
    if isinstance(config, enum.Enum):
        return config.value
    if isinstance(config, tuple | list):
        return [to_mapping(v) for v in config]
    if isinstance(config, Mapping):
        return {k: to_mapping(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    if isinstance(config, str):
        return hide_password(config)
    return config


# ----------------------------------------------------------------------------------------------
# Storage URLs (the Optuna RDB storages of the job queues and searches)

#: a URL with a password in its user part (``scheme://user:password@host...``), also inside text
_URL_WITH_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:\"']*:[^\s\"']*@[^\s\"'@]*")
#: a password given as a query parameter (``...?password=secret``, as libpq accepts)
_PASSWORD_PARAMETER = re.compile(r"([?&]password=)[^&\s\"']*", re.IGNORECASE)


def hide_password(text: str) -> str:
    """``text`` with the password of every URL in it masked (``postgresql://user:***@host/db``,
    as SQLAlchemy renders it, and ``?password=***``), for what is shown or stored; anything
    else unchanged."""
    if "://" not in text or ("@" not in text and "password=" not in text.lower()):
        return text

    def masked(match: re.Match[str]) -> str:
        # by hand rather than SQLAlchemy's render_as_string(hide_password=True): a password may
        # hold "@" (the host starts after the last one), and text that is not a URL SQLAlchemy
        # reads must be masked all the same
        scheme, _, rest = match.group(0).partition("://")
        credentials, _, host = rest.rpartition("@")
        return f"{scheme}://{credentials.partition(':')[0]}:***@{host}"

    return _PASSWORD_PARAMETER.sub(r"\1***", _URL_WITH_PASSWORD.sub(masked, text))


#: PostgreSQL drivers SQLAlchemy has a dialect for, the declared one (``[postgres]``) first
POSTGRES_DRIVERS = ("psycopg2", "psycopg")


def storage_url(url: str) -> str:
    """A storage URL checked and made explicit: SQLAlchemy must read it and know its database;
    ``postgresql://`` without a driver names the installed one (``postgresql+psycopg2://``, the
    project's dependency, else psycopg 3), as SQLAlchemy 2.1's default driver (psycopg 3) may
    not be installed. Raises ValueError saying what is wrong (the password masked)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    shown = hide_password(url)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # not scheme://..., or a port that is not a number
        raise ValueError(
            f"storage {shown!r} is not a database URL (expected sqlite:///PATH or postgresql://USER@HOST/DB)"
        ) from None
    if parsed.drivername == "postgresql":
        driver = next((d for d in POSTGRES_DRIVERS if importlib.util.find_spec(d) is not None), None)
        if driver is None:
            raise ValueError(
                f"storage {shown!r}: no PostgreSQL driver is installed (pip install psycopg2-binary, "
                "the project's [postgres] extra)"
            )
        parsed = parsed.set(drivername=f"postgresql+{driver}")
        url = parsed.render_as_string(hide_password=False)
    try:
        parsed.get_dialect()
    except ArgumentError:  # NoSuchModuleError: an unknown database or driver
        raise ValueError(
            f"storage {shown!r}: unknown database {parsed.drivername!r} (expected sqlite:///PATH or "
            "postgresql://USER@HOST/DB)"
        ) from None
    return url


def _check_storage(config: Any) -> None:
    """A config's ``storage`` (when set) checked and made explicit (:func:`storage_url`)."""
    if config.storage is not None:
        object.__setattr__(config, "storage", storage_url(config.storage))  # frozen: set once here


def _at_least(config: Any, minimum: float, *names: str) -> None:
    """Each named field (None: unset, skipped) must be >= ``minimum``; the error names it."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ValueError(f"{name} must be at least {minimum:g}, got {value}")


# ----------------------------------------------------------------------------------------------
# Model configuration (M2DINO). Constructors never see these: ``build_model`` translates.


#: ``model.backbone.pretrained: required``: the config refuses to load until a value is given
PRETRAINED_REQUIRED = "required"


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """A timm DINOv3 ViT; ``None`` keeps the named model's own value."""

    name: str = "vit_small_patch16_dinov3"
    img_size: int = 224
    patch_size: int | None = None
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    drop_path_rate: float = 0.0
    # a local checkpoint (timm, safetensors, official DINOv3), "synthetic", "none" (random
    # weights, said explicitly: stored as None) or "required" (a config that must not train from
    # random weights by accident, configs/full.yaml: loading it without a value is an error)
    pretrained: str | None = None
    freeze_blocks: int = 0  # freeze the patch embedding and the first N blocks
    freeze_encoder: bool = False  # freeze every encoder weight (routers and task embeddings train)

    def __post_init__(self) -> None:
        if self.pretrained is not None and str(self.pretrained).strip().lower() == "none":
            object.__setattr__(self, "pretrained", None)
        elif self.pretrained == PRETRAINED_REQUIRED:
            raise ValueError(
                "model.backbone.pretrained is required by this config: give the DINOv3 weights "
                "(--set model.backbone.pretrained=/path/to/dinov3_vits16.pth; nothing downloads), "
                "or --set model.backbone.pretrained=none to train from random weights"
            )


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-Experts in the MLPs of the last ``num_layers`` blocks.

    mode: ``dense`` (plain ViT), ``moe`` (token routing, no task conditioning), ``task`` (routing
    by the task embedding only) or ``task_token`` (task embedding and token together).
    """

    mode: Literal["dense", "moe", "task", "task_token"] = "task"
    num_experts: int = 8
    top_k: int = 2
    num_layers: int = 6
    task_embed_dim: int = 64
    aux_weight: float = 0.01

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..num_experts ({self.num_experts}), got {self.top_k}")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    hidden: int = 64  # channels of the head convolutions and pooling
    neck_blocks: tuple[int, ...] = ()  # extra intermediate blocks fused into the feature map


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    backbone: BackboneConfig = BackboneConfig()
    moe: MoEConfig = MoEConfig()
    heads: HeadConfig = HeadConfig()


# ----------------------------------------------------------------------------------------------
# Data and training configuration


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data is and how batches are drawn. ``root`` None = the embedded synthetic
    benchmark, generated on first use into ``cache_dir``. ``test_root``: an FM_UIA root (its own
    ``csv_files/``) holding the held-out test split, for data whose test set lives elsewhere;
    None = ``root/test/`` when there is one, else no test split."""

    root: str | None = None
    test_root: str | None = None
    synthetic_scale: Literal["tiny", "small", "medium"] = "small"
    synthetic_seed: int = 0
    # 5: planted mechanisms of transfer and a test split; 4: the structure carrying a
    # classification label placed last (no label leak); 3: before
    synthetic_version: Literal[3, 4, 5] = 4
    cache_dir: str = "~/.cache/taskgroup"
    image_size: int = 64
    val_fraction: float = 0.2  # carved from train (per image) when the data has no val/ root
    # keep this share of each task's training examples (a fixed random subset per task, nested:
    # a smaller fraction's examples are among a larger one's); validation is never cut
    train_fraction: float = 1.0
    sampler: Literal["uniform", "proportional", "temperature"] = "uniform"
    temperature: float = 2.0
    batch_size: int = 32
    preload: bool = True  # decode every image once into memory (uint8) before training
    # DataLoader worker processes that build the training batches ahead of the steps (0: in the
    # training process); how batches are made, not what is trained: out of every network's hash
    workers: int = dataclasses.field(default=0, metadata=OMIT_DEFAULT)
    # training-time augmentation (taskgroup/training/augment.py): none, or hflip (never for a
    # task whose label a flip changes); left out of the plain form while none (hashes unchanged)
    augment: Literal["none", "hflip"] = dataclasses.field(default="none", metadata=OMIT_DEFAULT)
    skip_bad: bool = False
    # the CSV file listing the bad rows of every split (None: the command's default, e.g.
    # RUN/bad_rows.csv); where a report goes, not what is trained
    bad_report: str | None = dataclasses.field(default=None, metadata=OMIT_DEFAULT)
    # read image and mask paths that leave the root (absolute, or ``../`` past it); by default
    # such a row is bad (see ``load_index``). Left out of the plain form while false, so configs
    # that leave it unset keep their hashes and cached networks
    allow_outside_root: bool = dataclasses.field(default=False, metadata=OMIT_DEFAULT)
    # the encoder behind ``model.backbone.pretrained: synthetic`` (see training/pretrain.py)
    pretext_images: int = 3000
    pretext_steps: int = 1500

    def __post_init__(self) -> None:
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        _at_least(self, 1, "image_size", "batch_size", "pretext_images", "pretext_steps")
        _at_least(self, 0, "workers")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


def record_dir(cfg: DataConfig) -> Path:
    """Where validation records the files that decoded without error (see ``load_index``)."""
    return Path(os.path.expanduser(cfg.cache_dir)) / "decoded"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop. ``steps_per_task`` x the number of tasks of a network gives its steps, so that
    every task sees as many of its own batches whatever its grouping (``steps`` overrides)."""

    steps_per_task: int = 100
    steps: int | None = None
    eval_every: int = 250
    checkpoint_every: int = 100
    lr_encoder: float = 1e-4
    lr_heads: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip: float = 1.0
    loss_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    amp: bool = True  # bfloat16 autocast, CUDA only
    channels_last: bool = True  # CUDA only

    def __post_init__(self) -> None:
        _at_least(self, 1, "steps_per_task", "steps", "eval_every", "checkpoint_every")
        _at_least(self, 0, "lr_encoder", "lr_heads", "weight_decay", "warmup_steps", "grad_clip")

    def total_steps(self, num_tasks: int) -> int:
        return self.steps if self.steps is not None else self.steps_per_task * num_tasks


AFFINITY_METHODS = ("lookahead", "gradient", "readout", "attribution", "pairwise", "subsets")


@dataclasses.dataclass(frozen=True)
class AffinityConfig:
    """``taskgroup affinity``: which estimators, how often and on what they measure.

    Probes (``lookahead``, ``gradient``) run every ``every`` steps (the lookahead, about nine
    times dearer, every ``lookahead_every``; None: ``every``) of one multi-task training
    of ``steps_per_task`` steps per task (None: ``train.steps_per_task``), and at least
    ``min_probes`` times each whatever the number of tasks (a run too short for ``every`` or
    ``lookahead_every`` to give that many probes is probed every ``total_steps // min_probes``
    steps instead), each on a fresh batch of
    ``probe_batch`` images per task (None: ``data.batch_size``). ``blocks``: measure on the
    shared parameters of the last N encoder blocks only (0: all shared parameters).
    ``readout`` is read at the end of that training on ``readout_batches`` batches per task,
    ``attribution`` on a shared probe set of ``attribution_images`` images of every task, at
    ``attribution_layer``: ``features`` (the shared feature map every head reads) or ``input``
    (the patch embeddings, before the encoder mixes the tokens). ``attribution_map``: how a
    head's map is made, ``gradient`` (gradient times input at that layer), ``occlusion`` (the
    change of the head's output when each ``occlusion_cell`` x ``occlusion_cell`` pixel square
    of an image is blanked; the layer is then the image) or ``hybrid`` (occlusion for the
    classification heads, which pool the whole map, gradient times input for the dense heads,
    both on the occlusion cells).
    ``runs``: the probe training is repeated with seeds ``train.seed``, ``train.seed + 1``, ...
    and every probe method averages its matrices over the runs.
    ``correction``: how the task-type confound (and, with ``type_task_centre``, each task's own
    level) is removed from the probe matrices (see :mod:`taskgroup.affinity.corrections`). Trained estimators (``pairwise``, ``subsets``)
    run networks of ``trained_steps_per_task`` steps per task (or, with ``trained_steps``, that
    many steps for every network whatever its size: a fixed budget per network, so a pair's
    target gets half the steps it gets alone) as jobs of an Optuna study on
    ``storage`` (None: a SQLite file in the output folder)."""

    methods: tuple[str, ...] = ("lookahead", "gradient", "readout", "attribution")
    every: int = 50
    lookahead_every: int | None = None
    min_probes: int = 3
    probe_batch: int | None = None
    blocks: int = 0
    readout_batches: int = 4
    attribution_images: int = 4
    attribution_layer: Literal["features", "input"] = "features"
    attribution_map: Literal["gradient", "occlusion", "hybrid"] = "gradient"
    occlusion_cell: int = 16
    runs: int = 1
    correction: Literal["none", "type_centre", "type_scale", "type_task_centre"] = "type_centre"
    steps_per_task: int | None = None
    trained_steps_per_task: int = 60
    trained_steps: int | None = None
    subset_size: int = 6
    subsets: int = 40
    storage: str | None = None
    heartbeat: int = 10  # seconds between a pairwise worker's heartbeats
    grace: int = 60  # seconds without a heartbeat before a job is given to another worker

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in AFFINITY_METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; {did_you_mean(unknown[0], AFFINITY_METHODS)}")
        if self.every < 1 or (self.lookahead_every is not None and self.lookahead_every < 1):
            raise ValueError(
                f"every and lookahead_every must be at least 1, got {self.every}, {self.lookahead_every}"
            )
        if self.occlusion_cell < 1:
            raise ValueError(f"occlusion_cell must be at least 1 pixel, got {self.occlusion_cell}")
        if self.runs < 1 or self.readout_batches < 1:
            raise ValueError(
                f"runs and readout_batches must be at least 1, got {self.runs}, {self.readout_batches}"
            )
        _at_least(
            self,
            1,
            "probe_batch",
            "attribution_images",
            "steps_per_task",
            "trained_steps_per_task",
            "trained_steps",
        )
        _at_least(self, 1, "min_probes", "subset_size", "subsets", "heartbeat", "grace")
        _check_storage(self)


SEARCH_METHODS = ("partition", "select", "optuna")
#: every method ``search.methods`` may name: the defaults and the active search (issue 27)
SEARCH_METHOD_NAMES = (*SEARCH_METHODS, "active")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """``taskgroup search``: from affinity (or measured group results) to grouping proposals.

    ``partition``: graph partitions of each affinity matrix (Louvain and greedy modularity over
    ``resolutions``, Kernighan-Lin, spectral and agglomerative over ``n_groups``). ``select``:
    network selection (MILP) from a candidate pool (partitions, their merges and splits, the
    ``pairs`` best pairs and ``triples`` best triples, the clinical groups, all tasks) for each
    network budget in ``budgets``. ``optuna``: a TPE study over partitions into at most
    ``max_groups`` groups (``trials`` trials; its best and every graph partition polished by
    single-task moves) and an NSGA-II study of predicted gain vs networks (``pareto_trials``),
    on ``storage`` (None: a SQLite file in the output folder). ``trained_trials`` > 0 adds a
    study whose objective is a real short training of each trial's partition (the run config's
    model, data and train sections), pruned by ``pruner``.

    The predictor (:class:`taskgroup.grouping.predict.GainPredictor`): ``gain`` = ``mean``
    predicts a member's gain as the mean affinity from its partners (HOA, TAG), shrunk towards 0
    by m / (m + ``partners``); ``sum`` as the sum (a partner adds its own training steps, so
    its affinity adds; over a partition this is correlation clustering). ``shrink`` (n0) and
    ``penalty`` (beta) make either data-scale-aware (0 = off).

    The best proposal of an estimator (``best``): ``partition`` (default) takes the
    highest-gain partition (every task in one network; overlapping selections are ranked, not
    chosen) and leaves the number of networks to the predictor: under ``gain: sum`` a group pays
    for a member that hurts it, so a group is split exactly when its parts hurt each other.
    Under ``gain: mean`` finer partitions and overlapping selections always fit the estimate a
    little better, and the rules weigh gain against networks: ``knee`` takes the knee of the
    predicted gain / networks front (Kneedle, with AU as its one-network point) and the
    highest-gain proposal with that many networks; ``tolerance`` (also the fallback when the
    front has no knee) the fewest networks whose predicted mean gain is within ``tolerance``
    (relative) of the highest predicted by any proposal."""

    methods: tuple[str, ...] = SEARCH_METHODS
    estimators: tuple[str, ...] = ()  # affinity methods to use (empty: every one found)
    budgets: tuple[float, ...] = (3.0, 5.0)
    max_groups: int = 6
    trials: int = 300
    pareto_trials: int = 300
    gain: Literal["mean", "sum"] = "sum"
    partners: float = 4.0  # gain: mean only
    shrink: float = 0.0
    penalty: float = 0.0
    pairs: int = 50
    triples: int = 50
    n_groups: tuple[int, ...] = (2, 3, 4, 5, 6)
    resolutions: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    storage: str | None = None
    seed: int = 0
    best: Literal["knee", "tolerance", "partition"] = "partition"
    tolerance: float = 0.05
    top: int = 12  # rows of the terminal table
    # the trained objective (grouping/trained_search.py): this many Optuna trials that each train their
    # partition through the engine (0 = off), pruned by ``pruner``
    trained_trials: int = 0
    pruner: Literal["median", "successive_halving", "none"] = "median"
    # the active search (method ``active``, taskgroup/stages/active.py): this many task sets
    # trained (asked of the ``oracle``), ``batch`` at a time, chosen from ``samples`` posterior
    # samples per round; the first ``start_pairs`` of them random pairs
    trainings: int = 50
    batch: int = 4
    samples: int = 16
    start_pairs: float = 0.5
    oracle: Literal["table", "engine"] = "table"

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in SEARCH_METHOD_NAMES]
        if unknown:
            raise ValueError(
                f"unknown search method {unknown[0]!r}; {did_you_mean(unknown[0], SEARCH_METHOD_NAMES)}"
            )
        if self.trainings < 1 or self.batch < 1 or self.samples < 1:
            raise ValueError("trainings, batch and samples must be at least 1")
        if not 0 <= self.start_pairs <= 1:
            raise ValueError(f"start_pairs must be in [0, 1], got {self.start_pairs}")
        if self.max_groups < 1 or self.trials < 1 or self.pareto_trials < 1:
            raise ValueError("max_groups, trials and pareto_trials must be at least 1")
        if min(self.partners, self.shrink, self.penalty) < 0:
            raise ValueError("partners, shrink and penalty must be >= 0")
        if any(b <= 0 for b in self.budgets):
            raise ValueError(f"budgets must be positive, got {self.budgets}")
        _check_storage(self)


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """``taskgroup compare``: which groupings, how many seeds, how tasks are scored.

    ``groupings``: ``ts``, ``cg``, ``au`` or grouping YAML files; ``seeds`` seeds per network
    (``train.seed``, ``train.seed + 1``, ...); ``select``: score every task at its network's
    ``final`` evaluation (default: every network is judged after the same per-task budget) or at
    its ``best`` validation step (optimistic, and more so for networks evaluated more often).
    Networks are jobs of an Optuna study on ``storage`` (None: a SQLite file in ``cache``) in the
    folder ``cache`` (None: the output folder); a network with the same task set, config and
    seed is trained once for every grouping and every compare run that shares the cache.
    ``confidence``: level of the intervals over seeds. ``floor``: relative gains of scores where
    higher is better (DSC, IoU, AUC...) are taken against max(TS score, floor), so that a task TS
    barely learns cannot dominate a mean (measured: TS Dice of a few thousandths gave delta_m of
    +45 on 27 tasks at 60 steps per task); 0 = plain relative gain."""

    groupings: tuple[str, ...] = ("ts", "cg", "au")
    seeds: int = 3
    select: Literal["final", "best"] = "final"
    storage: str | None = None
    cache: str | None = None
    confidence: float = 0.95
    floor: float = 0.1
    heartbeat: int = 10
    grace: int = 60

    def __post_init__(self) -> None:
        if self.floor < 0:
            raise ValueError(f"floor must be >= 0, got {self.floor}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {self.seeds}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        _at_least(self, 1, "heartbeat", "grace")
        _check_storage(self)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    registry: str | None = None  # task registry YAML (default configs/fmuia2026.yaml)
    affinity: AffinityConfig = AffinityConfig()  # only read by ``taskgroup affinity``
    search: SearchConfig = SearchConfig()  # only read by ``taskgroup search``
    compare: CompareConfig = CompareConfig()  # only read by ``taskgroup compare``

    def __post_init__(self) -> None:
        if self.model.backbone.img_size != self.data.image_size:
            raise ValueError(
                f"model.backbone.img_size ({self.model.backbone.img_size}) and data.image_size "
                f"({self.data.image_size}) must be equal"
            )


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """A run config from YAML (None = all defaults) with ``key=value`` overrides."""
    data = load_yaml(path) if path is not None else {}
    return from_mapping(RunConfig, apply_overrides(data, overrides), str(path or "config"))


def config_hash(config: Any) -> str:
    """A short stable hash of a config's plain form (what a cached result was made with)."""
    import hashlib
    import json

    return hashlib.sha1(json.dumps(to_mapping(config), sort_keys=True).encode()).hexdigest()[:12]
