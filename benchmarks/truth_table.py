"""The exhaustive truth table: every non-empty set of a fixed subset of tasks, trained.

    python benchmarks/truth_table.py --data ROOT --out WORK [--tasks T ...] [--seeds 2]
        [--workers 2] [--storage URL] [--set k=v ...] [--write benchmarks/truth_table]

For ``--tasks`` (default :data:`TASKS`: 8 tasks, two or more planted groups, all four task
types) every one of the 2^n - 1 task sets is a network training of the job queue
(:mod:`taskgroup.training.jobs`: an Optuna study on ``--storage``, default a SQLite file in
``WORK``; ``taskgroup worker --storage URL --study truth_table`` joins from any machine that sees
``WORK``). Killed, it resumes: a finished network is never trained again, a running one resumes
from its checkpoint, so the table can be built over several runs.

When every job is done, each member's gain over its single-task network (same seed) is taken
on validation (the step chosen on validation) and on test (at that step), averaged over the
seeds, and written as two tables in the ``taskgroup search --groups-table`` format
(``WRITE/val.csv`` and ``WRITE/test.csv``: ``tasks`` joined by ``+``, one gain column per task,
``cost`` 1 per network, plus ``steps``, ``seeds`` and ``train_seconds``) with ``meta.json``
(config, data, truth, seeds). See ``benchmarks/truth_table/README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import optuna
from report import fail

from taskgroup.affinity.trained import every_set_jobs, groups_table
from taskgroup.config import load_run_config, to_mapping
from taskgroup.data.synthetic import read_truth
from taskgroup.tasks import load_registry
from taskgroup.training.jobs import (
    JOB,
    NetworkJob,
    create_queue,
    job_results,
    seconds_per_job,
    sqlite_url,
    storage_for,
    work_off,
)
from taskgroup.training.pretrain import resolve_pretrained

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"

#: two members of each planted group at least, every task type, the decoy tasks of the breast
#: clinical group and a data-poor member (FUGC)
TASKS = (
    "breast_2cls",  # cls, texture, decoy on the lines
    "breast_3cls",  # cls, lines, decoy on the blob
    "thyroid_nodule",  # seg, texture
    "fetal_head",  # seg, lines
    "breast_lesion",  # seg, blob
    "thyroid_nodule_det",  # det, blob
    "FUGC",  # reg, texture, data-poor
    "IUGC",  # reg, lines
)


#: config keys that say where things are on one machine, not what a network is: a results file
#: made elsewhere is reused when everything else matches
LOCAL_KEYS = {
    ("data", "root"),
    ("data", "cache_dir"),
    ("model", "backbone", "pretrained"),
    ("train", "threads"),
}


def portable(config: dict) -> dict:
    """A run config mapping without :data:`LOCAL_KEYS`."""

    def strip(node: object, path: tuple[str, ...]) -> object:
        if not isinstance(node, dict):
            return node
        return {k: strip(v, (*path, k)) for k, v in node.items() if (*path, k) not in LOCAL_KEYS}

    return strip(config, ())  # type: ignore[return-value]


def data_digest(root: Path) -> str:
    """sha256 of every CSV of the data (labels and paths of every split): a results file is
    reused only on the very same benchmark (the generator is deterministic, so a benchmark
    rebuilt with the same version, scale and seed matches)."""
    digest = hashlib.sha256()
    for file in sorted(root.rglob("csv_files/*.csv")):
        digest.update(file.relative_to(root).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def seed_queue(study: optuna.Study, saved: dict, cfg_mapping: dict, file: Path, digest: str) -> int:
    """Add the networks of a results file (``jobs.json``, written by an earlier build, maybe on
    another machine) to the queue as complete trials, so that they are not trained again.
    Returns how many were added; a file made with another config is an error."""
    if saved.get("data_digest") != digest:
        fail(f"{file}: made on other data than --data (its CSV files differ); use another --write")
    if portable(saved["config"]) != portable(cfg_mapping):
        fail(f"{file}: made with another config than this build's; remove it or use another --write")
    have = {t.user_attrs.get(JOB) for t in study.get_trials(deepcopy=False)}
    added = 0
    for key, attrs in saved["jobs"].items():
        if key in have:
            continue
        trial = optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, value=0.0, user_attrs={JOB: key, **attrs}
        )
        study.add_trial(trial)
        added += 1
    return added


def export(study: optuna.Study, cfg_mapping: dict, file: Path, digest: str) -> None:
    """Every complete network of the queue (its ``best`` and ``final`` scores, seconds) and the
    config, as JSON: what a later build on any machine starts from."""
    jobs = {
        t.user_attrs[JOB]: {k: t.user_attrs[k] for k in ("best", "final", "seconds") if k in t.user_attrs}
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if "best" in t.user_attrs
    }
    saved = {"config": cfg_mapping, "data_digest": digest, "jobs": dict(sorted(jobs.items()))}
    file.write_text(json.dumps(saved, indent=None))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="work folder (networks, job queue)")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--storage", default=None, help="job queue URL (default: WORK/queue.db)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--write", type=Path, default=None, help="folder for val.csv, test.csv, meta.json")
    parser.add_argument(
        "--export-only",
        action="store_true",
        help="train nothing: write jobs.json and the tables of the sets trained so far (meta.json says how many)",
    )
    args = parser.parse_args()
    registry = load_registry()
    tasks = tuple(args.tasks)
    seeds = range(args.seeds)
    jobs = every_set_jobs(tasks, seeds)
    sets = [j.tasks for j in jobs if j.seed == 0]
    overrides = [f"data.root={args.data.resolve()}", f"train.threads={args.threads}", *args.overrides]
    cfg = resolve_pretrained(load_run_config(CONFIG, overrides))
    args.out.mkdir(parents=True, exist_ok=True)
    url = args.storage or sqlite_url(args.out / "queue.db")
    storage = storage_for(url, 30, 120)
    write = args.write or args.out
    write.mkdir(parents=True, exist_ok=True)
    saved_file = write / "jobs.json"
    cfg_mapping = to_mapping(cfg)
    digest = data_digest(args.data)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name="truth_table", load_if_exists=True)
    if saved_file.exists():
        added = seed_queue(study, json.loads(saved_file.read_text()), cfg_mapping, saved_file, digest)
        print(f"{added} networks already trained, from {saved_file}")
    study = create_queue(storage, "truth_table", cfg, jobs, args.out)
    print(f"{len(jobs)} networks ({len(sets)} task sets x {len(seeds)} seeds) queued in {url}")
    if not args.export_only:
        work_off(study, url, args.workers, 30, 120, args.threads, registry)
    export(study, cfg_mapping, saved_file, digest)
    results = job_results(study, "best")
    done = [s for s in sets if all(NetworkJob(s, seed).key in results for seed in seeds)]
    # a set's gains need its members alone too: singles first, so they are done before it
    done = [s for s in done if all((t,) in done for t in s)]
    if len(done) < len(sets) and not args.export_only:
        fail(f"{len(sets) - len(done)} task sets not trained yet: run again")
    tables = {
        split: groups_table(results, done, seeds, registry, key)
        for split, key in (("val", "value"), ("test", "test_value"))
    }
    spent = seconds_per_job(study)  # one read of the queue, not one per job
    seconds = {j.key: spent.get(j.key, 0.0) for j in jobs}
    for frame in tables.values():
        frame["steps"] = [cfg.train.total_steps(len(t.split("+"))) for t in frame["tasks"]]
        frame["seeds"] = len(seeds)
        frame["train_seconds"] = [
            round(sum(seconds[NetworkJob(tuple(t.split("+")), seed).key] for seed in seeds), 1)
            for t in frame["tasks"]
        ]
    for split, frame in tables.items():
        frame.to_csv(write / f"{split}.csv", index=False, float_format="%.5f")
    truth = read_truth(args.data) if (args.data / "truth.yaml").exists() else None
    meta = {
        "tasks": list(tasks),
        "seeds": len(seeds),
        "sets": len(sets),
        "sets_trained": len(done),
        "data": str(args.data),
        "generator_version": truth.get("generator_version") if truth else None,
        "planted_groups": truth.get("planted_groups") if truth else None,
        "config": cfg_mapping,
        "overrides": args.overrides,
        "train_seconds": round(sum(seconds.values()), 1),
    }
    (write / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {write / 'val.csv'} and {write / 'test.csv'} ({len(done)} of {len(sets)} task sets)")


if __name__ == "__main__":
    main()
