"""Reliability and safety of training runs (issue 25): checkpoints that cannot run code, atomic
writes, a NaN guard that keeps a good state and a way to resume from it, run folders that belong
to one config and grouping, and one writer per run folder."""

from __future__ import annotations

import errno
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_training import TASKS, tiny_config

from taskgroup.config import to_mapping
from taskgroup.errors import ConfigError
from taskgroup.groupings import Grouping
from taskgroup.runtime import (
    CheckpointError,
    WriteError,
    atomic_write,
    load_state,
    lock_folder,
    non_finite,
    save_state,
)
from taskgroup.stages.train import train_grouping
from taskgroup.training.engine import Engine, TrainingDiverged

PAIR = ("lung", "IUGC")


class Planted:
    """What an attacker puts in place of a checkpoint: unpickling it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def plant(path: Path, marker: Path, kind: str) -> None:
    if kind == "torch.save":  # a zip checkpoint as torch writes it, the payload inside
        torch.save({"step": 4, "model": Planted(marker)}, path)
    else:  # a bare pickle
        path.write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(FileNotFoundError):  # (the plant itself ran nothing)
        marker.stat()


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_files(tmp_path: Path, cfg, groups: dict) -> tuple[Path, Path]:
    config, grouping = tmp_path / "c.yaml", tmp_path / "g.yaml"
    config.write_text(yaml.safe_dump(to_mapping(cfg)))
    grouping.write_text(yaml.safe_dump({"groups": groups}))
    return config, grouping


# -- 1. checkpoints load with weights_only=True --------------------------------------------------
@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_a_planted_checkpoint_is_refused_and_never_run(tiny_synth, tmp_path, capsys, kind):
    """A resumed run reads last.pt with weights_only=True: a file that would run code is refused
    (exit 2, a message naming it, no traceback) and its code never runs."""
    from taskgroup.cli import main

    config, grouping = cli_files(tmp_path, tiny_config(tiny_synth, steps=4), {"pair": list(PAIR)})
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--grouping", str(grouping), "--out", str(out)]
    assert main(args) == 0
    network = out / "networks" / "pair"
    (network / "done.json").unlink()  # an unfinished network: the rerun resumes from last.pt
    last, marker = network / "checkpoints" / "last.pt", tmp_path / "marker"
    plant(last, marker, kind)
    capsys.readouterr()
    assert main(args) == 2
    output = capsys.readouterr().out.replace("\n", "")
    assert str(last) in output and "refused to load" in output and "Traceback" not in output
    assert not marker.exists()


def test_a_planted_probes_file_is_refused_and_never_run(tiny_synth, registry, tmp_path):
    """The affinity probes of a finished probe training (probes.pt) are read the same way."""
    from rich.console import Console

    from taskgroup.affinity.run import run_probes

    out, marker = tmp_path / "affinity", tmp_path / "marker"
    (out / "probe_run").mkdir(parents=True)
    plant(out / "probe_run" / "probes.pt", marker, "torch.save")
    with pytest.raises(CheckpointError, match=r"probe_run/probes.pt: refused to load"):
        run_probes(tiny_config(tiny_synth), registry, list(PAIR), out, Console(quiet=True))
    assert not marker.exists()


def test_checkpoint_state_round_trips_through_weights_only(tmp_path):
    """What the engine and the probes checkpoint (numpy and python random states, numpy arrays and
    scalars, tuples, None) is written as tensors and plain containers and read back as it was."""
    import random

    from taskgroup.affinity.probes import AffinityProbe

    probe = AffinityProbe(2)
    probe.values = {"gradient": [np.arange(6.0).reshape(2, 3)]}
    probe.lr = {"gradient": [np.float64(0.5)]}
    probe.maps = np.ones((2, 1, 4), dtype=np.float32)
    state = {
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "probe": probe.state_dict(),
        "best": {"lung": {"step": 4, "value": np.float32(0.25)}},
    }
    path = save_state(state, tmp_path / "state.pt")
    torch.load(path, weights_only=True)  # loads without allowing any global
    back = load_state(path)
    expected = (np.random.random(3), random.random())
    np.random.set_state(back["rng"]["numpy"])
    random.setstate(back["rng"]["python"])
    assert (np.random.random(3) == expected[0]).all() and random.random() == expected[1]
    restored = AffinityProbe(2)
    restored.load_state_dict(back["probe"])
    np.testing.assert_array_equal(restored.values["gradient"][0], probe.values["gradient"][0])
    assert restored.lr["gradient"] == [0.5] and type(restored.lr["gradient"][0]) is np.float64
    np.testing.assert_array_equal(restored.maps, probe.maps)
    assert restored.profiles is None and back["best"] == {"lung": {"step": 4, "value": np.float32(0.25)}}


# -- 2. atomic writes ----------------------------------------------------------------------------
def test_a_write_that_fails_midway_names_the_file_and_keeps_the_previous(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"previous")

    def full_disk(file) -> None:
        file.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError, match=rf"{path}: could not be written \(No space left on device\)"):
        atomic_write(path, full_disk)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


FILE_SIZE_LIMIT = """
import resource, signal, sys
from pathlib import Path
from test_training import tiny_config
from taskgroup.runtime import WriteError
from taskgroup.tasks import load_registry
from taskgroup.training import Callback, prepare_data, train_network

class DiskFills(Callback):
    # after the step-4 checkpoint, files may grow to half its size (ulimit -f)
    def on_step_end(self, engine, output):
        if output.step == 5:
            size = engine.last_checkpoint.stat().st_size
            resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
cfg = tiny_config(Path(sys.argv[1]), steps=12, eval_every=4, checkpoint_every=4)
registry = load_registry()
tasks = ["lung", "IUGC"]
data = prepare_data(cfg.data, registry, tasks)
try:
    train_network(cfg, registry, tasks, Path(sys.argv[2]), "n", data, callbacks=[DiskFills()])
except WriteError as exc:
    print(exc)
    sys.exit(3)
"""


def test_a_checkpoint_beyond_the_file_size_limit_names_it_and_keeps_the_previous(tiny_synth, tmp_path):
    """A real failing write (``ulimit -f``, as a full disk fails): the error names last.pt and the
    reason (today: ``RuntimeError: ... unexpected pos`` and a ``last.tmp`` left), no temporary
    file remains, and last.pt still holds the step-4 checkpoint."""
    out = tmp_path / "net"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT, str(tiny_synth), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = out / "checkpoints" / "last.pt"
    assert done.returncode == 3, done.stderr[-3000:]
    assert f"{last}: could not be written (File too large)" in done.stdout
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert load_state(last)["step"] == 4


# -- 3. the NaN guard ----------------------------------------------------------------------------
def _poison(monkeypatch, at: int, quantity: str) -> None:
    """From step ``at`` on, the loss is NaN, or finite with a NaN gradient."""
    loss = Engine.loss

    def poisoned(self, task, output, batch):
        value = loss(self, task, output, batch)
        if self.step < at:
            return value
        if quantity == "loss":
            return value * float("nan")
        return value + torch.sqrt(0 * output.float().sum())  # value unchanged, d/dx = inf * 0 = nan

    monkeypatch.setattr(Engine, "loss", poisoned)


@pytest.mark.parametrize("quantity", ["loss", "gradient norm"])
def test_divergence_keeps_the_good_state_and_resumes_with_lower_learning_rates(
    tiny_synth, registry, tmp_path, monkeypatch, quantity
):
    cfg = tiny_config(tiny_synth)  # 12 steps, evaluation and checkpoints every 4
    grouping = Grouping("au", {"all": tuple(TASKS)})
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _poison(patch, 6, quantity)
        with pytest.raises(
            TrainingDiverged, match=r"--resume-with-changes --set train\.lr_encoder="
        ) as caught:
            train_grouping(cfg, grouping, out, registry)
    assert caught.value.step == 6 and caught.value.quantity == quantity
    task = caught.value.task
    state = load_state(out / "networks" / "all" / "checkpoints" / "last.pt")
    assert state["step"] == 6 and non_finite(state) == []  # the weights before the failing update
    assert f"the {quantity} of task {task} is nan at step 6" in (out / "log.txt").read_text()

    # the same run with lower learning rates: refused by default, without touching the folder...
    lower = tiny_config(tiny_synth, lr_encoder=cfg.train.lr_encoder / 10, lr_heads=cfg.train.lr_heads / 10)
    before = files_of(out)
    with pytest.raises(ConfigError, match=r"only learning rates differ.*--resume-with-changes"):
        train_grouping(lower, grouping, out, registry)
    assert files_of(out) == before
    # ...and continued from the saved step when asked for explicitly
    result = train_grouping(lower, grouping, out, registry, resume_with_changes=True)
    log = (out / "log.txt").read_text()
    assert "network all: resumed at step 6" in log and "learning rates changed at step 6" in log
    metrics = pd.read_csv(out / "metrics.csv")
    assert sorted(metrics["step"].unique()) == [4, 8, 12] and not metrics.duplicated().any()
    assert set(result.served["task"]) == set(TASKS)
    last = load_state(out / "networks" / "all" / "checkpoints" / "last.pt")
    assert last["step"] == 12 and sorted(last["scheduler"]["base_lrs"]) == sorted(
        [lower.train.lr_encoder, lower.train.lr_heads]
    )
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr_heads"] == lower.train.lr_heads
    (entry,) = yaml.safe_load((out / "config_history.yaml").read_text())
    assert entry["changes"]["train.lr_heads"] == {"from": cfg.train.lr_heads, "to": lower.train.lr_heads}
    network = json.loads((out / "networks" / "all" / "network.json").read_text())
    assert network["history"][0]["changes"].keys() == {"train.lr_encoder", "train.lr_heads"}
    # a rerun with the new config needs no flag any more; with yet another config it is refused
    train_grouping(lower, grouping, out, registry)
    with pytest.raises(ConfigError, match=r"another config \(train.steps 12 -> 16\); use another --out"):
        train_grouping(tiny_config(tiny_synth, steps=16), grouping, out, registry, resume_with_changes=True)


def test_a_state_with_a_non_finite_tensor_is_never_saved(tiny_synth, registry, tmp_path):
    from taskgroup.models import build_model
    from taskgroup.training import prepare_data

    cfg = tiny_config(tiny_synth)
    specs = [registry[t] for t in PAIR]
    data = prepare_data(cfg.data, registry, list(PAIR))
    engine = Engine(build_model(cfg.model, specs), data, specs, cfg.train, cfg.data, tmp_path, "n")
    engine.train_step()
    saved = engine.save_checkpoint().read_bytes()
    engine.train_step()
    with torch.no_grad():
        next(engine.model.parameters())[0] = float("inf")
    with pytest.raises(
        TrainingDiverged, match=r"not saving .*last.pt at step 2: 1 tensor\(s\) are not finite"
    ):
        engine.save_checkpoint()
    assert engine.last_checkpoint.read_bytes() == saved


# -- 4. a run folder belongs to one config and one grouping --------------------------------------
def test_a_run_folder_of_another_grouping_or_config_is_refused_untouched(tiny_synth, registry, tmp_path):
    cfg = tiny_config(tiny_synth, steps=4)
    out = tmp_path / "run"
    train_grouping(cfg, Grouping("pair", {"pair": PAIR}), out, registry)
    before = files_of(out)
    with pytest.raises(ConfigError, match=r"holds a run of another grouping .*use another --out"):
        train_grouping(cfg, Grouping("other", {"pair": PAIR, "lung": ("lung",)}), out, registry)
    assert files_of(out) == before
    with pytest.raises(ConfigError, match=r"holds a run trained with another config \(train.steps 4 -> 8\)"):
        train_grouping(tiny_config(tiny_synth, steps=8), Grouping("pair", {"pair": PAIR}), out, registry)
    assert files_of(out) == before


# -- 5. one writer per run folder ----------------------------------------------------------------
HOLD_LOCK = """
import sys
from taskgroup.runtime import lock_folder
with lock_folder(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_process_on_a_locked_run_folder_fails_at_once_naming_the_holder(
    tiny_synth, tmp_path, capsys
):
    from taskgroup.cli import main

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        config, grouping = cli_files(tmp_path, tiny_config(tiny_synth, steps=4), {"pair": list(PAIR)})
        start = time.perf_counter()
        code = main(["train", "--config", str(config), "--grouping", str(grouping), "--out", str(out)])
        assert code == 2 and time.perf_counter() - start < 10
        output = capsys.readouterr().out.replace("\n", "")
        assert f"{out} is being written by another taskgroup process (pid {holder.pid} on" in output
        assert socket.gethostname() in output
        assert sorted(p.name for p in out.iterdir()) == [".taskgroup.lock", ".taskgroup.lock.json"]
    finally:
        holder.communicate("", timeout=30)
    with lock_folder(out):  # freed with its holder
        pass


# -- 6. review of the reliability commit: recoveries that must work -------------------------------
def bad_row_copy(synth: Path, out: Path, task: str = "lung") -> Path:
    """The synthetic benchmark ``synth`` with one bad training row of ``task`` (a segmentation
    task: its mask path emptied); images and the other splits are symlinks."""
    out.mkdir(parents=True)
    for split in synth.iterdir():
        if split.name != "train":
            os.symlink(split, out / split.name)
    train = out / "train"
    (train / "csv_files").mkdir(parents=True)
    for item in (synth / "train").iterdir():
        if item.name != "csv_files":
            os.symlink(item, train / item.name)
    edited = False
    for csv in sorted((synth / "train" / "csv_files").glob("*.csv")):
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
        rows = frame.index[frame["task_id"] == task]
        if not edited and len(rows):
            frame.loc[rows[0], "mask_path"] = ""
            edited = True
        frame.to_csv(train / "csv_files" / csv.name, index=False)
    assert edited
    return out


def test_a_run_refused_for_bad_rows_goes_on_with_skip_bad_and_other_threads(tiny_synth, tmp_path, capsys):
    """The documented recovery works: the run refused for a bad row leaves no config behind, the
    same command with --skip-bad trains; then other threads, another --bad-report and another
    affinity section (which training never reads) are accepted, and nothing is retrained."""
    from taskgroup.cli import main

    data = bad_row_copy(tiny_synth, tmp_path / "data")
    config, grouping = cli_files(tmp_path, tiny_config(data, steps=4), {"pair": list(PAIR)})
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--grouping", str(grouping), "--out", str(out)]
    assert main(args) == 2
    assert "--skip-bad" in capsys.readouterr().out.replace("\n", "")
    assert not (out / "config.yaml").exists()
    assert main([*args, "--skip-bad"]) == 0, capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["skip_bad"] is True and (out / "bad_rows.csv").exists()
    done = (out / "networks" / "pair" / "done.json").read_bytes()
    others = [
        "--set",
        "train.threads=2",
        "--set",
        "affinity.runs=3",
        "--bad-report",
        str(tmp_path / "b.csv"),
    ]
    assert main([*args, "--skip-bad", *others]) == 0, capsys.readouterr().out
    assert (out / "networks" / "pair" / "done.json").read_bytes() == done  # reused, not retrained
    assert yaml.safe_load((out / "config.yaml").read_text()) == saved  # the folder's config stays
    # what the networks depend on is still compared
    assert main([*args, "--skip-bad", "--set", "train.steps=8"]) == 2
    assert "another config (train.steps 4 -> 8)" in capsys.readouterr().out.replace("\n", "")


def test_skip_bad_changes_no_network_hash_and_default_hashes_stay():
    """``data.skip_bad`` is no part of what a network depends on (on clean data it changes
    nothing): toggling it keeps the hash, and the hashes of the default configs are those of
    every cached network folder (the values before skip_bad was dropped from the hash)."""
    import dataclasses

    from taskgroup.config import load_run_config
    from taskgroup.training.run import network_hash

    default = load_run_config(None, ["data.image_size=224"])
    tiny = load_run_config(Path(__file__).parents[1] / "configs" / "tiny.yaml")
    expected = {"default": "d9e295936071", "tiny": "9d713bd9e7df"}
    for name, cfg in {"default": default, "tiny": tiny}.items():
        skipping = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, skip_bad=True))
        assert network_hash(cfg, PAIR) == network_hash(skipping, PAIR) == expected[name], name


def test_resume_with_changes_leaves_finished_networks_records_alone(
    tiny_synth, registry, tmp_path, monkeypatch
):
    """Of two networks, one finished and one diverged: resuming with lower learning rates continues
    the diverged one (its network.json takes the new config) and leaves the finished one's
    network.json as it was (trained with the old rates); the change it is reused under is in its
    reused.json, and the run's history names it."""
    cfg = tiny_config(tiny_synth, steps=8)
    grouping = Grouping("two", {"first": ("IUGC",), "second": ("lung",)})
    out = tmp_path / "run"
    loss = Engine.loss

    def poisoned(self, task, output, batch):
        value = loss(self, task, output, batch)
        return value * float("nan") if self.name == "second" and self.step >= 5 else value

    with monkeypatch.context() as patch:
        patch.setattr(Engine, "loss", poisoned)
        with pytest.raises(TrainingDiverged):
            train_grouping(cfg, grouping, out, registry)
    first = out / "networks" / "first"
    assert (first / "done.json").exists() and not (out / "networks" / "second" / "done.json").exists()
    record = (first / "network.json").read_bytes()
    lower = tiny_config(
        tiny_synth, steps=8, lr_encoder=cfg.train.lr_encoder / 10, lr_heads=cfg.train.lr_heads / 10
    )
    train_grouping(lower, grouping, out, registry, resume_with_changes=True)
    assert (first / "network.json").read_bytes() == record  # still the config it was trained with
    (reused,) = json.loads((first / "reused.json").read_text())
    assert reused["changes"].keys() == {"train.lr_encoder", "train.lr_heads"}
    assert reused["trained_with"] == json.loads(record)["hash"]
    second = json.loads((out / "networks" / "second" / "network.json").read_text())
    assert second["config"]["train"]["lr_heads"] == lower.train.lr_heads and len(second["history"]) == 1
    (entry,) = yaml.safe_load((out / "config_history.yaml").read_text())
    assert entry["finished_before"] == ["first"]
    train_grouping(lower, grouping, out, registry)  # the new config needs no flag any more
    other_threads = tiny_config(
        tiny_synth, steps=8, lr_encoder=lower.train.lr_encoder, lr_heads=lower.train.lr_heads, threads=2
    )
    train_grouping(other_threads, grouping, out, registry)  # nor with other threads
    assert (first / "network.json").read_bytes() == record
    assert len(json.loads((first / "reused.json").read_text())) == 1


def test_divergence_outside_a_run_folder_says_to_rerun_with_other_rates(
    tiny_synth, registry, tmp_path, monkeypatch
):
    """A network trained outside ``taskgroup train`` (affinity probes, workers, the pretext run)
    lives in a folder named by a hash of its config: the message says new rates train anew, and
    offers no --resume-with-changes to a command that has none."""
    from taskgroup.training import prepare_data, train_network

    cfg = tiny_config(tiny_synth)
    data = prepare_data(cfg.data, registry, list(PAIR))
    _poison(monkeypatch, 6, "loss")
    with pytest.raises(TrainingDiverged) as caught:
        train_network(cfg, registry, PAIR, tmp_path / "net", "n", data)
    message = str(caught.value)
    assert "run the same command again with --set train.lr_encoder=" in message
    assert "train a new network from the start" in message
    assert "run the same command again with --resume-with-changes" not in message


def test_a_network_folder_is_locked_while_trained(tiny_synth, registry, tmp_path):
    """Two workers never train one network folder: the second is refused at once, naming the
    holder; remove_temporaries leaves a live process's temporary file alone."""
    from taskgroup.runtime import FolderLocked, remove_temporaries
    from taskgroup.training import prepare_data, train_network

    cfg = tiny_config(tiny_synth, steps=4)
    data = prepare_data(cfg.data, registry, list(PAIR))
    folder = tmp_path / "work" / "networks" / "pair-abc"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        live, dead = folder / f".last.pt.{holder.pid}.tmp", folder / f".last.pt.{gone.stdout.strip()}.tmp"
        live.write_bytes(b"being written")
        dead.write_bytes(b"left by a kill")
        with pytest.raises(FolderLocked, match=rf"pid {holder.pid} on"):
            train_network(cfg, registry, PAIR, folder, "pair", data)
        assert not (folder / "network.json").exists()
        remove_temporaries(folder)
        assert live.exists() and not dead.exists()
    finally:
        holder.communicate("", timeout=30)
    live.unlink()
    train_network(cfg, registry, PAIR, folder, "pair", data)  # freed with its holder
    assert (folder / "done.json").exists()


def test_a_file_system_without_flock_is_a_clear_error_not_a_soft_lock(tmp_path, monkeypatch):
    """No soft-lock fallback (a kill -9 would leave its marker, and every later run would be
    refused): a file system without flock is an error naming the folder."""
    import errno as errnos

    import filelock._native._unix as unix_lock

    from taskgroup.runtime import LockUnavailable

    def no_flock(fd):
        raise OSError(errnos.ENOSYS, os.strerror(errnos.ENOSYS))

    monkeypatch.setattr(unix_lock, "lock_fd_nonblocking", no_flock)
    folder = tmp_path / "run"
    with (
        pytest.raises(LockUnavailable, match=rf"{folder}: cannot be locked \(Function not implemented\)"),
        lock_folder(folder),
    ):
        pass
    assert not (folder / ".taskgroup.lock.json").exists()
    monkeypatch.undo()
    with lock_folder(folder):  # nothing left behind that locks the folder
        pass


def _old_style(path: Path, state) -> None:
    """What taskgroup wrote before checkpoints were encoded: numpy values pickled as such."""
    torch.save(state, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_a_checkpoint_of_the_older_format_is_read_and_rewritten(tmp_path):
    """numpy arrays and scalars pickled as numpy pickles them (random states, probe values) are
    allowed through numpy's own constructors only; the file is rewritten in the new form."""
    import random

    state = {
        "step": 4,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "best": {"lung": {"step": 4, "value": np.float64(0.25), "n": np.int64(3)}},
        "values": [
            np.arange(6.0).reshape(2, 3),
            np.ones((2, 1, 4), dtype=np.float32),
            np.zeros(2, dtype=bool),
        ],
    }
    path = tmp_path / "last.pt"
    _old_style(path, state)
    back = load_state(path)
    assert back["rng"]["numpy"][0] == "MT19937" and back["rng"]["python"] == state["rng"]["python"]
    np.testing.assert_array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert back["best"] == state["best"] and type(back["best"]["lung"]["value"]) is np.float64
    for a, b in zip(back["values"], state["values"], strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    torch.load(path, weights_only=True)  # rewritten: loads without allowing any global
    assert load_state(path)["best"] == state["best"]


def test_an_older_checkpoint_with_anything_beyond_numpy_is_still_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "last.pt"
    torch.save({"rng": np.random.get_state(), "model": Planted(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_state(path)
    assert not marker.exists()
    # an array of python objects is no checkpoint of taskgroup's either
    torch.save({"values": np.array([1, "a"], dtype=object)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_state(path)


def test_a_run_resumes_from_a_checkpoint_of_the_older_format(tiny_synth, registry, tmp_path, caplog):
    import logging

    from test_training import Crash

    from taskgroup.training import prepare_data, train_network

    cfg = tiny_config(tiny_synth, steps=8)
    data = prepare_data(cfg.data, registry, list(PAIR))
    out = tmp_path / "net"
    with pytest.raises(KeyboardInterrupt):
        train_network(cfg, registry, PAIR, out, "n", data, callbacks=[Crash(6)])
    last = out / "checkpoints" / "last.pt"
    _old_style(last, load_state(last))  # as the older taskgroup wrote it
    with caplog.at_level(logging.INFO, logger="taskgroup"):
        train_network(cfg, registry, PAIR, out, "n", data)
    assert "network n: resumed at step 4" in caplog.text
    assert load_state(last)["step"] == 8 and (out / "done.json").exists()


def test_every_mapping_and_sequence_is_saved_as_a_loadable_plain_one(tmp_path):
    import collections
    import types

    class Ordered(collections.OrderedDict):
        pass

    point = collections.namedtuple("Point", "x y")
    state = {
        "default": collections.defaultdict(list, a=[1, 2]),
        "counter": collections.Counter("aab"),
        "ordered": Ordered(b=np.float32(1.0)),
        "proxy": types.MappingProxyType({"c": 3}),
        "point": point(1, np.int64(2)),
        "model": torch.nn.Linear(2, 1).state_dict(),
    }
    back = load_state(save_state(state, tmp_path / "s.pt"))
    assert back["default"] == {"a": [1, 2]} and back["counter"] == {"a": 2, "b": 1}
    assert back["ordered"] == {"b": np.float32(1.0)} and back["proxy"] == {"c": 3}
    assert back["point"] == (1, 2) and type(back["point"]) is tuple
    assert type(back["model"]) is collections.OrderedDict and hasattr(back["model"], "_metadata")


def test_best_weights_are_never_saved_non_finite(tiny_synth, registry, tmp_path, monkeypatch):
    from taskgroup.models import build_model
    from taskgroup.training import prepare_data
    from taskgroup.training.callbacks import EvaluationCallback

    cfg = tiny_config(tiny_synth)
    specs = [registry[t] for t in PAIR]
    data = prepare_data(cfg.data, registry, list(PAIR))
    evaluation = EvaluationCallback(4)
    engine = Engine(
        build_model(cfg.model, specs), data, specs, cfg.train, cfg.data, tmp_path, "n", [evaluation]
    )
    scores = engine.evaluate()
    monkeypatch.setattr(engine, "evaluate", lambda split="val": scores)
    evaluation.on_train_start(engine)
    with torch.no_grad():
        next(engine.model.parameters())[0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"not saving .*best/step_4.pt at step 4: 1 tensor"):
        evaluation.evaluate(engine, 4)
    assert list(evaluation.best_dir(engine).iterdir()) == [] and evaluation.best == {}


DIVERGING_RANK = """
import os, sys, time
from pathlib import Path
import torch
from taskgroup import runtime
from taskgroup.cli import main
from taskgroup.training import engine

rank, what = int(os.environ["RANK"]), sys.argv[1]
loss = engine.Engine.loss

def poisoned(self, task, output, batch):  # the loss of rank 1's shard only
    value = loss(self, task, output, batch)
    return value * float("nan") if rank == 1 and self.step >= 6 else value

def full_disk(state, path):
    raise runtime.WriteError(f"{path}: could not be written (No space left on device)")

if what == "loss":
    engine.Engine.loss = poisoned
else:
    engine.save_state = full_disk
code = main(sys.argv[2:])
Path(sys.argv[-1], f"rank{rank}").write_text(str(code))
other = Path(sys.argv[-1], f"rank{1 - rank}")
for _ in range(600):  # before exiting (the launcher then stops the other): the other's end
    if other.exists():
        break
    time.sleep(0.1)
sys.exit(code)
"""


@pytest.mark.slow
@pytest.mark.parametrize("what", ["loss", "write"])
def test_under_two_processes_a_failure_on_one_rank_stops_both(tiny_synth, tmp_path, what):
    """A loss that is not finite on rank 1's shard only, or a checkpoint rank 0 cannot write:
    both ranks end (exit 2, each its message), none waits for the other at a collective."""
    cfg = tiny_config(tiny_synth, steps=12, eval_every=4, checkpoint_every=4)
    config, grouping = cli_files(tmp_path, cfg, {"net": list(PAIR)})
    script = tmp_path / "script.py"
    script.write_text(DIVERGING_RANK)
    out = tmp_path / "run"
    out.mkdir()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["train", "--config", str(config), "--grouping", str(grouping), "--out", str(out)]
    path = os.pathsep.join([str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": path}
    done = subprocess.run(
        [*launcher, str(script), what, *args], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode != 0
    assert (out / "rank0").read_text() == "2" and (out / "rank1").read_text() == "2", done.stderr[-3000:]
    if what == "loss":
        assert "is not finite on another rank at step 6" in done.stdout.replace("\n", "")
        assert load_state(out / "networks" / "net" / "checkpoints" / "last.pt")["step"] == 6
    else:
        assert "rank 0 could not write" in done.stdout.replace("\n", "")
