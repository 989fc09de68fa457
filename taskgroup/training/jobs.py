"""Network trainings as jobs of an Optuna study on an RDB storage: many workers, no job lost.

Trained affinity estimators (pairwise, subsets) and ``taskgroup compare`` need many independent
network trainings. They are queued as *enqueued trials* of an Optuna study (one trial per job,
its user attribute ``job`` naming the network), on an RDB storage: a SQLite file for the
processes of one machine, a PostgreSQL URL for many machines. A worker is ``study.optimize``
whose objective trains the trial's network through the engine into the shared work folder and
returns; the network's per-task results are stored on the trial.

What makes it safe:

- a live worker records a heartbeat; a trial whose worker died (killed, preempted) is failed
  after ``grace`` seconds by the next worker that looks, and Optuna's
  ``RetryHeartbeatStaleTrialCallback`` enqueues it again with the same job, so another worker
  takes it and *resumes from the dead worker's last checkpoint* (same network folder);
- a worker killed in the moment between taking a trial (``study.ask``) and its heartbeat
  thread's first beat leaves a running trial with no heartbeat at all, which Optuna never calls
  stale: every worker would wait for it for ever (seen: a test that kills a worker as it takes
  a job hung CI). The objective marks a trial ``began`` (pid, host) as its first write, so a
  running trial that is not marked ``grace`` seconds after it started is failed and queued
  again the same way (:meth:`Worker.fail_unbegun`);
- a job already complete is never trained again: a duplicate (a job queued twice by two
  coordinators) is marked pruned with the trial that measured it, and a network folder with
  ``done.json`` is reused by :func:`taskgroup.training.run.train_network`;
- a job whose network folder another process still holds (its lock: a worker that stalled long
  enough for its trial to be failed and the job queued again, but still trains; or the same job
  queued twice and taken by two workers at once) is put back in the queue, pruned with
  ``folder_locked`` naming the holder, and taken again later: by this worker after a short wait
  (5 s, doubling up to a minute while the folder stays locked; other jobs first), or by another;
- the study holds everything a worker needs (the run config, the jobs' task sets, the work
  folder), so ``taskgroup worker --storage URL --study NAME`` joins from any machine that sees
  the same work folder.

A storage URL may hold a password: it is masked wherever it is shown or stored
(:func:`taskgroup.config.hide_password`), and local workers get it in their environment
(:data:`STORAGE_ENV`), not on their command line, which every user of the machine can read.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import optuna

from taskgroup import workroot
from taskgroup.config import RunConfig, from_mapping, hide_password, storage_url, to_mapping
from taskgroup.errors import ConfigError, TaskgroupError
from taskgroup.runtime import FolderLocked
from taskgroup.tasks import TaskRegistry, load_registry
from taskgroup.training.data import TrainingData, prepare_data
from taskgroup.training.run import final_scores, network_folder, train_network

log = logging.getLogger("taskgroup")

JOB = "job"  # the fixed parameter of every queued trial
#: the user attribute a worker's objective writes first (pid, host): its trial is under way
BEGAN = "began"
#: the environment variable ``taskgroup worker`` reads its storage URL from without ``--storage``
STORAGE_ENV = "TASKGROUP_STORAGE"


@dataclasses.dataclass(frozen=True)
class NetworkJob:
    """One network to train: its tasks and the seed (the config is the study's)."""

    tasks: tuple[str, ...]
    seed: int = 0

    @property
    def key(self) -> str:
        return "+".join(sorted(self.tasks)) + f"@{self.seed}"

    @classmethod
    def from_key(cls, key: str) -> NetworkJob:
        tasks, _, seed = key.rpartition("@")
        return cls(tuple(tasks.split("+")), int(seed))


def storage_for(url: str, heartbeat: int, grace: int, create: bool = True) -> optuna.storages.RDBStorage:
    """An RDB storage whose stale trials (no heartbeat for ``grace`` s) are queued again.

    ``create=False`` (a worker joining a queue): a SQLite file that does not exist is an error
    instead of a new empty database. A URL SQLAlchemy cannot read, a missing driver or a server
    that refuses the connection is a :class:`ConfigError` naming the URL (password masked)."""
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    try:
        url = storage_url(url)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    shown = hide_password(url)
    parsed = make_url(url)
    sqlite = parsed.get_backend_name() == "sqlite"
    on_disk = sqlite and parsed.database not in (None, "", ":memory:")
    if on_disk and not create and not Path(parsed.database).is_file():
        raise ConfigError(
            f"storage {shown!r}: no such SQLite file {parsed.database} (the queue's storage is "
            "made by the command that queues the jobs: affinity or compare)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat,
                grace_period=grace,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
                engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None,
            )
    except ImportError as exc:  # the URL's driver (e.g. postgresql+psycopg without psycopg)
        raise ConfigError(f"storage {shown!r}: its database driver is not installed ({exc})") from None
    except sqlalchemy.exc.SQLAlchemyError as exc:  # cannot connect, or not a database
        reason = hide_password(str(getattr(exc, "orig", None) or exc)).strip()
        raise ConfigError(f"storage {shown!r}: cannot open it: {reason}") from None


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def create_queue(
    storage: optuna.storages.BaseStorage,
    name: str,
    cfg: RunConfig,
    jobs: Sequence[NetworkJob],
    work_dir: Path,
    work_root: Path | None = None,
) -> optuna.Study:
    """Create (or join) the study ``name`` and queue every job it does not hold yet. With
    ``work_root``, the paths under it are stored relative to it (:mod:`taskgroup.workroot`):
    each worker then reads them under its own ``--work-root``."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True)
    if "config" not in study.user_attrs:
        config, folder = to_mapping(cfg), str(Path(work_dir).resolve())
        if work_root is not None:
            config, folder = workroot.mark(config, work_root), workroot.mark(folder, work_root)
        study.set_user_attr("config", config)
        study.set_user_attr("work_dir", folder)
    queued = {t.user_attrs.get(JOB) for t in study.get_trials(deepcopy=False)}
    for job in jobs:
        if job.key not in queued:
            study.enqueue_trial({}, user_attrs={JOB: job.key})
            queued.add(job.key)
    return study


class Worker:
    """Takes queued jobs of a study until none is waiting or running, training each one.

    ``locked_wait``: the seconds (first, longest) this worker waits before it takes again a job
    it put back because its network folder was locked (see the module doc)."""

    def __init__(
        self,
        study: optuna.Study,
        registry: TaskRegistry | None = None,
        locked_wait: tuple[float, float] = (5.0, 60.0),
        work_root: Path | None = None,
    ) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per job is the progress bar's
        self.study = study
        where = f"study {study.study_name}"
        stored = study.user_attrs["config"]
        rooted = workroot.is_marked(stored) or workroot.is_marked(study.user_attrs["work_dir"])
        if work_root is not None and not rooted:
            log.warning(
                "study %s stores absolute paths (it was created without --work-root): --work-root %s is not used",
                study.study_name,
                work_root,
            )
        # identities mark paths only for a queue that does (names agree with its creator's)
        self.work_root = work_root if rooted else None
        config = workroot.resolve(stored, work_root, where)
        self.cfg = from_mapping(RunConfig, config, where)
        self.work_dir = Path(workroot.resolve(study.user_attrs["work_dir"], work_root, where))
        self.registry = registry or load_registry(self.cfg.registry)
        self._data: TrainingData | None = None
        self.finished = 0  # jobs this worker trained to the end
        self.locked_wait = locked_wait
        # job key -> (when this worker takes it again, the wait after the next refusal)
        self._deferred: dict[str, tuple[float, float]] = {}

    def network_dir(self, job: NetworkJob) -> Path:
        cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, seed=job.seed))
        with workroot.active(self.work_root):  # the same folder name on every machine
            return network_folder(self.work_dir, job.key, cfg, job.tasks)

    def _training_data(self) -> TrainingData:
        if self._data is None:  # every task of the study's jobs, prepared once per worker
            jobs = [_job_of(t) for t in self.study.get_trials(deepcopy=False)]
            tasks = sorted({task for job in jobs if job for task in job.tasks})
            self._data = prepare_data(self.cfg.data, self.registry, tasks)
        return self._data

    def objective(self, trial: optuna.Trial) -> float:
        queued = trial.user_attrs.get(JOB)
        if queued is None:  # asked when the queue was already empty: nothing to do
            raise optuna.TrialPruned("no queued job left")
        trial.set_user_attr(BEGAN, {"pid": os.getpid(), "host": socket.gethostname()})
        key = str(queued)
        job = NetworkJob.from_key(key)
        done = [
            t
            for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.user_attrs.get(JOB) == key
        ]
        if done:
            trial.set_user_attr("duplicate_of", done[0].number)
            raise optuna.TrialPruned(f"job {key} was measured by trial {done[0].number}")
        cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, seed=job.seed))
        start = time.perf_counter()
        try:
            result = train_network(
                cfg, self.registry, job.tasks, self.network_dir(job), key, self._training_data()
            )
        except FolderLocked as exc:
            self._put_back(trial, key, exc)
        self._deferred.pop(key, None)
        trial.set_user_attr("best", json.loads(json.dumps(result.best)))
        trial.set_user_attr("final", final_scores(result.out_dir))
        trial.set_user_attr("seconds", time.perf_counter() - start)
        trial.set_user_attr("network_dir", str(result.out_dir))
        self.finished += 1
        return 0.0

    def _put_back(self, trial: optuna.Trial, key: str, exc: FolderLocked) -> NoReturn:
        """Queue the job again (its network folder is locked by another process) and end this
        trial pruned; this worker takes the job again after a wait (see the module doc)."""
        first, longest = self.locked_wait
        _, wait = self._deferred.get(key, (0.0, first))
        self._deferred[key] = (time.monotonic() + wait, min(2 * wait, longest))
        trial.set_user_attr("folder_locked", str(exc))
        self.study.enqueue_trial({}, user_attrs={JOB: key})
        log.warning("job %s: %s; queued again, taken again here in %.0f s at the earliest", key, exc, wait)
        raise optuna.TrialPruned(f"job {key}: its network folder is locked; queued again")

    def _ready(self, trial: optuna.trial.FrozenTrial) -> bool:
        """Whether this worker takes a waiting job now (not one it put back a moment ago)."""
        deferred = self._deferred.get(str(trial.user_attrs.get(JOB)))
        return deferred is None or time.monotonic() >= deferred[0]

    def run(self, poll: float = 1.0) -> int:
        """Work until every job is complete; returns how many jobs this worker finished."""
        with workroot.active(self.work_root):  # network identities as the queue has them
            return self._run(poll)

    def _run(self, poll: float) -> int:
        states = optuna.trial.TrialState
        while True:
            trials = self.study.get_trials(deepcopy=False)
            waiting = [t for t in trials if t.state == states.WAITING]
            running = [t for t in trials if t.state == states.RUNNING]
            if any(self._ready(t) for t in waiting):
                self.study.optimize(self.objective, n_trials=1, catch=())
            elif waiting or running:  # another worker holds the last jobs (or their folders):
                # wait, take them over if it dies
                time.sleep(poll)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(self.study)
                self.fail_unbegun(running)
            else:
                return self.finished

    def fail_unbegun(self, running: Sequence[optuna.trial.FrozenTrial]) -> list[int]:
        """Fail the running jobs that never began: taken (``study.ask``) more than the storage's
        grace period ago, yet not marked :data:`BEGAN` by an objective (their worker died before
        its first heartbeat, so Optuna's :func:`~optuna.storages.fail_stale_trials` never looks at
        them), and queue each one again through the storage's stale-trial callback. Returns the
        numbers of the trials failed here (another worker may fail one first)."""
        storage = self.study._storage  # Optuna's own fail_stale_trials reads it the same way
        interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        if interval is None:  # no heartbeat: nothing is ever stale
            return []
        grace = getattr(storage, "grace_period", None) or 2 * interval
        now = datetime.datetime.now()
        failed = []
        for trial in running:
            started = trial.datetime_start
            if JOB not in trial.user_attrs or BEGAN in trial.user_attrs or started is None:
                continue
            if (now - started).total_seconds() <= grace:
                continue
            fresh = self.study._storage.get_trial(trial._trial_id)  # its state and marks now
            if fresh.state != optuna.trial.TrialState.RUNNING or BEGAN in fresh.user_attrs:
                continue
            try:
                if not storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first
                continue
            log.warning(
                "job %s: trial %d was taken %.0f s ago by a worker that never began it (died before "
                "its first heartbeat); queued again",
                trial.user_attrs[JOB],
                trial.number,
                (now - started).total_seconds(),
            )
            callback = storage.get_heartbeat_stale_trial_callback()
            if callback is not None:
                callback(self.study, storage.get_trial(trial._trial_id))
            failed.append(trial.number)
        return failed


def spawn_worker(
    url: str,
    study: str,
    heartbeat: int,
    grace: int,
    threads: int | None,
    device: str | None = None,
    work_root: Path | None = None,
) -> subprocess.Popen:
    """A local ``taskgroup worker`` process on the study; the storage URL (which may hold a
    password) goes in its environment (:data:`STORAGE_ENV`), not on its command line.
    ``device``: the GPU it sees alone (``CUDA_VISIBLE_DEVICES``; its ``cuda`` is that GPU)."""
    command = [sys.executable, "-m", "taskgroup", "worker", "--study", study]
    command += ["--heartbeat", str(heartbeat), "--grace", str(grace)]
    if threads:
        command += ["--threads", str(threads)]
    if work_root is not None:
        command += ["--work-root", str(work_root)]
    env = {**os.environ, STORAGE_ENV: url}
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(device)
    return subprocess.Popen(command, env=env)


def work_off(
    study: optuna.Study,
    url: str,
    workers: int,
    heartbeat: int,
    grace: int,
    threads: int | None,
    registry: TaskRegistry | None = None,
    devices: Sequence[str] = (),
    work_root: Path | None = None,
) -> int:
    """Work a study's queue off: this process and ``workers - 1`` local worker processes (more
    machines may join with ``taskgroup worker``). Returns the jobs this process trained.

    With ``devices`` (GPUs, as ``CUDA_VISIBLE_DEVICES`` names them), ``max(workers, len(devices))``
    worker processes are started, worker k seeing only ``devices[k % len(devices)]``, and this
    process (which may hold a CUDA context on GPU 0 already) only waits for them: N workers on
    an N-GPU machine use N GPUs, not N processes on GPU 0."""
    if devices:
        device = str(study.user_attrs["config"].get("train", {}).get("device", "auto"))
        if device not in ("auto", "cuda"):
            raise ConfigError(
                f"--devices gives each worker one GPU, seen as 'cuda': train.device must be auto or "
                f"cuda, not {device!r}"
            )
        count = max(workers, len(devices))
        helpers = [
            spawn_worker(
                url, study.study_name, heartbeat, grace, threads, devices[k % len(devices)], work_root
            )
            for k in range(count)
        ]
    else:
        helpers = [
            spawn_worker(url, study.study_name, heartbeat, grace, threads, work_root=work_root)
            for _ in range(workers - 1)
        ]
    try:
        finished = 0 if devices else Worker(study, registry, work_root=work_root).run()
        codes = [h.wait() for h in helpers]
    finally:
        for h in helpers:
            if h.poll() is None:
                h.terminate()
    waiting = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.WAITING]
    failed = [code for code in codes if code != 0]
    if failed and waiting:  # no worker of this command is left to train them
        raise TaskgroupError(
            f"{len(failed)} of {len(helpers)} local worker process(es) failed (exit codes "
            f"{', '.join(map(str, failed))}) and {len(waiting)} job(s) of study {study.study_name} are "
            "still queued: see the workers' messages above; rerun to resume"
        )
    return finished


def seconds_per_job(study: optuna.Study) -> dict[str, float]:
    """Training seconds spent on each job of the study (all its attempts that finished)."""
    out: dict[str, float] = {}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get(JOB)
        if key is not None:
            out[key] = out.get(key, 0.0) + float(t.user_attrs.get("seconds", 0.0))
    return out


def job_seconds(study: optuna.Study, keys: set[str] | None = None) -> float:
    """Training seconds spent on the study's jobs (all attempts that finished), or on ``keys``."""
    return sum(v for k, v in seconds_per_job(study).items() if keys is None or k in keys)


def _job_of(trial: optuna.trial.FrozenTrial) -> NetworkJob | None:
    key = trial.user_attrs.get(JOB)
    return NetworkJob.from_key(key) if key else None


def job_results(study: optuna.Study, which: str = "best") -> dict[str, dict[str, Any]]:
    """Complete jobs: key -> per task, the network's ``best`` step on validation
    ({task: {"step", "value", "metrics"}}) or its ``final`` evaluation ({task: {"step",
    "metrics"}}); with the data's held-out test split, also the test scores of that step
    (``test_value`` and ``test_metrics``; ``test_metrics`` only for ``final``), absent in jobs
    trained before test scoring."""
    out = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        out[t.user_attrs[JOB]] = t.user_attrs[which]
    return out
