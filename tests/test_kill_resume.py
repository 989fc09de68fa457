"""A kill -9 of ``taskgroup train``, of a ``taskgroup compare`` worker and of ``taskgroup search``
at one point each (issue 25), then the same command again: the final outputs equal an
uninterrupted run's, file by file (``benchmarks/kill_resume.py`` defines the commands, the kill and
the comparison, and measures three random points per command).

Here each point is a state rather than a time, so that it falls inside the work whatever the
machine's load: train is killed while its second network is between checkpoints, the first one
done; compare's local worker while it and the command each hold a job and a network is half-way
(while the worker starts, the command's training thread yields the CPU to it,
``kill_resume.WorkerStart``: at full priority on loaded cores the command trained every job
before the worker took one); search while its TPE study evaluates one of the graph partitions it
starts from (the first, unless that trial ended while the state was being confirmed: the process
group is stopped, the state read again, and only then killed) and while it samples trials past
them. The uninterrupted reference only has to end (``kill_resume.run_to_end``). Exact equality,
by construction, for train and compare: the engine resumes from a checkpoint holding the model,
optimiser, schedule, sampler and RNG states, and compare's report is computed from the networks'
own results. Search's rerun fails the trial the kill left running and enqueues its start
partition again (``taskgroup.grouping.optimize.owned_study`` and ``enqueue_start``; before, that
partition was lost and the proposal with it); its resumed TPE study re-seeds its sampler, so
the trials it samples after the kill differ from the uninterrupted study's (its proposals are
equal here because the best ones were found among the start partitions and the first trials).

Timings on 2 loaded cores (load about 2 from other work): train about 20 s; compare about 35 s
(50 s with one more CPU-bound process beside it), each search point about 25 s (those three
marked slow); the file about 110 s."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import kill_resume  # a benchmark script: its folder is not a package

SIZES = kill_resume.Sizes(train_steps=120, compare_steps=60, search_trials=12)


def _kill_and_compare(case: kill_resume.Case, tmp_path: Path, when) -> kill_resume.Killed:
    # the reference only has to end: its working window is the benchmark's (random kill points)
    kill_resume.run_to_end(case, tmp_path / "reference", tmp_path / "reference.log")
    killed = kill_resume.kill_and_finish(case, tmp_path / "killed", tmp_path / "killed.log", when=when)
    assert killed.at is not None, f"not killed: {killed.left}"
    assert killed.partial, f"the kill left nothing to resume: {killed.left}"
    found = kill_resume.compare_outputs(tmp_path / "reference", tmp_path / "killed", case.outputs)
    assert found.equal, "resumed run differs from the uninterrupted one:\n" + "\n".join(found.differs)
    return killed


def test_train_killed_between_checkpoints_resumes_to_the_same_outputs(tiny_synth, tmp_path):
    case = kill_resume.train_case(tmp_path / "setup", tiny_synth, SIZES)
    second = tmp_path / "killed" / "networks" / "solo" / "checkpoints" / "last.pt"
    killed = _kill_and_compare(case, tmp_path, lambda out: second.exists())
    assert "done: pair;" in killed.left  # the first network finished, the second half-way
    assert "network solo: resumed at step" in case.resumed(tmp_path / "killed")


@pytest.mark.slow
def test_compare_worker_killed_mid_job_ends_with_the_same_report(tiny_synth, tmp_path):
    case = kill_resume.compare_case(tmp_path / "setup", tiny_synth, SIZES)

    def mid_job(out: Path) -> bool:
        states = kill_resume.trial_states(out / "jobs.db")
        running = next(iter(states.values()), {}).get("running", 0)
        return running >= 2 and bool(kill_resume.unfinished_networks(out))

    _kill_and_compare(case, tmp_path, mid_job)
    assert case.resumed(tmp_path / "killed") == "1 dead attempt(s) retaken"


STUDY = "gradient-gain"  # the first Optuna study of the search case (TPE)

#: the kill points of search: while its TPE study evaluates one of the graph partitions it starts
#: from (an enqueued trial; the first one unless that trial ended while the kill was being
#: confirmed), and past the 9 graph partitions (sampled trials)
SEARCH_POINTS = {
    "start-partition": lambda db: kill_resume.running_enqueued(db, STUDY) >= 1,
    "sampled-trial": lambda db: kill_resume.trial_states(db).get(STUDY, {}).get("complete", 0) >= 10,
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(SEARCH_POINTS))
def test_search_killed_inside_its_optuna_study_resumes_to_the_same_proposals(point, tiny_synth, tmp_path):
    case = kill_resume.search_case(tmp_path / "setup", tiny_synth, SIZES)
    killed = _kill_and_compare(case, tmp_path, lambda out: SEARCH_POINTS[point](out / "search.db"))
    assert "gradient-pareto" not in killed.left  # killed inside the first (TPE) study
    if point == "start-partition":  # the kill caught it running; the rerun failed it, evaluated it again
        # (the first start partition, or a later one when the first ended as the kill was confirmed)
        assert re.search(rf"{STUDY}: (\d+ complete, )?1 running", killed.left), killed.left
        assert f"{STUDY}: 12 complete, 1 fail" in case.resumed(tmp_path / "killed")
