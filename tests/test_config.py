from __future__ import annotations

import dataclasses

import pytest

from taskgroup.config import apply_overrides, config_hash, from_mapping, load_run_config, to_mapping
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


def test_the_full_config_requires_the_pretrained_weights_or_an_explicit_none(tmp_path):
    from pathlib import Path

    from taskgroup.cli import main

    full = Path(__file__).parents[1] / "configs" / "full.yaml"
    with pytest.raises(ConfigError, match=r"full.yaml.*model.backbone.pretrained is required"):
        load_run_config(full)
    weights = load_run_config(full, ["model.backbone.pretrained=/w/dinov3_vits16.pth"])
    assert weights.model.backbone.pretrained == "/w/dinov3_vits16.pth"
    for none in ("none", "None", "null"):
        random = load_run_config(full, [f"model.backbone.pretrained={none}"])
        assert random.model.backbone.pretrained is None
    # explicit none is stored as the default: configs and cached networks hash as before
    tiny = full.parent / "tiny.yaml"
    assert config_hash(load_run_config(tiny, ["model.backbone.pretrained=none"])) == config_hash(
        load_run_config(tiny, ["model.backbone.pretrained=null"])
    )
    # on the command line: exit 2 with the way out, before anything is read or trained
    assert main(["train", "--config", str(full), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
