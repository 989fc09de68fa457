from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from taskgroup.runtime import MAX_THREADS_ENV
from taskgroup.tasks import load_registry


def pytest_configure(config):
    """Under pytest-xdist (``-n N``, the default in pyproject.toml) the workers share the cores:
    each one's torch threads (and those of the processes its tests start) are capped at
    cores / workers, so that N workers do not run N times the threads on the same cores."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    import torch

    cap = max(1, len(os.sched_getaffinity(0)) // int(workers))
    os.environ.setdefault(MAX_THREADS_ENV, str(cap))
    torch.set_num_threads(int(os.environ[MAX_THREADS_ENV]))


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder every xdist worker of this session sees (the workers' common temporary parent);
    without xdist, one in the session's temporary folder."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    return base / name


@pytest.fixture(scope="session")
def registry():
    return load_registry()


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory, registry) -> Path:
    """The synthetic benchmark at its test scale, generated once per session (by one worker)."""
    from taskgroup.data.synthetic import generate
    from taskgroup.training.data import generate_once

    return generate_once(
        shared_dir(tmp_path_factory, "synth-tiny"),
        lambda tmp: generate(tmp, registry, scale="tiny", seed=0, workers=2),
    )


@pytest.fixture(scope="session")
def default_cache(tmp_path_factory) -> Path:
    """A cache folder for runs of the default config (configs/tiny.yaml with
    ``data.cache_dir`` set to it): the first test that trains with it generates the synthetic
    benchmark and pretrains the synthetic encoder there (about 2.5 minutes; a file lock makes the
    other xdist worker wait for it), later ones reuse."""
    path = shared_dir(tmp_path_factory, "default-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def fixture_root(tmp_path) -> Path:
    from fixtures import make_fixture_root

    return make_fixture_root(tmp_path / "root")
