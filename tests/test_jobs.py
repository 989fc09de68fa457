"""The job queue's workers (taskgroup/training/jobs.py): a job whose network folder another
process still holds is queued again and trained later, not the end of the worker."""

from __future__ import annotations

import os
import threading

import optuna
import pytest
from test_training import tiny_config

from taskgroup.runtime import lock_folder
from taskgroup.training.jobs import NetworkJob, Worker, create_queue, sqlite_url, storage_for


def test_a_job_whose_network_folder_is_locked_is_queued_again_and_trained_later(
    tiny_synth, registry, tmp_path, caplog
):
    """As when a stalled worker (its heartbeat stale, its job queued again) still trains the
    network: the lock of the folder is held here, and freed after a while."""
    cfg = tiny_config(tiny_synth, steps=4, eval_every=4, checkpoint_every=4)
    job = NetworkJob(("IUGC",))
    study = create_queue(storage_for(sqlite_url(tmp_path / "jobs.db"), 1, 3), "q", cfg, [job], tmp_path)
    worker = Worker(study, registry, locked_wait=(0.2, 0.4))
    held, free = threading.Event(), threading.Event()

    def stalled() -> None:  # another holder of the folder (flock locks of two open files conflict)
        with lock_folder(worker.network_dir(job)):
            held.set()
            free.wait(30)

    holder = threading.Thread(target=stalled)
    holder.start()
    assert held.wait(30)
    threading.Timer(1.5, free.set).start()
    try:
        assert worker.run(poll=0.1) == 1  # no FolderLocked out of the worker
    finally:
        free.set()
        holder.join()
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 1 and states[-1].name == "COMPLETE"
    refused = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert refused and all(
        "being written by another taskgroup process" in t.user_attrs["folder_locked"] for t in refused
    )
    assert len(refused) <= 6  # a wait between attempts (0.2 s, doubling to 0.4 s), not a busy loop
    assert "queued again" in caplog.text


def test_a_job_taken_by_a_worker_that_died_before_its_first_heartbeat_is_trained(
    tiny_synth, registry, tmp_path, caplog
):
    """A worker killed between taking a trial (``study.ask``) and its first heartbeat leaves a
    running trial with no heartbeat, which Optuna never fails as stale: the other workers waited
    for it for ever (a CI run hung on it). Here the dead worker's ``ask`` is made by hand; the
    worker fails that trial after the grace period, queues its job again and trains both jobs."""
    cfg = tiny_config(tiny_synth, steps=4, eval_every=4, checkpoint_every=4)
    jobs = [NetworkJob(("IUGC",)), NetworkJob(("FUGC",))]
    study = create_queue(storage_for(sqlite_url(tmp_path / "jobs.db"), 1, 2), "q", cfg, jobs, tmp_path)
    orphan = study.ask()  # taken, RUNNING, never a heartbeat: its worker died at once
    assert orphan.user_attrs["job"] == jobs[0].key
    worker = Worker(study, registry)
    finished: list[int] = []
    thread = threading.Thread(target=lambda: finished.append(worker.run(poll=0.1)), daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the worker still waits for the trial its dead peer took"
    assert finished == [2]
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[orphan.number] == optuna.trial.TrialState.FAIL
    complete = [t.user_attrs["job"] for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    assert sorted(complete) == sorted(job.key for job in jobs)
    assert "never began it" in caplog.text


def test_with_devices_each_local_worker_sees_only_its_gpu_and_this_process_trains_none(
    tiny_synth, tmp_path, monkeypatch
):
    from taskgroup.training import jobs

    cfg = tiny_config(tiny_synth, steps=4, eval_every=4, checkpoint_every=4)
    url = sqlite_url(tmp_path / "jobs.db")
    study = create_queue(storage_for(url, 1, 3), "q", cfg, [NetworkJob(("IUGC",))], tmp_path)
    started: list[dict] = []

    class Process:  # a worker process that exits at once
        def __init__(self, command, env):
            started.append({"command": command, "env": env})

        def wait(self):
            return 0

        def poll(self):
            return 0

    def no_training(self, poll=1.0):
        raise AssertionError("this process trained a job: it may hold a CUDA context on GPU 0")

    monkeypatch.setattr(jobs.subprocess, "Popen", Process)
    monkeypatch.setattr(jobs.Worker, "run", no_training)
    assert jobs.work_off(study, url, 3, 1, 3, 1, devices=("0", "1")) == 0
    # three workers asked on two GPUs: round robin, each process its own CUDA_VISIBLE_DEVICES
    assert [p["env"]["CUDA_VISIBLE_DEVICES"] for p in started] == ["0", "1", "0"]
    assert all(p["env"][jobs.STORAGE_ENV] == url and url not in p["command"] for p in started)
    started.clear()
    monkeypatch.setattr(jobs.Worker, "run", lambda self, poll=1.0: 0)
    jobs.work_off(study, url, 2, 1, 3, 1)  # no devices: this process and one helper, as before
    assert len(started) == 1  # and its GPUs are this process's
    assert started[0]["env"].get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")


def test_affinity_queues_are_named_by_their_networks_config(tiny_synth, tmp_path):
    import dataclasses

    from taskgroup.affinity.run import STUDY, queue_name

    cfg = tiny_config(tiny_synth, steps=4, eval_every=4, checkpoint_every=4)
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr_encoder=1e-3))
    storage = storage_for(sqlite_url(tmp_path / "jobs.db"), 1, 3)
    first = queue_name(storage, cfg)
    assert first.startswith(f"{STUDY}-") and first == queue_name(storage, cfg)
    assert queue_name(storage, other) != first  # another config: its own queue, its own folder
    # an older taskgroup's queue: its config written before affinity.min_probes / trained_steps
    old = create_queue(storage, STUDY, cfg, [NetworkJob(("IUGC",))], tmp_path)
    written = old.user_attrs["config"]
    written["affinity"] = {
        k: v for k, v in written["affinity"].items() if k not in ("min_probes", "trained_steps")
    }
    old.set_user_attr("config", written)
    assert queue_name(storage, cfg) == STUDY  # resumed where it is
    assert queue_name(storage, other) != STUDY  # never another config's


def test_a_queue_with_a_work_root_is_worked_from_another_mount_of_it(tiny_synth, registry, tmp_path):
    """Paths under the creator's --work-root are stored relative to it: a worker given its own
    mount of the folder (here the folder renamed) trains from there, and every mount computes
    the same network folder names and accepts the folders another one wrote."""
    import dataclasses

    from taskgroup import workroot
    from taskgroup.errors import ConfigError
    from taskgroup.training.data import prepare_data
    from taskgroup.training.run import train_network

    first = tmp_path / "machine_a"
    first.mkdir()
    os.symlink(tiny_synth, first / "data")
    cfg = tiny_config(first / "data", steps=4, eval_every=4, checkpoint_every=4)
    job = NetworkJob(("IUGC",))
    url = sqlite_url(tmp_path / "jobs.db")
    study = create_queue(storage_for(url, 1, 3), "q", cfg, [job], first / "jobs", work_root=first)
    assert study.user_attrs["config"]["data"]["root"] == f"{workroot.MARK}/data"
    assert study.user_attrs["work_dir"] == f"{workroot.MARK}/jobs"
    name_on_a = Worker(study, registry, work_root=first).network_dir(job).name
    with pytest.raises(ConfigError, match=r"relative to a work root .* give the worker --work-root DIR"):
        Worker(study, registry)
    second = tmp_path / "machine_b"
    first.rename(second)  # the same files, seen at another path
    worker = Worker(study, registry, work_root=second)
    assert worker.cfg.data.root == str(second / "data") and worker.work_dir == second / "jobs"
    folder = worker.network_dir(job)
    assert folder.name == name_on_a and folder.parent == second / "jobs" / "networks"
    assert worker.run(poll=0.1) == 1
    (trial,) = study.get_trials(deepcopy=False)
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs["network_dir"] == str(folder)
    third = tmp_path / "machine_c"
    second.rename(third)
    again = Worker(study, registry, work_root=third)
    moved = again.network_dir(job)
    assert moved.name == folder.name and (moved / "done.json").exists()
    data = prepare_data(again.cfg.data, registry, ["IUGC"])
    with workroot.active(third):  # the folder written from machine b is this network's here
        result = train_network(dataclasses.replace(again.cfg), registry, ["IUGC"], moved, job.key, data)
    assert result.best == trial.user_attrs["best"]
    with pytest.raises(ConfigError, match="another config"):  # without the work root it is not
        train_network(again.cfg, registry, ["IUGC"], moved, job.key, data)


def test_failed_gpu_workers_and_a_pinned_device_are_errors(tiny_synth, tmp_path, monkeypatch):
    import dataclasses

    from taskgroup.errors import ConfigError, TaskgroupError
    from taskgroup.training import jobs

    cfg = tiny_config(tiny_synth, steps=4, eval_every=4, checkpoint_every=4)
    url = sqlite_url(tmp_path / "jobs.db")
    study = create_queue(storage_for(url, 1, 3), "q", cfg, [NetworkJob(("IUGC",))], tmp_path)

    class Crashing:  # a worker process that dies at once (out of memory, a bad GPU)
        def __init__(self, command, env):
            pass

        def wait(self):
            return 1

        def poll(self):
            return 1

    monkeypatch.setattr(jobs.subprocess, "Popen", Crashing)
    with pytest.raises(TaskgroupError, match=r"2 of 2 local worker process\(es\) failed .* 1 job\(s\)"):
        jobs.work_off(study, url, 1, 1, 3, 1, devices=("0", "1"))
    pinned = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cuda:1"))
    other = create_queue(storage_for(url, 1, 3), "pinned", pinned, [NetworkJob(("IUGC",))], tmp_path)
    with pytest.raises(ConfigError, match=r"train\.device must be auto or cuda, not 'cuda:1'"):
        jobs.work_off(other, url, 1, 1, 3, 1, devices=("0",))


def test_a_work_root_is_ignored_for_a_queue_of_absolute_paths(tiny_synth, registry, tmp_path):
    cfg = tiny_config(tmp_path / "data", steps=4, eval_every=4, checkpoint_every=4)
    os.symlink(tiny_synth, tmp_path / "data")
    job = NetworkJob(("IUGC",))
    study = create_queue(storage_for(sqlite_url(tmp_path / "jobs.db"), 1, 3), "q", cfg, [job], tmp_path / "w")
    creator = Worker(study, registry).network_dir(job)
    assert Worker(study, registry, work_root=tmp_path).network_dir(job) == creator  # same names


def test_paths_under_a_work_root_given_through_a_symbolic_link_are_marked(tmp_path):
    from taskgroup import workroot

    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    config = {"data": {"root": str(tmp_path / "link" / "d"), "other": str(tmp_path / "real" / "e"), "n": 3}}
    marked = workroot.mark(config, tmp_path / "link")
    assert marked == {"data": {"root": f"{workroot.MARK}/d", "other": f"{workroot.MARK}/e", "n": 3}}
    assert workroot.mark({"root": "relative/path"}, tmp_path) == {"root": "relative/path"}
    assert workroot.resolve(marked, tmp_path / "x")["data"]["root"] == str((tmp_path / "x" / "d").resolve())


def test_gpu_check_parses_and_stops_cleanly_without_a_gpu(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, whatever the machine
    done = subprocess.run(
        ["bash", str(script), str(tmp_path), str(tmp_path / "w.pth")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and "no CUDA GPU here" in done.stderr
