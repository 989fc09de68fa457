from __future__ import annotations

import dataclasses

import pytest

from taskgroup.config import apply_overrides, from_mapping, to_mapping
from taskgroup.data.sampler import SamplingStrategy
from taskgroup.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Inner:
    image_size: int = 64
    strategy: SamplingStrategy = SamplingStrategy.UNIFORM


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = Inner()
    weights: tuple[float, ...] = ()
    lr: float = 1e-3


def test_nested_typed_config_and_overrides():
    data = apply_overrides(
        {"name": "x", "inner": {"image_size": 32}},
        ["inner.strategy=temperature", "weights=[1, 2]", "lr=1e-1"],
    )
    cfg = from_mapping(Outer, data, "cfg.yaml")
    assert cfg == Outer("x", Inner(32, SamplingStrategy.TEMPERATURE), (1.0, 2.0), 0.1)
    assert to_mapping(cfg) == {
        "name": "x",
        "inner": {"image_size": 32, "strategy": "temperature"},
        "weights": [1.0, 2.0],
        "lr": 0.1,
    }


def test_unknown_key_names_file_and_key():
    with pytest.raises(
        ConfigError, match=r"cfg.yaml.inner: unknown key 'image_sise'; did you mean 'image_size'"
    ):
        from_mapping(Outer, {"name": "x", "inner": {"image_sise": 3}}, "cfg.yaml")


def test_wrong_type_and_bad_enum():
    with pytest.raises(ConfigError, match=r"cfg.inner.image_size: expected an integer"):
        from_mapping(Outer, {"name": "x", "inner": {"image_size": "big"}}, "cfg")
    with pytest.raises(ConfigError, match=r"'uniformm' is invalid; did you mean 'uniform'"):
        from_mapping(Outer, {"name": "x", "inner": {"strategy": "uniformm"}}, "cfg")
    with pytest.raises(ConfigError, match="missing"):
        from_mapping(Outer, {}, "cfg")
