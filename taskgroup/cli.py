"""The ``taskgroup`` command: subcommands only, no logic (that lives in the package).

taskgroup tasks     [--registry FILE] [--data DIR]     the registry (and what a dataset holds)
taskgroup synth     --out DIR [--scale S] [--seed N]   write the synthetic benchmark
taskgroup evaluate  --gt ROOT --pred DIR               score predictions, official metrics
taskgroup train     [--grouping G] --out RUN           train a grouping's networks
taskgroup affinity  [--method M ...] [--out DIR]       27x27 inter-task affinity matrices
taskgroup search    RUN ... [--method M ...]           grouping proposals from affinity
taskgroup compare   --groupings G ... [--seeds N]      train groupings, compare against TS
taskgroup study run studies/NAME.yaml [--setting S]   a whole experiment (stages chained)
taskgroup worker    --storage URL --study NAME         take queued network trainings

Every command that reads data takes ``--skip-bad`` and ``--bad-report FILE``. A command imports
what it runs only when it runs (``taskgroup --help`` and ``taskgroup tasks`` without ``--data``
import no torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from taskgroup.config import AFFINITY_METHODS, DataConfig, hide_password, record_dir
from taskgroup.errors import TaskgroupError
from taskgroup.tasks import load_registry

console = Console()
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--registry", type=Path, default=None, help="task registry YAML (default: configs/fmuia2026.yaml)"
    )
    _add_bad_row_options(parser, "bad_rows.csv in the current folder when --skip-bad")


def _add_worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--work-root",
        type=Path,
        default=None,
        help="store the queue's paths under this folder relative to it, so that a worker on another "
        "machine given its own --work-root (its mount of the same folder) finds them",
    )
    parser.add_argument(
        "--devices",
        default=None,
        metavar="0,1,...",
        help="GPUs for the local workers: one worker process per GPU (at least --workers, round "
        "robin), each seeing only its GPU (CUDA_VISIBLE_DEVICES); default: every worker on the "
        "config's train.device",
    )


def parse_devices(text: str | None) -> tuple[str, ...]:
    """``--devices 0,1,3`` -> ("0", "1", "3"): GPU indices or UUIDs as ``CUDA_VISIBLE_DEVICES``
    takes them; an empty entry is an error."""
    if not text:
        return ()
    devices = tuple(d.strip() for d in text.split(","))
    if not all(devices):
        raise TaskgroupError(f"--devices {text!r}: expected GPU indices separated by commas, e.g. 0,1,2,3")
    return devices


def _add_bad_row_options(parser: argparse.ArgumentParser, default: str) -> None:
    """``--skip-bad`` and ``--bad-report``, which every command that reads data takes."""
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out bad rows (each is logged to --bad-report) instead of failing",
    )
    parser.add_argument(
        "--bad-report", type=Path, default=None, help=f"CSV file listing bad rows (default: {default})"
    )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand; with ``command``, the arguments of ``synth`` (which need the
    generator's scales and versions, so its package) only when ``command`` is ``synth``: the
    others' help and parsing are the same without them."""
    parser = argparse.ArgumentParser(
        prog="taskgroup", description="Which ultrasound tasks should be trained together."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tasks", help="print the task registry as a table")
    _add_data_options(p)
    p.add_argument(
        "--data", type=Path, default=None, help="also count the rows a dataset holds per task (FM_UIA layout)"
    )
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("synth", help="write the embedded synthetic benchmark in the FM_UIA layout")
    if command in (None, "synth"):
        _add_synth_arguments(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("evaluate", help="score a prediction folder with the official metrics")
    p.add_argument(
        "--gt", type=Path, required=True, help="ground-truth root (FM_UIA layout, with csv_files/)"
    )
    p.add_argument("--pred", type=Path, required=True, help="prediction folder in the submission format")
    p.add_argument("--out", type=Path, default=None, help="where the tables go (default: PRED/evaluation)")
    p.add_argument(
        "--official-skip",
        action="store_true",
        help="skip missing predictions as the official scorer does (default: count them as failures)",
    )
    _add_data_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict",
        help="write a trained run's submission folder (masks, classification/detection/regression JSON)",
    )
    p.add_argument("run", type=Path, help="a `taskgroup train` run folder")
    p.add_argument(
        "--data", type=Path, default=None, help="FM_UIA root to predict on (default: the run's own data)"
    )
    p.add_argument(
        "--split", choices=["val", "test"], default="val", help="which split's images (default: val)"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="the submission folder (must not exist, or be empty)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:1, ...")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "train", help="train every network of a grouping (ts, cg, au or a file) and evaluate every task"
    )
    p.add_argument(
        "--data", type=Path, default=None, help="FM_UIA root (default: the embedded synthetic benchmark)"
    )
    p.add_argument("--grouping", default="au", help="ts, cg, au, or a grouping YAML file (default: au)")
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help=f"run config YAML (default: {DEFAULT_CONFIG})"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. train.steps_per_task=50",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder (an interrupted run resumes from it)")
    p.add_argument(
        "--resume-with-changes",
        action="store_true",
        help="continue a run whose config differs only in learning rates (train.lr_encoder, train.lr_heads), "
        "e.g. after a divergence; the change is recorded in RUN/config_history.yaml",
    )
    _add_bad_row_options(p, "RUN/bad_rows.csv when --skip-bad")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "affinity",
        help="measure inter-task affinity (lookahead, gradient, readout, attribution, pairwise, subsets) into 27x27 matrices",
    )
    p.add_argument(
        "--data", type=Path, default=None, help="FM_UIA root (default: the embedded synthetic benchmark)"
    )
    p.add_argument(
        "--method",
        nargs="+",
        default=None,
        choices=list(AFFINITY_METHODS),
        help="estimators (default: the config's affinity.methods: lookahead, gradient, readout, attribution)",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="measure on these tasks only (default: every task with rows in --data, else all 27)",
    )
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help=f"run config YAML (default: {DEFAULT_CONFIG})"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--out", type=Path, default=Path("runs/affinity"), help="output folder (default: runs/affinity)"
    )
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna RDB storage of the trained estimators' jobs (default: sqlite file OUT/jobs.db; "
        "a postgresql:// URL for many machines)",
    )
    p.add_argument("--workers", type=int, default=1, help="local worker processes for pairwise/subsets")
    _add_worker_options(p)
    _add_bad_row_options(p, "OUT/bad_rows.csv when --skip-bad")
    p.set_defaults(func=cmd_affinity)

    p = sub.add_parser(
        "search",
        help="grouping proposals from affinity runs and/or trained groups (partition, select, optuna)",
    )
    p.add_argument("affinity", nargs="*", type=Path, help="affinity run folders (`taskgroup affinity --out`)")
    p.add_argument(
        "--groups-table",
        type=Path,
        default=None,
        help="CSV of trained groups: column 'tasks' (ids joined by '+'), optional 'cost', one score "
        "column per task (higher is better)",
    )
    p.add_argument(
        "--method",
        nargs="+",
        default=None,
        choices=["partition", "select", "optuna", "active"],
        help="search methods (default: the config's search.methods: partition, select, optuna); "
        "active: the active search on --groups-table with --oracle table",
    )
    p.add_argument("--oracle", choices=["table", "engine"], default=None, help="active: who measures a set")
    p.add_argument("--trainings", type=int, default=None, metavar="N", help="active: sets to train")
    p.add_argument("--batch", type=int, default=None, metavar="B", help="active: sets per round")
    p.add_argument(
        "--estimator", nargs="+", default=None, help="affinity methods to use (default: all found)"
    )
    p.add_argument("--budget", nargs="+", type=float, default=None, help="select: network budgets")
    p.add_argument("--max-groups", type=int, default=None, help="optuna: at most this many groups")
    p.add_argument("--storage", default=None, help="Optuna storage (default: sqlite file OUT/search.db)")
    p.add_argument(
        "--trained",
        type=int,
        default=None,
        metavar="N",
        help="also N Optuna trials that each train their partition (the run config's model, data, "
        "train; pruned by search.pruner)",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"run config YAML (default: {DEFAULT_CONFIG}; with trained trials, the first affinity "
        "run's own config.yaml: its data, model and training)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--out", type=Path, default=Path("runs/search"), help="output folder (default: runs/search)"
    )
    _add_bad_row_options(p, "none; --trained reads data")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "compare",
        help="train every network of several groupings (once) and compare every task against TS",
    )
    p.add_argument(
        "--groupings",
        nargs="+",
        default=None,
        metavar="G",
        help="ts, cg, au and/or grouping YAML files, e.g. proposals/*.yaml (default: the config's "
        "compare.groupings, ts cg au); TS is always added as the reference",
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds per network (default: compare.seeds, 3)")
    p.add_argument(
        "--data", type=Path, default=None, help="FM_UIA root (default: the embedded synthetic benchmark)"
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="compare on these tasks only (default: the grouping files', else every task with rows in --data, else all 27)",
    )
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help=f"run config YAML (default: {DEFAULT_CONFIG})"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna RDB storage of the network jobs (default: sqlite file CACHE/jobs.db; a "
        "postgresql:// URL for many machines)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="folder of trained networks shared by compare runs (default: the output folder)",
    )
    p.add_argument("--workers", type=int, default=1, help="local worker processes")
    _add_worker_options(p)
    p.add_argument(
        "--out", type=Path, default=Path("runs/compare"), help="output folder (default: runs/compare)"
    )
    _add_bad_row_options(p, "none")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("study", help="run a whole experiment from a study file (studies/NAME.yaml)")
    study_sub = p.add_subparsers(dest="study_command", required=True)
    p = study_sub.add_parser("run", help="run every stage of a study (each resumes)")
    p.add_argument("study", type=Path, help="study file, e.g. studies/grouping_search.yaml")
    p.add_argument("--setting", default="tiny", help="which of the study's settings (default: tiny)")
    p.add_argument("--data", type=Path, default=None, help="FM_UIA root (settings on real data need it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default: runs/studies/NAME-SETTING)"
    )
    _add_bad_row_options(p, "each stage's own, e.g. OUT/affinity/bad_rows.csv, when --skip-bad")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("worker", help="take queued network trainings of a study until none is left")
    p.add_argument(
        "--storage",
        default=None,
        help="the study's storage URL (sqlite:///... or postgresql://...; default: the environment "
        "variable TASKGROUP_STORAGE, which keeps a password off the command line)",
    )
    p.add_argument(
        "--study", required=True, help="study name (affinity runs use 'affinity'; compare prints its own)"
    )
    p.add_argument("--heartbeat", type=int, default=10, help="seconds between heartbeats")
    p.add_argument("--grace", type=int, default=60, help="seconds without heartbeat before a job is retaken")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of this worker")
    p.add_argument(
        "--work-root",
        type=Path,
        default=None,
        help="where this machine sees the folder the queue's paths are relative to (the creator's --work-root)",
    )
    p.set_defaults(func=cmd_worker)
    return parser


def _add_synth_arguments(p: argparse.ArgumentParser) -> None:
    from taskgroup.data.synthetic import GENERATOR_VERSION, GENERATOR_VERSIONS, SCALES

    p.add_argument("--out", type=Path, required=True, help="output folder (train/, val/, truth.yaml)")
    p.add_argument(
        "--scale", choices=sorted(SCALES), default="small", help="dataset size (tiny is for tests)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--version",
        type=int,
        choices=GENERATOR_VERSIONS,
        default=GENERATOR_VERSION,
        help="generator (3: before the label-last placement, for figures measured on it)",
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: up to 4)")
    p.add_argument("--registry", type=Path, default=None)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace train/, val/, test/ of an output folder taskgroup synth did not write",
    )


def _bad_report(args: argparse.Namespace) -> Path | None:
    if args.bad_report is not None:
        return args.bad_report
    return Path("bad_rows.csv") if args.skip_bad else None


def _bad_row_overrides(args: argparse.Namespace) -> list[str]:
    """``--skip-bad`` and ``--bad-report`` as overrides of the run config's ``data`` section."""
    extra = ["data.skip_bad=true"] if args.skip_bad else []
    if args.bad_report is not None:
        extra.append(_set("data.bad_report", str(args.bad_report.resolve())))
    return extra


def _record_dir() -> Path:
    """The record of decoded files (see ``load_index``) of a command without a run config: the
    one training keeps in the default ``data.cache_dir``, so validating a dataset once spares
    every later command and training the decoding."""
    return record_dir(DataConfig())


def cmd_tasks(args: argparse.Namespace) -> int:
    registry = load_registry(args.registry)
    counts: dict[str, dict[str, int]] = {}
    if args.data is not None:
        from taskgroup.data.fmuia import find_roots, load_index

        for split, root in find_roots(args.data).items():
            index = load_index(
                root, registry, skip_bad=args.skip_bad, report=_bad_report(args), record_dir=_record_dir()
            )
            counts[split] = index.counts()
            if index.bad_rows:
                console.print(
                    f"[yellow]{split}: {len(index.bad_rows)} bad row(s) left out, listed in {_bad_report(args)}[/]"
                )
    columns = ["task_id", "type", "classes / keypoints", "organ", "clinical group", "train (est.)", "metrics"]
    rows = [
        [
            t.id,
            t.kind.value,
            str(t.num_classes),
            t.organ,
            t.clinical_group,
            str(t.train_images),
            ", ".join(f"{m.name}{'↑' if m.higher_is_better else '↓'}" for m in t.metrics),
        ]
        + [str(c.get(t.id, 0)) for c in counts.values()]
        for t in registry
    ]
    print_table(
        f"{registry.name}: {len(registry)} tasks",
        columns + [f"{s} rows" for s in counts],
        rows,
        left=len(columns),
    )
    print_table(
        "clinical groups (CG paradigm)",
        ["group", "tasks"],
        [[g, ", ".join(ids)] for g, ids in registry.clinical_groups.items()],
        left=2,
    )
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from taskgroup.data.synthetic import generate

    registry = load_registry(args.registry)
    columns = (TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("images", total=None)
        summary = generate(
            args.out,
            registry,
            args.scale,
            args.seed,
            args.workers,
            progress=lambda done, total: progress.update(bar, completed=done, total=total),
            version=args.version,
            overwrite=args.overwrite,
        )
    total = {split: sum(c.values()) for split, c in summary.counts.items()}
    console.print(
        f"wrote {summary.images} images to {summary.out} "
        f"({', '.join(f'{s}: {n} rows' for s, n in total.items())}); truth in {summary.out / 'truth.yaml'}"
    )
    return 0


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> None:
    """A rich table: the first ``left`` columns left-aligned (names), the others right (numbers)."""
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i < left else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _fmt(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def cmd_evaluate(args: argparse.Namespace) -> int:
    import pandas as pd

    from taskgroup.data.fmuia import load_index
    from taskgroup.data.submission import read_predictions
    from taskgroup.evaluation import METRIC_COLUMNS, evaluate_predictions
    from taskgroup.metrics import LEADERBOARD_COLUMNS

    registry = load_registry(args.registry)
    index = load_index(
        args.gt, registry, skip_bad=args.skip_bad, report=_bad_report(args), record_dir=_record_dir()
    )
    predictions = read_predictions(args.pred, index)
    result = evaluate_predictions(index, predictions, official_skip=args.official_skip)
    out = args.out or args.pred / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    result.per_task.to_csv(out / "per_task.csv", index=False)
    pd.DataFrame([result.summary]).to_csv(out / "summary.csv", index=False)
    print_table(
        f"per task ({'missing skipped' if args.official_skip else 'missing = failure'})",
        ["task_id", "type", "n", "missing", *METRIC_COLUMNS],
        [
            [
                r["task_id"],
                r["type"],
                str(r["n_images"]),
                str(r["n_missing"]),
                *[_fmt(r[c]) for c in METRIC_COLUMNS],
            ]
            for r in result.per_task.to_dict("records")
        ],
        left=2,
    )
    print_table(
        "type-level summary (the 9 leaderboard columns)",
        [c for c, _, _ in LEADERBOARD_COLUMNS],
        [[_fmt(result.summary[c]) for c, _, _ in LEADERBOARD_COLUMNS]],
        left=0,
    )
    for row in result.per_task.to_dict("records"):
        if row["auc_note"]:
            console.print(f"[yellow]{row['task_id']}: {row['auc_note']}[/]")
    console.print(f"tables written to {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from taskgroup.stages.predict import predict_run

    result = predict_run(args.run, args.out, args.data, args.split, device=args.device, console=console)
    print_table(
        f"predicted on {result.split}",
        ["task", "network", "step", "images"],
        [
            [r["task"], str(r["network"]), str(r["step"]), str(result.counts[r["task"]])]
            for r in result.served.to_dict("records")
        ],
        left=2,
    )
    console.print(
        f"submission folder: {result.out} (score it: taskgroup evaluate --pred {result.out} --gt ROOT)"
    )
    return 0


def _run_config(args: argparse.Namespace, *extra: str):
    """The run config of a training command: --config, then --set, then --data, --skip-bad and
    --bad-report, then ``extra``."""
    from taskgroup.config import load_run_config

    data = [_set("data.root", str(args.data))] if args.data is not None else []
    return load_run_config(args.config, [*args.overrides, *data, *_bad_row_overrides(args), *extra])


def _check_tasks(tasks: Sequence[str] | None, registry) -> None:
    unknown = [t for t in tasks or () if t not in registry.ids]
    if unknown:
        raise TaskgroupError(f"--tasks: unknown task {unknown[0]!r} (see `taskgroup tasks`)")


def _set(key: str, value) -> str:
    """A ``--set`` override whose value is quoted (JSON is YAML): paths and URLs stay strings."""
    return f"{key}={json.dumps(value)}"


def cmd_train(args: argparse.Namespace) -> int:
    from taskgroup.groupings import BUILTIN, load_grouping
    from taskgroup.stages.train import train_grouping
    from taskgroup.training.data import data_tasks

    cfg = _run_config(args)
    registry = load_registry(cfg.registry)
    grouping = load_grouping(args.grouping, registry)
    if str(args.grouping) in BUILTIN:  # ts, cg, au on a root of some tasks: those tasks
        grouping = grouping.restrict(data_tasks(cfg.data, registry, console=console))
    result = train_grouping(
        cfg, grouping, args.out, registry, console=console, resume_with_changes=args.resume_with_changes
    )
    tested = bool(result.served["test_value"].notna().any())
    print_table(
        f"{grouping.name}: {len(result.networks)} network(s), each task served by its best on val"
        + (" (test: the held-out split at the same step)" if tested else ""),
        ["task", "type", "network", "metric", "step", "val", *(["test"] if tested else [])],
        [
            [
                r["task"],
                r["type"],
                str(r["network"]),
                r["primary_metric"],
                str(r["step"]),
                f"{r['value']:.4f}",
                *([_fmt(r["test_value"])] if tested else []),
            ]
            for r in result.served.to_dict("records")
        ],
        left=4,
    )
    console.print(f"metrics in {args.out / 'metrics.csv'}, served tasks in {args.out / 'served.csv'}")
    return 0


def cmd_affinity(args: argparse.Namespace) -> int:
    from taskgroup.affinity import run_affinity

    extra = [f"affinity.methods=[{', '.join(args.method)}]"] if args.method else []
    extra += [_set("affinity.storage", args.storage)] if args.storage else []
    cfg = _run_config(args, *extra)
    registry = load_registry(cfg.registry)
    _check_tasks(args.tasks, registry)
    result = run_affinity(
        cfg,
        args.out,
        args.tasks,
        registry,
        workers=args.workers,
        console=console,
        devices=parse_devices(args.devices),
        work_root=args.work_root,
    )
    for method, folder in result.folders.items():
        console.print(f"{method}: {folder}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from taskgroup.config import load_run_config
    from taskgroup.stages.search import run_search

    extra = [f"search.methods=[{', '.join(args.method)}]"] if args.method else []
    extra += [f"search.estimators=[{', '.join(args.estimator)}]"] if args.estimator else []
    extra += [f"search.budgets=[{', '.join(map(str, args.budget))}]"] if args.budget else []
    extra += [f"search.max_groups={args.max_groups}"] if args.max_groups else []
    extra += [_set("search.storage", args.storage)] if args.storage else []
    extra += [f"search.trained_trials={args.trained}"] if args.trained else []
    extra += [f"search.oracle={args.oracle}"] if args.oracle else []
    extra += [f"search.trainings={args.trainings}"] if args.trainings else []
    extra += [f"search.batch={args.batch}"] if args.batch else []
    overrides = [*args.overrides, *_bad_row_overrides(args), *extra]
    cfg = load_run_config(args.config or DEFAULT_CONFIG, overrides)
    own = [a / "config.yaml" for a in args.affinity if (a / "config.yaml").is_file()][:1]
    if args.config is None and cfg.search.trained_trials > 0 and own:
        # the trained trials train on what the affinity was measured on, not on the default
        cfg = load_run_config(own[0], overrides)
        console.print(f"trained trials: the config of {own[0]}", highlight=False, soft_wrap=True)
    registry = load_registry(cfg.registry)
    if "active" in cfg.search.methods:
        from taskgroup.stages.active import run_active

        outcome = run_active(
            cfg.search, registry, args.out, args.groups_table, args.affinity, console=console
        )
        console.print(
            f"proposals in {outcome.out / 'proposals'}, predictions in {outcome.out / 'predicted.csv'}"
        )
        rest = tuple(m for m in cfg.search.methods if m != "active")
        if not rest:
            return 0
        cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, methods=rest))
    result = run_search(
        cfg.search, registry, args.out, args.affinity, args.groups_table, console=console, run_cfg=cfg
    )
    console.print(f"proposals in {result.out / 'proposals'}, ranking in {result.out / 'ranking.csv'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from taskgroup.compare import run_compare

    extra = [_set("compare.groupings", [str(g) for g in args.groupings])] if args.groupings else []
    extra += [_set("compare.seeds", args.seeds)] if args.seeds else []
    extra += [_set("compare.storage", args.storage)] if args.storage else []
    extra += [_set("compare.cache", str(args.cache))] if args.cache else []
    cfg = _run_config(args, *extra)
    registry = load_registry(cfg.registry)
    _check_tasks(args.tasks, registry)
    result = run_compare(
        cfg,
        args.out,
        registry,
        args.tasks,
        workers=args.workers,
        console=console,
        devices=parse_devices(args.devices),
        work_root=args.work_root,
    )
    console.print(
        f"report in {result.out / 'report.md'} ({len(result.jobs)} networks, {result.trained_here} trained here)"
    )
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from taskgroup.stages.study import run_study

    overrides = (*args.overrides, *_bad_row_overrides(args))
    run_study(args.study, args.setting, args.out, args.data, overrides, console=console)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import os

    import optuna

    from taskgroup.runtime import configure_cpu
    from taskgroup.training.jobs import STORAGE_ENV, Worker, storage_for

    url = args.storage or os.environ.get(STORAGE_ENV)
    if not url:
        raise TaskgroupError(
            f"worker: give the study's storage: --storage URL, or the variable {STORAGE_ENV}"
        )
    configure_cpu(args.threads)
    storage = storage_for(url, args.heartbeat, args.grace, create=False)
    try:
        study = optuna.load_study(study_name=args.study, storage=storage)
    except KeyError:
        names = sorted(s.study_name for s in storage.get_all_studies())
        raise TaskgroupError(
            f"no study {args.study!r} in {hide_password(url)} (it holds: {', '.join(names) or 'none'})"
        ) from None
    finished = Worker(study, work_root=args.work_root).run()
    console.print(f"worker done: {finished} job(s) trained here")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    words = [a for a in argv if not a.startswith("-")]
    args = build_parser(words[0] if words else "").parse_args(argv)
    try:
        return int(args.func(args))
    except TaskgroupError as exc:
        from taskgroup.data.fmuia import shown_path

        # a storage URL's password is never shown; a path that is not valid UTF-8 shows its bytes
        message = escape(shown_path(hide_password(str(exc))))
        console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        return 2


def run() -> None:
    sys.exit(main())
