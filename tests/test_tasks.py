from __future__ import annotations

from collections import Counter

import pytest
import yaml

from taskgroup.config import load_yaml
from taskgroup.errors import ConfigError
from taskgroup.tasks import DEFAULT_REGISTRY, TaskKind, load_registry, parse_registry


def test_registry_has_the_27_fmuia_tasks(registry):
    assert len(registry) == 27
    kinds = Counter(t.kind.short for t in registry)
    assert kinds == {"seg": 12, "cls": 9, "det": 3, "reg": 3}
    assert registry["IUGC"].num_keypoints == 3
    assert registry["fetal_abdomen_multi"].num_classes == 5
    assert registry["organ_cls"].class_names[3] == "kidney"
    assert registry["FUGC"].kind.value == "Regression"  # the CSV's capital R
    assert sum(t.train_images for t in registry) == pytest.approx(40_000, rel=0.1)


def test_metric_directions(registry):
    assert registry["lung"].primary_metric.name == "dsc"
    assert registry["lung"].metric("hd").higher_is_better is False
    assert registry["IUGC"].primary_metric.higher_is_better is False
    assert registry["thyroid_nodule_det"].primary_metric.name == "iou"
    assert registry["breast_2cls"].metric("mcc").higher_is_better


def test_clinical_groups_partition_the_tasks(registry):
    members = [t for ids in registry.clinical_groups.values() for t in ids]
    assert sorted(members) == sorted(registry.ids)
    assert len(registry.clinical_groups["OB"]) == 12
    for t in registry:
        assert t.id in registry.clinical_groups[t.clinical_group]


def test_unknown_task_lookup_suggests(registry):
    with pytest.raises(KeyError, match="did you mean 'fetal_head'"):
        registry["fetal_haed"]


def _data():
    return load_yaml(DEFAULT_REGISTRY)


def test_unknown_type_is_an_error():
    data = _data()
    data["tasks"][0]["type"] = "regression_points"
    with pytest.raises(ConfigError, match=r"task FUGC: unknown task type 'regression_points'"):
        parse_registry(data, "reg.yaml")


def test_type_accepts_short_names():
    assert TaskKind.parse("reg") is TaskKind.REGRESSION
    assert TaskKind.parse("segmentation") is TaskKind.SEGMENTATION


def test_duplicate_id_is_an_error():
    data = _data()
    data["tasks"].append(dict(data["tasks"][0]))
    with pytest.raises(ConfigError, match=r"reg.yaml: task FUGC: duplicate task id"):
        parse_registry(data, "reg.yaml")


def test_group_naming_unknown_task_is_an_error():
    data = _data()
    data["clinical_groups"]["lung"].append("lung_3cls")
    with pytest.raises(ConfigError, match=r"reg.yaml: clinical group 'lung' names unknown task 'lung_3cls'"):
        parse_registry(data, "reg.yaml")


def test_task_in_no_group_and_bad_counts_are_errors():
    data = _data()
    data["clinical_groups"]["OB"].remove("FUGC")
    with pytest.raises(ConfigError, match="'FUGC' is in no clinical group"):
        parse_registry(data, "r.yaml")
    data = _data()
    data["tasks"][12]["num_classes"] = 2  # spinal_cord_injury_loc, a detection task
    with pytest.raises(ConfigError, match="spinal_cord_injury_loc: num_classes 2 is invalid for detection"):
        parse_registry(data, "r.yaml")


def test_load_registry_from_a_file(tmp_path):
    data = _data()
    data["tasks"] = data["tasks"][:2]
    data["clinical_groups"] = {"OB": ["FUGC", "IUGC"]}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(data))
    reg = load_registry(path)
    assert reg.ids == ("FUGC", "IUGC")
    assert reg.subset(["IUGC"]).clinical_groups == {"OB": ("IUGC",)}
