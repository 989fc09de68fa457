"""Reliability of the command line (issue 25): ``taskgroup synth`` deletes only folders it wrote;
a storage URL's password is never shown or stored and never on a worker's command line; a plain
``postgresql://`` URL opens the installed driver; bad config values, groups tables and storages
are clear errors (exit 2) naming what is wrong; every command that reads data takes
``--skip-bad`` and ``--bad-report``. All fast: nothing here trains or generates the full set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
import pytest
import yaml
from sqlalchemy.engine import make_url

from taskgroup import cli
from taskgroup.cli import main
from taskgroup.config import DataConfig, hide_password, load_run_config, storage_url, to_mapping
from taskgroup.data.synthetic import SYNTH_MARKER, generate
from taskgroup.errors import ConfigError
from taskgroup.training import jobs
from taskgroup.training.data import generate_once
from taskgroup.training.jobs import STORAGE_ENV, create_queue, spawn_worker, sqlite_url, storage_for

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SECRET = "s3cret-pw"
#: a PostgreSQL URL with a password, on a port nothing listens on: connecting fails at once
UNREACHABLE = f"postgresql://alice:{SECRET}@127.0.0.1:1/queue"
#: what a command needs to stop before training: no synthetic encoder, no cache at home
NO_PRETRAIN = ["--set", "model.backbone.pretrained=null"]
SYNTH_TASKS = ["breast_lesion", "breast_2cls", "IUGC"]


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    """Exit code and everything the command printed (stdout and stderr)."""
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out + err


def _digest(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# -- 1. synth deletes only what it wrote ----------------------------------------------------------
def _real_data(root: Path) -> Path:
    for split in ("train", "val"):
        (root / split / "csv_files").mkdir(parents=True)
        (root / split / "csv_files" / "mine.csv").write_text("image_path,task_id\n")
    return root


def test_synth_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    real = _real_data(tmp_path / "real")
    code, out = _run(capsys, ["synth", "--out", str(real), "--scale", "tiny", "--workers", "1"])
    assert code == 2
    assert "not written by taskgroup synth" in out and "--overwrite" in out and "train" in out
    assert (real / "train" / "csv_files" / "mine.csv").is_file()  # nothing deleted
    assert (real / "val" / "csv_files" / "mine.csv").is_file()
    assert not (real / "truth.yaml").exists()


def test_synth_overwrite_replaces_a_folder_it_did_not_write(tmp_path, capsys, registry, monkeypatch):
    monkeypatch.setattr(cli, "load_registry", lambda path=None: registry.subset(SYNTH_TASKS))
    real = _real_data(tmp_path / "real")
    argv = ["synth", "--out", str(real), "--scale", "tiny", "--workers", "1", "--overwrite"]
    code, _ = _run(capsys, argv)
    assert code == 0
    assert not (real / "train" / "csv_files" / "mine.csv").exists()
    assert (real / "truth.yaml").is_file() and not (real / SYNTH_MARKER).exists()


def test_synth_rewrites_its_own_folders_old_caches_and_interrupted_runs(tmp_path, registry):
    sub = registry.subset(SYNTH_TASKS)
    generate(tmp_path / "fresh", sub, "tiny", seed=1, workers=1)
    fresh = _digest(tmp_path / "fresh")
    assert SYNTH_MARKER not in fresh  # the benchmark's files only (tests hash them)
    # a cache folder as synthetic_root builds it (any earlier version: it has its truth.yaml),
    # written by generator 5 (with test/), then rewritten by generator 4 in place
    cache = tmp_path / "cache" / "synthetic-v5-tiny-seed1"
    generate_once(cache, lambda tmp: generate(tmp, sub, "tiny", seed=1, workers=1, version=5))
    assert (cache / "test").is_dir()
    generate(cache, sub, "tiny", seed=1, workers=1, version=4)
    assert _digest(cache) == fresh  # byte-identical to a fresh folder: no stale test/ left
    # a run killed half-way leaves its marker and no truth.yaml: the next run takes the folder
    (cache / "truth.yaml").unlink()
    (cache / SYNTH_MARKER).write_text("generator_version: 4\n")
    generate(cache, sub, "tiny", seed=1, workers=1)
    assert _digest(cache) == fresh


# -- 2. secrets ------------------------------------------------------------------------------------
def test_hide_password_masks_urls_alone_and_in_text():
    assert hide_password(UNREACHABLE) == "postgresql://alice:***@127.0.0.1:1/queue"
    text = f'compare.storage="{UNREACHABLE}" and (postgresql+psycopg2://bob:{SECRET}@db/x).'
    masked = hide_password(text)
    assert SECRET not in masked
    assert (
        masked
        == 'compare.storage="postgresql://alice:***@127.0.0.1:1/queue" and (postgresql+psycopg2://bob:***@db/x).'
    )
    for plain in ("postgresql://postgres@127.0.0.1:5432/db", "sqlite:////tmp/a@b/jobs.db", "a:b@c", "x"):
        assert hide_password(plain) == plain


def test_hide_password_masks_a_password_with_an_at_sign_and_a_password_parameter():
    # the host starts after the last "@" of the authority (SQLAlchemy's rendering kept "ss@h")
    assert hide_password("postgresql://u:p@ss@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert hide_password("postgresql://u@h/db?sslmode=require&password=s3cr3t&x=1") == (
        "postgresql://u@h/db?sslmode=require&password=***&x=1"
    )
    assert hide_password("postgresql://u:pw@h/db, mail user@example.com") == (
        "postgresql://u:***@h/db, mail user@example.com"
    )


def test_resolved_config_masks_the_password_but_keeps_it_to_connect():
    storages = [f"{section}.storage={UNREACHABLE}" for section in ("affinity", "search", "compare")]
    cfg = load_run_config(TINY, storages)
    assert SECRET in cfg.compare.storage  # the run itself connects with the real URL
    written = yaml.safe_dump(to_mapping(cfg)) + json.dumps(to_mapping(cfg))
    assert SECRET not in written and written.count("alice:***@") == 6


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--storage", UNREACHABLE, "--groupings", "ts", "--tasks", "IUGC"],
        ["affinity", "--method", "pairwise", "--tasks", "IUGC", "FUGC", "--storage", UNREACHABLE],
    ],
    ids=["compare", "affinity"],
)
def test_runs_on_a_password_url_never_write_or_print_it(argv, tmp_path, capsys):
    out = tmp_path / "out"
    code, printed = _run(capsys, [*argv, *NO_PRETRAIN, "--out", str(out)])
    assert code == 2 and "cannot open it" in printed  # stops at the (unreachable) queue
    assert "alice:***@" in printed and SECRET not in printed
    config = (out / "config.yaml").read_text()  # written before the queue is opened
    assert "alice:***@" in config and SECRET not in config


def test_worker_error_masks_the_password(capsys):
    code, printed = _run(capsys, ["worker", "--storage", UNREACHABLE, "--study", "x"])
    assert code == 2 and "cannot open it" in printed
    assert SECRET not in printed and "alice:***@127.0.0.1:1/queue" in printed


def test_spawned_worker_gets_the_url_in_its_environment_not_its_command_line(monkeypatch):
    seen = {}

    def popen(command, env=None, **kwargs):
        seen.update(command=command, env=env)

    monkeypatch.setattr(jobs.subprocess, "Popen", popen)
    spawn_worker(UNREACHABLE, "compare-abc", 10, 60, 2)
    assert not any(SECRET in part or "postgresql" in part for part in seen["command"])
    assert seen["command"][-6:] == ["--heartbeat", "10", "--grace", "60", "--threads", "2"]
    assert seen["env"][STORAGE_ENV] == UNREACHABLE


def test_a_spawned_worker_reads_its_storage_from_the_environment(tmp_path):
    url = sqlite_url(tmp_path / "jobs.db")
    create_queue(storage_for(url, 1, 3), "empty", load_run_config(TINY), [], tmp_path / "work")
    worker = spawn_worker(url, "empty", 1, 3, 1)
    assert worker.wait(timeout=120) == 0  # an empty queue: done at once


def test_study_files_never_hold_the_password(tmp_path, capsys, monkeypatch):
    seen = _study_run(tmp_path, capsys, monkeypatch, ["--set", f"compare.storage={UNREACHABLE}"])
    assert SECRET in seen["cfg"].compare.storage  # the stage gets the real URL
    for name in ("study.yaml", "meta.json"):
        text = (tmp_path / "study" / name).read_text()
        assert "alice:***@" in text and SECRET not in text, name


# -- postgresql:// ---------------------------------------------------------------------------------
def test_a_plain_postgresql_url_names_an_installed_driver():
    url = make_url(storage_url(UNREACHABLE))
    assert url.drivername in ("postgresql+psycopg2", "postgresql+psycopg")
    url.get_dialect().import_dbapi()  # the driver it names is installed (psycopg2-binary here)
    assert url.password == SECRET and url.host == "127.0.0.1" and url.database == "queue"
    explicit = "postgresql+psycopg2://alice@h/db"
    assert storage_url(explicit) == explicit
    assert load_run_config(TINY, [f"compare.storage={UNREACHABLE}"]).compare.storage.startswith(
        url.drivername + "://"
    )


def test_a_plain_postgresql_url_opens_the_server():
    server = os.environ.get("TASKGROUP_TEST_POSTGRES")  # set by .ci/run (.ci/postgres.sh)
    if not server:
        if os.environ.get("TASKGROUP_REQUIRE_POSTGRES") == "1":
            pytest.fail("TASKGROUP_REQUIRE_POSTGRES=1 but TASKGROUP_TEST_POSTGRES is unset")
        pytest.skip("TASKGROUP_TEST_POSTGRES unset")
    plain = make_url(server).set(drivername="postgresql").render_as_string(hide_password=False)
    assert plain.startswith("postgresql://")
    storage = storage_for(plain, 1, 3)
    study = optuna.create_study(storage=storage, study_name="reliability-plain-url", load_if_exists=True)
    assert study.study_name in {s.study_name for s in storage.get_all_studies()}
    optuna.delete_study(study_name="reliability-plain-url", storage=storage)


# -- 3. config values checked when loaded -----------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.eval_every=0", "eval_every"),
        ("train.checkpoint_every=0", "checkpoint_every"),
        ("train.steps_per_task=0", "steps_per_task"),
        ("train.steps=0", "steps"),
        ("train.lr_encoder=-1e-4", "lr_encoder"),
        ("train.lr_heads=-0.001", "lr_heads"),
        ("data.batch_size=0", "batch_size"),
        ("data.image_size=0", "image_size"),
        ("compare.storage=foo://x", "storage"),
    ],
)
def test_bad_config_values_fail_at_load_naming_the_key(override, key, tmp_path, capsys):
    with pytest.raises(
        ConfigError, match=rf"tiny.yaml\.\w+: (storage '\w+://x': unknown database|{key} must)"
    ):
        load_run_config(TINY, [override])
    missing = tmp_path / "no-data-here"  # read before the config, this would be the error
    run = tmp_path / "run"
    code, out = _run(capsys, ["train", "--data", str(missing), "--set", override, "--out", str(run)])
    assert code == 2 and key in out and "no-data-here" not in out
    assert not run.exists()


# -- 4. clear errors ---------------------------------------------------------------------------------
def _groups_table(path: Path, cost: str) -> Path:
    path.write_text(
        "tasks,cost,breast_2cls,breast_3cls\n"
        f"breast_2cls+breast_3cls,{cost},0.1,0.2\nbreast_2cls,3,0.0,\nbreast_3cls,3,,0.0\n"
    )
    return path


def test_search_on_an_infeasible_budget_names_it(tmp_path, capsys):
    table = _groups_table(tmp_path / "groups.csv", "3")
    argv = ["search", "--groups-table", str(table), "--budget", "1", "--out", str(tmp_path / "s")]
    code, out = _run(capsys, argv)
    assert code == 2 and "groups.csv" in out and "budget(s) 1" in out and "Traceback" not in out


def test_search_groups_table_with_a_cost_of_zero_names_the_line(tmp_path, capsys):
    table = _groups_table(tmp_path / "groups.csv", "0")
    code, out = _run(capsys, ["search", "--groups-table", str(table), "--out", str(tmp_path / "s")])
    assert code == 2 and "groups.csv, line 2: the cost is 0" in out


@pytest.mark.parametrize("url", ["foo://", "foo", "sqlite+nodriver:///x.db"])
def test_worker_on_a_storage_no_database_reads(url, capsys):
    code, out = _run(capsys, ["worker", "--storage", url, "--study", "x"])
    assert code == 2 and "storage" in out and url.split(":")[0] in out


def test_worker_on_a_missing_sqlite_file_does_not_create_it(tmp_path, capsys):
    missing = tmp_path / "nowhere.db"
    code, out = _run(capsys, ["worker", "--storage", sqlite_url(missing), "--study", "x"])
    assert code == 2 and "no such SQLite file" in out and "nowhere.db" in out
    assert not missing.exists()
    code, out = _run(capsys, ["worker", "--study", "x"])  # no --storage and no TASKGROUP_STORAGE
    assert code == 2 and STORAGE_ENV in out


# -- 5. --skip-bad and --bad-report on every command that reads data --------------------------------
class _Stop(Exception):
    """Raised by a stand-in for a stage: the command got this far with this config."""


def _catch(monkeypatch, module, name: str, seen: dict, stop: bool = True) -> None:
    """``module.name`` replaced by a stand-in that keeps the run config it is called with and
    stops the command (``stop``) or lets it go on."""

    def stage(*args, **kwargs):
        seen["cfg"] = kwargs.get("run_cfg") or args[0]
        if stop:
            raise _Stop

    monkeypatch.setattr(module, name, stage)


def _study_run(tmp_path, capsys, monkeypatch, extra: list[str]) -> dict:
    """``taskgroup study run`` of a compare-only study, its compare stage caught."""
    import taskgroup.compare

    study = tmp_path / "one.yaml"
    study.write_text(
        yaml.safe_dump({"name": "one", "stages": ["compare"], "settings": {"tiny": {"config": str(TINY)}}})
    )
    seen: dict = {}
    _catch(monkeypatch, taskgroup.compare, "run_compare", seen, stop=False)
    assert main(["study", "run", str(study), *extra, "--out", str(tmp_path / "study")]) == 0
    return seen


@pytest.mark.parametrize("command", ["train", "affinity", "compare", "search"])
def test_training_commands_take_skip_bad_and_bad_report(command, tmp_path, monkeypatch):
    import taskgroup.affinity
    import taskgroup.compare
    import taskgroup.stages.search
    import taskgroup.stages.train

    stage = {
        "train": (taskgroup.stages.train, "train_grouping", ["--grouping", "au"]),
        "affinity": (taskgroup.affinity, "run_affinity", []),
        "compare": (taskgroup.compare, "run_compare", []),
        "search": (taskgroup.stages.search, "run_search", [str(tmp_path)]),
    }
    module, name, args = stage[command]
    seen: dict = {}
    _catch(monkeypatch, module, name, seen)
    report = tmp_path / "bad.csv"
    argv = [command, *args, "--skip-bad", "--bad-report", str(report), "--out", str(tmp_path / "o")]
    with pytest.raises(_Stop):
        main(argv)
    assert seen["cfg"].data.skip_bad and seen["cfg"].data.bad_report == str(report.resolve())


def test_study_run_takes_skip_bad_and_bad_report(tmp_path, capsys, monkeypatch):
    report = tmp_path / "bad.csv"
    seen = _study_run(tmp_path, capsys, monkeypatch, ["--skip-bad", "--bad-report", str(report)])
    assert seen["cfg"].data.skip_bad and seen["cfg"].data.bad_report == str(report.resolve())


def test_bad_report_leaves_config_hashes_as_they_were():
    assert "bad_report" not in to_mapping(DataConfig())  # unset: cached networks keep their folders
    assert to_mapping(DataConfig(bad_report="/x/bad.csv"))["bad_report"] == "/x/bad.csv"


def test_devices_must_be_gpu_indices(capsys, tmp_path):
    code, out = _run(capsys, ["affinity", "--devices", "0,,1", "--out", str(tmp_path / "a")])
    assert code == 2 and "--devices '0,,1': expected GPU indices separated by commas" in out
    assert cli.parse_devices("0, 1,3") == ("0", "1", "3") and cli.parse_devices(None) == ()


def test_search_trained_trials_default_to_the_affinity_runs_own_config(tmp_path, monkeypatch, capsys):
    import taskgroup.stages.search

    run = tmp_path / "aff"
    run.mkdir()
    own = to_mapping(load_run_config(TINY, ["data.root=/data/fmuia", "train.steps_per_task=7"]))
    (run / "config.yaml").write_text(yaml.safe_dump(own))
    seen: dict = {}
    _catch(monkeypatch, taskgroup.stages.search, "run_search", seen)
    with pytest.raises(_Stop):
        main(["search", str(run), "--trained", "2", "--out", str(tmp_path / "s")])
    cfg = seen["cfg"]
    assert cfg.data.root == "/data/fmuia" and cfg.train.steps_per_task == 7  # the run's, not tiny.yaml's
    assert cfg.search.trained_trials == 2 and "trained trials: the config of" in capsys.readouterr().out
    with pytest.raises(_Stop):  # no trained trials: the default config, as before
        main(["search", str(run), "--out", str(tmp_path / "s")])
    assert seen["cfg"].data.root is None
    with pytest.raises(_Stop):  # --config wins
        main(["search", str(run), "--trained", "2", "--config", str(TINY), "--out", str(tmp_path / "s")])
    assert seen["cfg"].data.root is None


@pytest.mark.parametrize("command", ["affinity", "compare"])
def test_devices_and_work_root_reach_the_stage(command, tmp_path, monkeypatch):
    import taskgroup.affinity
    import taskgroup.compare

    module, name = {
        "affinity": (taskgroup.affinity, "run_affinity"),
        "compare": (taskgroup.compare, "run_compare"),
    }[command]
    seen: dict = {}

    def stage(*args, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(module, name, stage)
    with pytest.raises(_Stop):
        main([command, "--devices", "0,1", "--work-root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert seen["devices"] == ("0", "1") and seen["work_root"] == tmp_path
