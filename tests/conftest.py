from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from taskgroup.tasks import load_registry


@pytest.fixture(scope="session")
def registry():
    return load_registry()


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory, registry) -> Path:
    """The synthetic benchmark at its test scale, generated once per session."""
    from taskgroup.data.synthetic import generate

    out = tmp_path_factory.mktemp("synth") / "tiny"
    generate(out, registry, scale="tiny", seed=0, workers=2)
    return out


@pytest.fixture(scope="session")
def default_cache(tmp_path_factory) -> Path:
    """A cache folder for runs of the default config (configs/tiny.yaml with
    ``data.cache_dir`` set to it): the first test that trains with it generates the synthetic
    benchmark and pretrains the synthetic encoder there (about 2.5 minutes), later ones reuse."""
    return tmp_path_factory.mktemp("default-cache")


@pytest.fixture
def fixture_root(tmp_path) -> Path:
    from fixtures import make_fixture_root

    return make_fixture_root(tmp_path / "root")
