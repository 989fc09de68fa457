"""A data root with some of the 27 tasks (issue 28): every command defaults to the tasks found
in it; the probe cadences follow the run's length, so a run of few tasks still measures every
method; a type correction that cannot be estimated (fewer than two pairs in a block) is left
out and said so, never a matrix of zeros."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from fixtures import make_subset_root
from test_training import tiny_config

from taskgroup.affinity import correct, read_matrix, run_affinity
from taskgroup.affinity.corrections import unestimated
from taskgroup.affinity.run import probe_cadence
from taskgroup.cli import main
from taskgroup.config import DataConfig, to_mapping
from taskgroup.training.data import data_tasks

#: one task of each of three types: every (source type, target type) block holds one pair
THREE = ["fetal_head", "breast_3cls", "fetal_femur"]  # seg, cls, reg
METHODS = ("lookahead", "gradient", "readout", "attribution")


def test_probe_cadence_keeps_every_unless_the_run_is_too_short():
    assert probe_cadence(150, 27 * 40, 3) == 150  # the default run of 27 tasks: as configured
    assert probe_cadence(300, 27 * 40, 3) == 300  # 3 lookahead probes, the minimum
    assert probe_cadence(150, 3 * 40, 3) == 40  # 3 tasks: 120 steps, probed at 40, 80, 120
    assert probe_cadence(300, 2 * 40, 3) == 26
    assert probe_cadence(50, 2, 3) == 1  # shorter than the minimum: every step


def test_a_block_of_one_pair_is_left_as_measured_and_named():
    a = np.array([[9.0, 1.0, 2.0], [3.0, 9.0, 4.0], [5.0, 6.0, 9.0]])
    types = ["seg", "cls", "reg"]
    for method in ("type_centre", "type_scale"):
        assert np.array_equal(correct(a, types, method), a)  # not the zeros of x - mean(x)
    assert unestimated(a, types, "type_centre") == [
        "seg->cls",
        "seg->reg",
        "cls->seg",
        "cls->reg",
        "reg->seg",
        "reg->cls",
    ]
    assert unestimated(a, types, "none") == []
    # two seg tasks: seg->seg and the seg->cls / cls->seg blocks hold two pairs, cls->cls none
    types = ["seg", "seg", "cls"]
    out = correct(a, types, "type_centre")
    assert out[0, 1] == -1 and out[1, 0] == 1  # {1, 3}: mean 2
    assert out[0, 2] == -1 and out[1, 2] == 1  # {2, 4}: mean 3
    assert out[2, 0] == -0.5 and out[2, 1] == 0.5  # {5, 6}: mean 5.5
    assert unestimated(a, types, "type_centre") == []
    # the task level of type_task_centre needs three tasks
    two = np.array([[1.0, 2.0], [5.0, 1.0]])
    assert np.array_equal(correct(two, ["seg", "cls"], "type_task_centre"), two)
    assert unestimated(two, ["seg", "cls"], "type_task_centre") == ["seg->cls", "cls->seg", "task level"]
    assert unestimated(two, ["seg", "seg"], "type_task_centre") == ["task level"]  # seg->seg: 2 pairs


@pytest.fixture(scope="module")
def three_root(tiny_synth, tmp_path_factory):
    return make_subset_root(tiny_synth, tmp_path_factory.mktemp("three") / "root", THREE)


def test_data_tasks_are_the_tasks_with_rows_in_train_and_val(
    tiny_synth, three_root, registry, tmp_path, capsys
):
    from rich.console import Console

    cfg = tiny_config(three_root).data
    console = Console(file=None)
    chosen = data_tasks(cfg, registry, console=console)
    assert chosen == [t for t in registry.ids if t in THREE]  # registry order
    assert "tasks found in" in capsys.readouterr().out
    assert data_tasks(cfg, registry, ["breast_3cls"]) == ["breast_3cls"]  # --tasks narrows
    assert data_tasks(DataConfig(), registry) == list(registry.ids)  # the synthetic benchmark
    # a task with rows in train only is left out (it could not be evaluated), and said so
    lopsided = make_subset_root(tiny_synth, tmp_path / "lopsided", THREE)
    for csv in (lopsided / "val" / "csv_files").glob("*.csv"):
        if "fetal_femur" in csv.read_text():
            csv.unlink()
    assert data_tasks(tiny_config(lopsided).data, registry, console=console) == ["breast_3cls", "fetal_head"]
    assert "left out, with rows in only one of train/ and val/: fetal_femur" in capsys.readouterr().out


def test_affinity_on_a_root_of_three_tasks_writes_three_by_three_matrices(three_root, tmp_path, capsys):
    # the default probe cadences (every 150, lookahead every 300) and a run of 3 x 4 steps:
    # without the run-length rule no probe would be taken (a KeyError after training)
    cfg = tiny_config(three_root, steps=None, steps_per_task=4, eval_every=100, checkpoint_every=100)
    config = tmp_path / "config.yaml"
    mapping = to_mapping(cfg)
    mapping["affinity"].update(every=150, lookahead_every=300, probe_batch=4, attribution_images=2)
    config.write_text(yaml.safe_dump(mapping))
    out = tmp_path / "aff"
    assert main(["affinity", "--data", str(three_root), "--config", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tasks found in" in printed and "(3 of 27): fetal_femur, breast_3cls, fetal_head" in printed
    assert "validation: val/ root" in printed
    for method in METHODS:
        frame = read_matrix(out / method / "matrix.csv")
        assert list(frame.index) == ["fetal_femur", "breast_3cls", "fetal_head"] == list(frame.columns)
        values = frame.to_numpy()
        off = values[~np.eye(3, dtype=bool)]
        assert np.isfinite(off).all() and np.count_nonzero(off) == 6  # a measurement, not zeros
        meta = json.loads((out / method / "meta.json").read_text())
        assert meta["correction"] == "type_centre"
        assert len(meta["correction_not_estimated"]) == 6  # every block holds one pair
        uncorrected = {"gradient": "cosine"}.get(method, "uncorrected")
        assert np.allclose(
            read_matrix(out / method / f"{uncorrected}.csv").to_numpy(), values, equal_nan=True
        )
    cost = json.loads((out / "lookahead" / "meta.json").read_text())["cost"]
    assert cost["training_steps"] == 12 and cost["probe_every"] == 4 and cost["lookahead_every"] == 4
    assert cost["probes"] == 3  # at steps 4, 8, 12: both probes each time


def test_affinity_with_two_tasks_found_in_the_data(tiny_synth, registry, tmp_path):
    root = make_subset_root(tiny_synth, tmp_path / "two", ["breast_2cls", "IUGC"])
    cfg = tiny_config(root, steps=None, steps_per_task=3, eval_every=100, checkpoint_every=100)
    import dataclasses

    aff = dataclasses.replace(
        cfg.affinity, methods=("lookahead", "gradient"), probe_batch=4, correction="type_task_centre"
    )
    result = run_affinity(dataclasses.replace(cfg, affinity=aff), tmp_path / "aff", registry=registry)
    assert result.tasks == ["IUGC", "breast_2cls"]  # the registry's order
    for method in ("lookahead", "gradient"):
        assert result.matrices[method].shape == (2, 2)
        meta = json.loads((tmp_path / "aff" / method / "meta.json").read_text())
        assert meta["correction_not_estimated"] == ["reg->cls", "cls->reg", "task level"]
        assert meta["cost"]["probe_every"] == 2  # 6 steps, at least 3 probes
    assert np.count_nonzero(result.matrices["gradient"][~np.eye(2, dtype=bool)]) == 2


def test_train_and_compare_of_builtin_groupings_take_the_data_tasks(three_root, tmp_path, monkeypatch):
    import taskgroup.compare.run
    import taskgroup.stages.train

    seen: dict = {}

    def stop(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(taskgroup.stages.train, "train_grouping", stop)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--grouping", "cg", "--data", str(three_root), "--out", str(tmp_path / "t")])
    grouping = seen["args"][1]
    assert sorted(grouping.tasks) == sorted(THREE)  # the clinical groups cut to the root's tasks
    monkeypatch.setattr(taskgroup.compare.run, "resolve_groupings", stop)
    with pytest.raises(KeyboardInterrupt):
        main(["compare", "--data", str(three_root), "--out", str(tmp_path / "c")])
    assert list(seen["args"][2]) == ["fetal_femur", "breast_3cls", "fetal_head"]
