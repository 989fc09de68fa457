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
from taskgroup.training.engine import Engine, TrainingDiverged
from taskgroup.training.run import train_grouping

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
