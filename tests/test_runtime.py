"""Run-time settings shared by every command: the thread cap and the once-only cache builds."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from taskgroup.runtime import MAX_THREADS_ENV, configure_cpu
from taskgroup.training.data import generate_once


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_thread_cap_wins_over_the_config(monkeypatch, restore_threads):
    monkeypatch.setenv(MAX_THREADS_ENV, "1")
    configure_cpu(2)
    assert torch.get_num_threads() == 1
    configure_cpu(None)  # no config value: the cap still applies
    assert torch.get_num_threads() == 1
    monkeypatch.delenv(MAX_THREADS_ENV)
    configure_cpu(2)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_thread_cap_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(MAX_THREADS_ENV, value)
    with pytest.raises(ValueError, match=MAX_THREADS_ENV):
        configure_cpu(2)


def _build(target: str, log: str) -> None:
    def make(tmp: Path) -> None:
        with open(log, "a") as f:
            f.write("built\n")
        tmp.mkdir()
        time.sleep(1.0)  # long enough for the other process to arrive while this one builds
        (tmp / "data.txt").write_text("done")

    out = generate_once(Path(target), make)
    assert (out / "data.txt").read_text() == "done"


def test_concurrent_builders_build_a_cache_folder_once(tmp_path):
    """Two processes on a fresh cache: one builds, the other waits for it and reuses its folder
    (without the lock both built it)."""
    target, log = tmp_path / "cache" / "synthetic", tmp_path / "log.txt"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_build, args=(str(target), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text().splitlines() == ["built"]
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == ["synthetic"]
