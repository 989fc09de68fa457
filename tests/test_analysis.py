"""The analyses the notebooks call: what they read from a study's folders."""

import json

import numpy as np
import pytest

from taskgroup.analysis import StudyOutput
from taskgroup.config import SearchConfig
from taskgroup.errors import ConfigError
from taskgroup.grouping.predict import GainPredictor


def study_at(root):
    return StudyOutput(root, None, root / "search", None)


def write_search_meta(root, config):
    (root / "search").mkdir(parents=True, exist_ok=True)
    meta = {"config": config, "train_sizes": {"a": 100, "b": 100, "c": 25}}
    (root / "search" / "meta.json").write_text(json.dumps(meta))


def test_the_search_config_of_a_study_rebuilds_its_predictor(tmp_path):
    # a search written before search.gain existed (it predicted the mean), with shrink set and a
    # key a later version dropped
    config = {"partners": 0.0, "shrink": 25.0, "penalty": 0.0, "dropped_option": 3}
    write_search_meta(tmp_path, config)
    study = study_at(tmp_path)
    cfg = study.search_config()
    assert (cfg.gain, cfg.shrink, cfg.partners) == ("mean", 25.0, 0.0)
    a = np.array([[0.0, 0.2, 0.4], [0.6, 0.0, 0.8], [0.0, 0.0, 0.0]])
    predictor = GainPredictor.from_config(a, ["a", "b", "c"], study.sizes(), cfg)
    gains = predictor.gains(["a", "b", "c"])
    # c: mean of 0.4 and 0.8, times 25 / (25 + 25); a: mean of 0.6 and 0, times 100 / 125
    assert gains["c"] == pytest.approx(0.6 * 0.5)
    assert gains["a"] == pytest.approx(0.3 * 0.8)
    # a search that recorded its predictor keeps it
    write_search_meta(tmp_path, {"gain": "sum", "penalty": 1.0})
    assert study.search_config().gain == "sum" and study.search_config().penalty == 1.0
    # no search: the defaults
    assert StudyOutput(tmp_path, None, None, None).search_config() == SearchConfig()


def test_a_bad_search_config_names_its_file(tmp_path):
    write_search_meta(tmp_path, {"gain": "median"})
    with pytest.raises(ConfigError, match=r"search/meta.json: config"):
        study_at(tmp_path).search_config()
