"""A ``kill -9`` at random moments of ``taskgroup train``, of a ``taskgroup compare`` worker and of
``taskgroup search``, then the same command again: does it end with the uninterrupted result?
(issue 25, "Done means").

    python benchmarks/kill_resume.py [--seed 0] [--points 3] [--out DIR] [--json FILE] [--data ROOT]

On the tiny synthetic benchmark (``taskgroup synth --scale tiny``, generated into ``OUT/data``
unless ``--data`` names one) and a tiny random-encoder model (the tests' ``tiny_config``), each
command is run once uninterrupted (the reference), once more uninterrupted (the control: is the
command deterministic at all from one process to the next?), and then once per kill point:

- ``train`` (three networks of ``--train-steps`` steps, checkpoints every 20): the command's
  process group is killed with SIGKILL, then the same command is run to completion;
- ``compare`` (TS, AU and a pair grouping on three tasks, one seed, ``--workers 2``, heartbeat
  1 s, grace 3 s): the local ``taskgroup worker`` process is killed with SIGKILL while it and
  the command both hold a job; the command itself retakes the dead worker's job after the grace
  period and ends (``--compare-kill group`` kills the whole process group instead and reruns).
  While the worker starts, the command's training thread runs at a lower priority
  (:class:`WorkerStart`), so that the worker reaches a job before the command has trained them
  all, on loaded cores too;
- ``search`` (a planted 27-task affinity matrix, partition + select + Optuna TPE and NSGA-II
  with ``--search-trials`` trials each on the SQLite storage ``OUT/search.db``): the process
  group is killed, then the same command is run to completion (which fails the trial the kill
  caught running and evaluates its partition again, if it was one the study starts from).

A kill point is a fraction of the reference's *working window*, drawn at random (``--seed``),
one per equal slice of [0.05, 0.95] so that the points spread over the run: the window starts
when the run is at work (train: its ``networks/`` folder exists; compare: two jobs are running in
``jobs.db``; search: ``search.db`` exists) and ends when the run (compare: the local worker)
exits; in the killed run the point is timed from that run's own start of work. Compared with the
reference, byte for byte (a CSV's floats are written in their shortest round-trip form, so equal
bytes are equal values): train ``metrics.csv``, ``served.csv`` and every network's
``metrics.csv``, ``best.json``, ``done.json`` and final weights (``last.pt``'s model tensors,
``torch.equal``); compare ``scores.csv`` and the report's CSVs and every network's final weights;
search ``ranking.csv``, every ``proposals/*.yaml`` and ``meta.json`` without its timings. A
difference names the file, the column and the first differing row. Exit code 1 when any
resumed (or control) result differs, or a kill point came after the run had ended.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import yaml
from report import fail, report

POLL = 0.01  # seconds between looks at a running command
WINDOW = (0.05, 0.95)  # kill points are drawn from this part of the working window
TRAIN_GROUPS = {
    "pair": ["lung", "IUGC"],
    "solo": ["breast_3cls"],
    "trio": ["thyroid_nodule_det", "lung", "breast_3cls"],
}
COMPARE_TASKS = ["breast_lesion", "thyroid_nodule", "IUGC"]
COMPARE_FILES = (
    "scores.csv",
    "per_task.csv",
    "per_task_metrics.csv",
    "per_group.csv",
    "negative_transfer.csv",
)
# meta.json entries left out of the comparison: wall times, and the storage URL (a path in the run folder)
UNCOMPARED_KEYS = {"seconds", "select_seconds", "cost", "storage"}


# -- the setting ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sizes:
    """How long each command works (the default: a few seconds of work after a start-up of about
    six seconds, on one thread per process)."""

    train_steps: int = 300  # per network of the train case
    compare_steps: int = 150  # train.steps_per_task of the compare case
    search_trials: int = 60  # TPE and NSGA-II trials of the search case


@dataclasses.dataclass(frozen=True)
class Case:
    """One command under test: its argv on a run folder, when a run is at work, what a killed
    run left, which process dies (``group``: the command's process group; ``worker``: the local
    ``taskgroup worker`` that compare started), and which files must equal the reference's."""

    name: str
    argv: Callable[[Path], list[str]]
    working: Callable[[Path], bool]
    left: Callable[[Path], tuple[bool, str]]  # (partial state?, what it is)
    resumed: Callable[[Path], str]  # what shows that the rerun resumed
    outputs: tuple[str, ...]  # globs under the run folder
    victim: str = "group"


def tiny_config(data: Path, **train: object) -> dict:
    """The tests' tiny setting (tests/test_training.py): a 2-block width-32 encoder at 32 px,
    random weights, 2 experts, batch 8, one thread."""
    from taskgroup.config import load_run_config, to_mapping

    sections = {
        "model": {
            "backbone": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
            "moe": {"mode": "task", "num_experts": 2, "top_k": 1, "num_layers": 1, "task_embed_dim": 8},
            "heads": {"hidden": 16},
        },
        "data": {"root": str(data), "image_size": 32, "batch_size": 8},
        "train": {"warmup_steps": 2, "threads": 1, **train},
    }
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in sections.items()]
    return to_mapping(load_run_config(None, overrides))


def synthesise(out: Path) -> Path:
    """The tiny synthetic benchmark in ``out`` (kept when it is already there)."""
    if not (out / "truth.yaml").exists():
        command = [sys.executable, "-m", "taskgroup", "synth", "--scale", "tiny", "--out", str(out)]
        subprocess.run(command, check=True, capture_output=True)
    return out


def _taskgroup(*args: str) -> list[str]:
    return [sys.executable, "-m", "taskgroup", *args]


def _sqlite(path: Path, query: str, timeout: float = 30) -> list[tuple]:
    """Rows of a query on an Optuna SQLite storage ([] while it has no tables yet). Not opened
    read-only: after a kill the file may have a hot journal, which only a writable connection
    rolls back (as the next command's would); a read-only one fails on it."""
    if not path.exists():
        return []
    db = sqlite3.connect(path, timeout=timeout)
    try:
        return db.execute(query).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        db.close()


def _locked(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc)


def trial_states(path: Path, timeout: float = 1.0) -> dict[str, dict[str, int]]:
    """Per study of an Optuna storage: how many trials are in each state ({} while a writer
    holds the file for more than ``timeout`` seconds, e.g. one stopped inside a commit)."""
    try:
        rows = _sqlite(
            path,
            "SELECT s.study_name, t.state, COUNT(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
            "GROUP BY s.study_name, t.state",
            timeout,
        )
    except sqlite3.OperationalError as exc:
        if _locked(exc):
            return {}
        raise
    out: dict[str, dict[str, int]] = {}
    for study, state, count in rows:
        out.setdefault(study, {})[str(state).lower()] = int(count)
    return out


def running_enqueued(path: Path, study: str, timeout: float = 1.0) -> int:
    """How many trials of a study run a partition that was enqueued (a start partition): their
    parameters are fixed (``fixed_params``); 0 while a writer holds the file (see trial_states)."""
    try:
        rows = _sqlite(
            path,
            "SELECT COUNT(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
            "JOIN trial_system_attributes a ON a.trial_id = t.trial_id "
            f"WHERE s.study_name = '{study}' AND t.state = 'RUNNING' AND a.key = 'fixed_params'",
            timeout,
        )
    except sqlite3.OperationalError as exc:
        if _locked(exc):
            return 0
        raise
    return int(rows[0][0]) if rows else 0


def _states_text(states: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none"


def unfinished_networks(out: Path) -> list[str]:
    """Network folders with a checkpoint and no done.json: training caught half-way."""
    return sorted(
        d.name
        for d in (out / "networks").glob("*")
        if (d / "checkpoints" / "last.pt").exists() and not (d / "done.json").exists()
    )


def train_case(setup: Path, data: Path, sizes: Sizes) -> Case:
    setup.mkdir(parents=True, exist_ok=True)
    config = setup / "train.yaml"
    config.write_text(
        yaml.safe_dump(tiny_config(data, steps=sizes.train_steps, eval_every=50, checkpoint_every=20))
    )
    grouping = setup / "train_grouping.yaml"
    grouping.write_text(yaml.safe_dump({"groups": TRAIN_GROUPS}))

    def left(out: Path) -> tuple[bool, str]:
        nets = (out / "networks").glob("*")
        done = sorted(d.name for d in nets if (d / "done.json").exists())
        half = unfinished_networks(out)
        served = (out / "served.csv").exists()
        text = f"done: {', '.join(done) or '-'}; checkpoint only: {', '.join(half) or '-'}"
        return bool(done or half) and not served, text + ("; served.csv" if served else "")

    def resumed(out: Path) -> str:
        log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
        lines = [ln.split("INFO ", 1)[-1] for ln in log.splitlines() if "resumed at step" in ln]
        return "; ".join(ln.split(" from ")[0] for ln in lines) or "nothing to resume"

    return Case(
        "train",
        lambda out: _taskgroup(
            "train", "--config", str(config), "--grouping", str(grouping), "--out", str(out)
        ),
        lambda out: (out / "networks").is_dir(),
        left,
        resumed,
        (
            "metrics.csv",
            "served.csv",
            "networks/*/metrics.csv",
            "networks/*/best.json",
            "networks/*/done.json",
            "networks/*/checkpoints/last.pt",
        ),
    )


def compare_case(setup: Path, data: Path, sizes: Sizes, kill: str = "worker") -> Case:
    setup.mkdir(parents=True, exist_ok=True)
    config = setup / "compare.yaml"
    cfg = tiny_config(
        data, steps=None, steps_per_task=sizes.compare_steps, eval_every=100, checkpoint_every=10
    )
    config.write_text(yaml.safe_dump(cfg))
    pair = setup / "pair.yaml"
    pair.write_text(yaml.safe_dump({"name": "pair", "groups": [COMPARE_TASKS[:2], COMPARE_TASKS[2:]]}))

    def states(out: Path) -> dict[str, int]:
        found = trial_states(out / "jobs.db")
        return next(iter(found.values()), {})

    def left(out: Path) -> tuple[bool, str]:
        now = states(out)
        half = unfinished_networks(out)
        text = f"jobs: {_states_text(now)}; checkpoint only: {len(half)} network(s)"
        return bool(now.get("running") or half), text

    def resumed(out: Path) -> str:
        failed = states(out).get("fail", 0)
        return f"{failed} dead attempt(s) retaken" if failed else "no job retaken"

    command = ["compare", "--config", str(config), "--groupings", "ts", "au", str(pair)]
    command += ["--seeds", "1", "--workers", "2", "--set", "compare.heartbeat=1", "--set", "compare.grace=3"]
    return Case(
        "compare",
        lambda out: _taskgroup(*command, "--out", str(out)),
        lambda out: states(out).get("running", 0) >= 2,
        left,
        resumed,
        (*COMPARE_FILES, "networks/*/checkpoints/last.pt"),
        victim=kill,
    )


def planted_matrix(
    tasks: Sequence[str], truth: Sequence[int], noise: float = 0.8, seed: int = 0
) -> np.ndarray:
    """+1 within the planted groups, -0.5 across, plus Gaussian noise (as tests/test_search.py)."""
    rng = np.random.default_rng(seed)
    a = np.where(np.equal.outer(truth, truth), 1.0, -0.5) + noise * rng.standard_normal((len(truth),) * 2)
    np.fill_diagonal(a, 0.0)
    return a


def search_case(setup: Path, data: Path, sizes: Sizes) -> Case:
    from taskgroup.affinity.report import matrix_frame
    from taskgroup.data.synthetic import planted_labels
    from taskgroup.tasks import load_registry

    tasks = list(load_registry().ids)
    affinity = setup / "affinity"
    (affinity / "gradient").mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(data, steps=10)
    (affinity / "config.yaml").write_text(yaml.safe_dump(cfg))
    matrix = planted_matrix(tasks, planted_labels(tasks))
    matrix_frame(matrix, tasks).to_csv(affinity / "gradient" / "matrix.csv")
    config = setup / "search.yaml"
    config.write_text(yaml.safe_dump(cfg))

    def left(out: Path) -> tuple[bool, str]:
        found = trial_states(out / "search.db")
        text = "; ".join(f"{study}: {_states_text(s)}" for study, s in sorted(found.items()))
        return bool(found) and not (out / "meta.json").exists(), text or "no study"

    def resumed(out: Path) -> str:  # after the rerun: a trial the kill caught is failed by it
        found = trial_states(out / "search.db")
        return "; ".join(f"{study}: {_states_text(s)}" for study, s in sorted(found.items()))

    trials = sizes.search_trials
    return Case(
        "search",
        lambda out: _taskgroup(
            "search",
            str(affinity),
            "--config",
            str(config),
            "--set",
            f"search.trials={trials}",
            "--set",
            f"search.pareto_trials={trials}",
            "--out",
            str(out),
        ),
        lambda out: (out / "search.db").exists(),
        left,
        resumed,
        ("ranking.csv", "proposals/*.yaml", "meta.json"),
    )


# -- running, killing ----------------------------------------------------------------------------------
def launch(argv: list[str], log: Path) -> subprocess.Popen:
    """The command in a session of its own (so its process group can be killed alone)."""
    env = {**os.environ, "COLUMNS": "200"}
    with log.open("ab") as sink:
        return subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def local_worker(proc: subprocess.Popen) -> psutil.Process | None:
    """The ``taskgroup worker`` process a compare command started."""
    try:
        children = psutil.Process(proc.pid).children()
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            if "worker" in child.cmdline():
                return child
        except psutil.Error:
            continue
    return None


def _alive(process: psutil.Process | None) -> bool:
    try:
        return process is not None and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


#: the niceness of a compare command's main thread while its local worker starts (see WorkerStart)
YIELD_NICENESS = 10


class WorkerStart:
    """Lets the local ``taskgroup worker`` of a compare command reach its first job before the
    command has done them all: from when the worker process exists until the case is at work
    (two jobs running), the command's main thread (the one that trains: ``nice`` acts on one
    thread on Linux, so its heartbeat thread keeps its priority) runs at niceness
    :data:`YIELD_NICENESS`. The worker needs a few CPU-seconds to start (imports, the study):
    on loaded cores the command, at full priority, trained every job of the test's sizes first
    (the worker got half a core and took about 13 s), so "two jobs running" was never seen.
    Niceness changes no result, only who gets the CPU when there is not enough of it. The
    niceness is put back once both work (where that is allowed: an unprivileged user cannot
    lower it again, and the command then stays nicer, which only slows it under load)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.before: int | None = None  # the command's niceness, while it yields
        self.done = False

    def update(self, worker: psutil.Process | None, working: bool) -> None:
        """Called at every look at the run: yield once the worker exists, stop once at work."""
        if self.done or (worker is None and not working):
            return
        try:
            command = psutil.Process(self.proc.pid)
            if self.before is None and not working:
                self.before = command.nice()
                command.nice(max(self.before, YIELD_NICENESS))
            elif working:
                self.done = True
                if self.before is not None:
                    command.nice(self.before)
        except (psutil.Error, OSError):  # ended, or not allowed to raise the priority again
            self.done = self.done or working


@dataclasses.dataclass
class Window:
    """When a run was at work, in seconds after its start."""

    start: float
    end: float
    wall: float  # the whole command

    @property
    def length(self) -> float:
        return self.end - self.start


def run_through(case: Case, out: Path, log: Path, timeout: float = 900) -> Window:
    """Run the command to completion, timing its working window (an error when the run was
    never seen at work: then there is no window to draw kill points from)."""
    t0 = time.perf_counter()
    proc = launch(case.argv(out), log)
    start = end = None
    worker = None
    yielding = WorkerStart(proc)
    while proc.poll() is None:
        now = time.perf_counter() - t0
        if now > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"{case.name}: no end after {timeout:.0f} s (see {log})")
        if start is None and case.working(out):
            start = now
        if case.victim == "worker":
            worker = worker or local_worker(proc)
            yielding.update(worker, start is not None)
            if start is not None and end is None and worker is not None and not _alive(worker):
                end = now
        time.sleep(POLL)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{case.name}: exit code {proc.returncode} (see {log})")
    if start is None:
        raise RuntimeError(f"{case.name}: finished before it was seen at work (see {log}); give it more work")
    return Window(start, end if end is not None else wall, wall)


def run_to_end(case: Case, out: Path, log: Path, timeout: float = 900) -> float:
    """Run the command to completion untouched (a reference whose working window is not
    needed); returns its wall time."""
    t0 = time.perf_counter()
    proc = launch(case.argv(out), log)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise RuntimeError(f"{case.name}: no end after {timeout:.0f} s (see {log})") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{case.name}: exit code {proc.returncode} (see {log})")
    return time.perf_counter() - t0


@dataclasses.dataclass
class Killed:
    at: float | None  # seconds after start (None: the run ended first)
    partial: bool
    left: str
    seconds: float  # killed run and its completion


def _still(proc: subprocess.Popen, out: Path, when: Callable[[Path], bool]) -> bool:
    """Whether ``when(out)`` holds with the process group stopped (SIGSTOP): then it still holds
    at the SIGKILL that follows, however short-lived the state (a search trial runs for some
    60 ms). When it does not (any more), the group goes on (SIGCONT) and is looked at again."""
    try:
        os.killpg(proc.pid, signal.SIGSTOP)
    except ProcessLookupError:
        return False
    if when(out):
        return True
    os.killpg(proc.pid, signal.SIGCONT)
    return False


def kill_and_finish(
    case: Case, out: Path, log: Path, after: float = 0.0, when: Callable[[Path], bool] | None = None
) -> Killed:
    """Start the command, SIGKILL it (or its local worker) ``after`` seconds after this run is at
    work (and, with ``when``, once ``when(out)`` holds: for a process group, held still, see
    :func:`_still`), then finish: rerun the command (a killed process group), or let the command
    retake the dead worker's job."""
    t0 = time.perf_counter()
    proc = launch(case.argv(out), log)
    started = None
    worker = None
    yielding = WorkerStart(proc)
    while proc.poll() is None and started is None:
        if case.working(out):
            started = time.perf_counter()
        if case.victim == "worker":
            worker = worker or local_worker(proc)
            yielding.update(worker, started is not None)
        time.sleep(POLL)
    if started is None:
        return Killed(None, False, "ended before it was at work", time.perf_counter() - t0)
    while proc.poll() is None:
        due = time.perf_counter() >= started + after and (when is None or when(out))
        # a process group is held still while the state is confirmed (a worker's is long-lived)
        if due and (case.victim == "worker" or when is None or _still(proc, out, when)):
            break
        time.sleep(POLL)
    at = time.perf_counter() - t0
    if case.victim == "worker":
        worker = local_worker(proc)
        if not _alive(worker):
            proc.wait()
            return Killed(None, False, "the worker had ended", time.perf_counter() - t0)
        os.kill(worker.pid, signal.SIGKILL)
        while _alive(worker):  # a zombie until the command reaps it, at its end
            time.sleep(POLL)
    else:
        if proc.poll() is not None:
            return Killed(None, False, "the run had ended", time.perf_counter() - t0)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial, left = case.left(out)
    if case.victim == "worker":
        proc.wait()
    else:
        proc = launch(case.argv(out), log)
        proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{case.name}: the run after the kill exited with {proc.returncode} (see {log})")
    return Killed(at, partial, left, time.perf_counter() - t0)


# -- comparing ----------------------------------------------------------------------------------------
def _frame_difference(name: str, a: pd.DataFrame, b: pd.DataFrame) -> str | None:
    """Where two CSV tables differ in value (None: equal values, NaN equal to NaN): shape,
    columns, or the first column and row that differ."""
    if list(a.columns) != list(b.columns):
        return f"{name}: columns differ ({sorted(set(a.columns) ^ set(b.columns))})"
    if len(a) != len(b):
        return f"{name}: {len(a)} rows in the reference, {len(b)} here"
    keys = [c for c in a.columns if not pd.api.types.is_numeric_dtype(a[c])][:4]  # row labels
    for col in a.columns:
        x, y = a[col], b[col]
        same = (x == y) | (x.isna() & y.isna())
        if same.all():
            continue
        row = int(np.flatnonzero(~same.to_numpy())[0])
        where = ", ".join(f"{k}={a[k].iloc[row]}" for k in keys if k != col)
        text = f"{name}: column {col} differs in {int((~same).sum())} of {len(a)} rows"
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            gap = np.nanmax(np.abs(x.to_numpy(float) - y.to_numpy(float)))
            text += f" (max |diff| {float(gap):.3g})"
        return text + f"; first: row {row} ({where}): {x.iloc[row]!r} vs {y.iloc[row]!r}"
    return None


def _first_difference(x: object, y: object, path: str = "") -> str:
    """The first key path where two JSON values differ."""
    if isinstance(x, dict) and isinstance(y, dict):
        for k in list(x) + [k for k in y if k not in x]:
            if x.get(k) != y.get(k):
                return _first_difference(x.get(k), y.get(k), f"{path}.{k}" if path else str(k))
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        for k, (u, v) in enumerate(zip(x, y, strict=True)):
            if u != v:
                return _first_difference(u, v, f"{path}[{k}]")
    return f"{path}: {json.dumps(x)[:80]} vs {json.dumps(y)[:80]}"


def _without(value: object, keys: set[str]) -> object:
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


@dataclasses.dataclass
class Comparison:
    """How a run folder's outputs stand against the reference's: ``differs`` lists differences
    in value, ``notes`` differences of text only (equal values)."""

    differs: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not self.differs


def _compare_file(name: str, a: Path, b: Path, found: Comparison) -> None:
    if a.suffix == ".pt":
        import torch

        x, y = (torch.load(p, map_location="cpu", weights_only=False) for p in (a, b))
        if x["step"] != y["step"]:
            found.differs.append(f"{name}: step {x['step']} vs {y['step']}")
            return
        differ = [
            k for k in x["model"] if k not in y["model"] or not torch.equal(x["model"][k], y["model"][k])
        ]
        if differ:
            found.differs.append(f"{name}: {len(differ)} weight tensor(s) differ, e.g. {differ[0]}")
        return
    if a.read_bytes() == b.read_bytes():
        return
    if a.suffix == ".json":
        x, y = (_without(json.loads(p.read_text()), UNCOMPARED_KEYS) for p in (a, b))
        if x != y:
            found.differs.append(f"{name}: {_first_difference(x, y)}")
        return
    if a.suffix == ".csv":
        value = _frame_difference(name, pd.read_csv(a), pd.read_csv(b))
        if value:
            found.differs.append(value)
            return
    if a.read_bytes().replace(b"\r\n", b"\n") == b.read_bytes().replace(b"\r\n", b"\n"):
        ends = [p.read_bytes().count(b"\r\n") for p in (a, b)]
        found.notes.append(f"{name}: equal but for line ends (CRLF: {ends[0]} lines vs {ends[1]})")
    elif a.suffix == ".csv":
        found.notes.append(f"{name}: equal values, different text")
    else:
        found.differs.append(f"{name}: contents differ")


def compare_outputs(reference: Path, other: Path, patterns: Sequence[str]) -> Comparison:
    """Every difference between two run folders in the files of ``patterns``."""
    found = Comparison()
    for pattern in patterns:
        names = {p.relative_to(reference) for p in reference.glob(pattern)}
        theirs = {p.relative_to(other) for p in other.glob(pattern)}
        if not names:
            found.differs.append(f"{pattern}: no such file in the reference")
        for name in sorted(names ^ theirs):
            found.differs.append(f"{name}: only in {'the reference' if name in names else 'this run'}")
        for name in sorted(names & theirs):
            _compare_file(str(name), reference / name, other / name, found)
    return found


def kill_points(rng: np.random.Generator, points: int) -> list[float]:
    """One fraction of the working window per equal slice of WINDOW."""
    lo, hi = WINDOW
    edges = np.linspace(lo, hi, points + 1)
    return [float(rng.uniform(a, b)) for a, b in itertools.pairwise(edges)]


def _row(case: Case, point: str, found: Comparison | None, seconds: float, **fields: object) -> dict:
    row = {
        "command": case.name,
        "kill point": point,
        "killed at s": "-",
        "victim": "-",
        "left": "-",
        "partial": "-",
        "resumed": "-",
    }
    row.update(fields)
    row["equal"] = "-" if found is None else ("yes" if found.equal else "NO")
    row["differences"] = "; ".join(found.differs) if found and found.differs else "-"
    row["notes"] = "; ".join(found.notes) if found and found.notes else "-"
    row["seconds"] = round(seconds, 1)
    return row


def measure(case: Case, out: Path, fractions: Sequence[float], control: bool = True) -> list[dict]:
    """The reference run, the control, and one killed-and-finished run per fraction: one row
    each (``seconds``: the run, with its kill and its completion; ``reference s``: the reference
    run's wall time)."""
    out.mkdir(parents=True, exist_ok=True)
    window = run_through(case, out / "reference", out / "reference.log")
    rows = []
    if control:
        start = time.perf_counter()
        run_through(case, out / "control", out / "control.log")
        found = compare_outputs(out / "reference", out / "control", case.outputs)
        rows.append(_row(case, "none (control)", found, time.perf_counter() - start))
    victim = {"group": "process group", "worker": "local worker"}[case.victim]
    for k, fraction in enumerate(fractions, 1):
        folder = out / f"killed{k}"
        killed = kill_and_finish(case, folder, out / f"killed{k}.log", fraction * window.length)
        found = compare_outputs(out / "reference", folder, case.outputs) if killed.at is not None else None
        rows.append(
            _row(
                case,
                f"{fraction:.2f} of {window.length:.1f} s",
                found,
                killed.seconds,
                **{
                    "killed at s": "-" if killed.at is None else round(killed.at, 2),
                    "victim": victim,
                    "left": killed.left,
                    "partial": "yes" if killed.partial else "no",
                    "resumed": case.resumed(folder),
                },
            )
        )
    for row in rows:
        row["reference s"] = round(window.wall, 1)
    return rows


def build_cases(
    setup: Path, data: Path, sizes: Sizes, commands: Sequence[str], compare_kill: str
) -> list[Case]:
    makers = {
        "train": lambda: train_case(setup, data, sizes),
        "compare": lambda: compare_case(setup, data, sizes, compare_kill),
        "search": lambda: search_case(setup, data, sizes),
    }
    return [makers[c]() for c in commands]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0, help="draws the kill points")
    parser.add_argument("--points", type=int, default=3, help="kill points per command")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/kill_resume"),
        help="work folder (a rerun empties it but for OUT/data)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=None, help="synthetic root (default: OUT/data, tiny)")
    parser.add_argument(
        "--commands",
        nargs="+",
        default=["train", "compare", "search"],
        choices=["train", "compare", "search"],
    )
    parser.add_argument(
        "--compare-kill", choices=["worker", "group"], default="worker", help="what dies in compare"
    )
    parser.add_argument("--no-control", action="store_true", help="skip the second uninterrupted run")
    parser.add_argument("--train-steps", type=int, default=Sizes.train_steps)
    parser.add_argument("--compare-steps", type=int, default=Sizes.compare_steps)
    parser.add_argument("--search-trials", type=int, default=Sizes.search_trials)
    args = parser.parse_args()
    if args.points < 1:
        fail(f"--points must be at least 1, got {args.points}")
    marker = args.out / ".kill_resume"  # a folder this script made: emptied but for its data
    if args.out.exists() and any(args.out.iterdir()) and not marker.exists():
        fail(f"--out {args.out}: not empty and not a kill_resume folder; give a new folder")
    args.out.mkdir(parents=True, exist_ok=True)
    for p in args.out.iterdir():
        if p.name not in ("data", marker.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    marker.touch()
    data = args.data or synthesise(args.out / "data")
    if not (data / "train").is_dir():
        fail(f"--data {data}: no train/ folder (an FM_UIA root, e.g. from taskgroup synth --scale tiny)")
    sizes = Sizes(args.train_steps, args.compare_steps, args.search_trials)
    rng = np.random.default_rng(args.seed)
    rows = []
    for case in build_cases(args.out / "setup", data, sizes, args.commands, args.compare_kill):
        rows += measure(case, args.out / case.name, kill_points(rng, args.points), not args.no_control)
    report(
        f"kill -9 and resume (seed {args.seed}): final outputs against an uninterrupted run", rows, args.json
    )
    for r in rows:  # the long cells in full (a narrow terminal cuts the table's)
        for key in ("left", "resumed", "differences", "notes"):
            if r[key] != "-":
                print(f"{r['command']} at {r['kill point']}: {key}: {r[key]}")
    bad = [r for r in rows if r["equal"] != "yes"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
