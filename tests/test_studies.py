"""Studies and notebooks: every study file is valid in every setting; the CI settings of
grouping_search, data_scale and planted_recovery run end to end; both notebooks execute on the
study's output; the command line's overrides win over the study file's."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from nbclient import NotebookClient
from sklearn.metrics import adjusted_rand_score

from taskgroup.config import load_run_config
from taskgroup.data.synthetic import read_truth
from taskgroup.errors import ConfigError
from taskgroup.stages.study import load_study, run_study, stage_overrides

ROOT = Path(__file__).parents[1]
STUDIES = sorted((ROOT / "studies").glob("*.yaml"))


def test_the_four_studies_are_here():
    assert {p.stem for p in STUDIES} == {
        "m2dino_aggregation",
        "grouping_search",
        "data_scale",
        "planted_recovery",
    }


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_every_setting_of_every_study_resolves(path, registry):
    study = load_study(path)
    assert {"tiny", "ci", "full"} <= set(study.settings)
    for name, setting in study.settings.items():
        config = (path.parent / setting.config).resolve()
        assert config.exists(), (name, config)
        # the full setting needs the DINOv3 weights from the command line (configs/full.yaml)
        given = ["model.backbone.pretrained=/w/dinov3_vits16.pth"] if name == "full" else []
        for stage in study.stages:
            # every override names a real key with a valid value
            load_run_config(config, [*stage_overrides(study, setting, stage), *given])
            if name == "full":
                with pytest.raises(ConfigError, match=r"model\.backbone\.pretrained is required"):
                    load_run_config(config, stage_overrides(study, setting, stage))
        unknown = [t for t in setting.tasks if t not in registry]
        assert not unknown, (name, unknown)
    assert study.settings["full"].needs_data


def test_a_study_names_a_missing_setting_and_missing_data(tmp_path):
    path = ROOT / "studies" / "grouping_search.yaml"
    with pytest.raises(ConfigError, match="no setting 'tiyn'; did you mean 'tiny'"):
        run_study(path, "tiyn", tmp_path)
    with pytest.raises(ConfigError, match="setting 'full' runs on real data: give --data ROOT"):
        run_study(path, "full", tmp_path)


def test_the_command_line_wins_over_the_study_file_and_a_sweep_value_over_both():
    path = ROOT / "studies" / "planted_recovery.yaml"
    study = load_study(path)
    ci = study.settings["ci"]
    config = (path.parent / ci.config).resolve()
    studied = load_run_config(config, stage_overrides(study, ci, "affinity"))
    assert (studied.affinity.runs, studied.affinity.steps_per_task) == (2, 10)  # the ci setting's
    assert studied.affinity.attribution_images == 8 and studied.model.backbone.depth == 2  # study, set
    typed = ("affinity.runs=5", "model.backbone.depth=3")
    cfg = load_run_config(config, stage_overrides(study, ci, "affinity", typed))
    assert (cfg.affinity.runs, cfg.affinity.steps_per_task, cfg.model.backbone.depth) == (5, 10, 3)
    swept = load_run_config(config, stage_overrides(study, ci, "affinity", typed, ("affinity.runs=4",)))
    assert swept.affinity.runs == 4


def execute(notebook: Path, study: Path) -> nbformat.NotebookNode:
    book = nbformat.read(notebook, as_version=4)
    assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code"), "committed with outputs"
    cell = next(c for c in book.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = f"STUDY = {str(study)!r}\nREGISTRY = None"
    NotebookClient(
        book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    return book


@pytest.mark.slow
def test_grouping_search_study_runs_end_to_end_and_the_notebooks_execute(tiny_synth, tmp_path):
    out = tmp_path / "study"
    result = run_study(ROOT / "studies" / "grouping_search.yaml", "ci", out, data=tiny_synth)
    assert set(result.seconds) == {
        "grouping_search/affinity",
        "grouping_search/search",
        "grouping_search/compare",
    }
    for method in ("gradient", "readout", "attribution", "pairwise"):
        assert (out / "affinity" / method / "matrix.csv").exists()
    meta = json.loads((out / "search" / "meta.json").read_text())
    assert (
        set(meta["best"]) == set(meta["best_partition"]) == {"gradient", "readout", "attribution", "pairwise"}
    )
    groups = pd.read_csv(out / "compare" / "per_group.csv")
    proposals = {b["name"] for key in ("best", "best_partition") for b in meta[key].values()}
    assert {"cg", "au"} | proposals == set(groups.grouping)  # the proposals against CG and AU
    assert (groups[groups.scope == "all"].seeds == 2).all()
    # what the study shows, recomputed: each grouping's delta_m over all tasks is the mean of its
    # tasks' gains over TS (both seeds hold every task), its negative tasks those below 0
    tasks = pd.read_csv(out / "compare" / "per_task.csv")
    assert (tasks[tasks.grouping == "ts"]["gain"] == 0).all()
    for _, row in groups[groups.scope == "all"].iterrows():
        gains = tasks[tasks.grouping == row["grouping"]]["gain"]
        assert row["negative_tasks"] == int((gains < 0).sum()), row["grouping"]
        if gains.notna().all():
            assert row["delta_m"] == pytest.approx(gains.mean()), row["grouping"]

    negative = execute(ROOT / "notebooks" / "negative_transfer.ipynb", out)
    images = [o for c in negative.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # 2 heatmaps, received, type sensitivity, delta_m, negative, gains
    methods = execute(ROOT / "notebooks" / "affinity_methods.ipynb", out)
    text = "".join(
        o.get("data", {}).get("text/plain", "") for c in methods.cells for o in c.get("outputs", [])
    )
    assert "gradient" in text and "spearman" in text


@pytest.mark.slow
def test_data_scale_study_sweeps_the_training_fraction(tiny_synth, tmp_path):
    out = tmp_path / "scale"
    run_study(ROOT / "studies" / "data_scale.yaml", "ci", out, data=tiny_synth)
    sweep = pd.read_csv(out / "sweep.csv")
    assert sorted(sweep["data.train_fraction"].unique()) == [0.5, 1.0]  # the ci setting's values
    assert {"cg", "au", "best partition (gradient)"} <= set(sweep.grouping)
    assert (out / "sweep.png").stat().st_size > 5000
    sizes = {
        f: json.loads((out / f"data.train_fraction={f:g}" / "compare" / "meta.json").read_text())[
            "train_sizes"
        ]
        for f in (0.5, 1.0)
    }
    for task, full in sizes[1.0].items():
        assert sizes[0.5][task] == max(1, round(0.5 * full)), task
    # what the sweep shows, recomputed: at every fraction each grouping's delta_m over all tasks is
    # the mean of its tasks' gains over TS in that fraction's comparison, the proposals those the
    # fraction's own search chose
    for fraction in (0.5, 1.0):
        folder = out / f"data.train_fraction={fraction:g}"
        tasks = pd.read_csv(folder / "compare" / "per_task.csv")
        rows = sweep[(sweep["data.train_fraction"] == fraction) & (sweep.scope == "all")]
        meta = json.loads((folder / "search" / "meta.json").read_text())
        assert (
            rows.set_index("grouping").loc["best partition (gradient)", "proposal"]
            == (meta["best_partition"]["gradient"]["name"])
        )
        for _, row in rows.iterrows():
            gains = tasks[tasks.grouping == row["proposal"]]["gain"]
            assert len(gains) and row["negative_tasks"] == int((gains < 0).sum()), row["proposal"]
            if gains.notna().all():
                assert row["delta_m"] == pytest.approx(gains.mean()), (fraction, row["proposal"])


#: the tasks of planted_recovery's ci setting (studies/planted_recovery.yaml)
STUDY_CI_TASKS = (
    "breast_lesion",
    "fetal_sacral_pos_cls",
    "thyroid_nodule",
    "liver_lesion_2cls",
    "fetal_head",
    "IUGC",
)


@pytest.mark.slow
def test_planted_recovery_study_runs_with_the_command_line_overrides(tiny_synth, tmp_path):
    out = tmp_path / "recovery"
    path = ROOT / "studies" / "planted_recovery.yaml"
    result = run_study(path, "ci", out, data=tiny_synth, overrides=("affinity.runs=1",))  # ci: 2
    assert set(result.seconds) == {"planted_recovery/affinity", "planted_recovery/search"}
    assert [p.name for p in (out / "affinity").glob("probe_run*")] == ["probe_run"]
    assert [p.parent.name for p in (out / "affinity").glob("*/matrix.csv")] == ["attribution"]
    meta = json.loads((out / "search" / "meta.json").read_text())
    assert set(meta["best"]) == {"attribution"}
    ranking = pd.read_csv(out / "search" / "ranking.csv")
    # what the study must show: every proposal's ARI to the planted groups, recomputed here from
    # the proposal's own grouping file and the benchmark's truth.yaml (TS and AU score 0 by
    # definition), and the best proposal's ARI in meta.json is its row's
    truth = read_truth(tiny_synth)["planted_groups"]
    tasks = sorted(t for ids in truth.values() for t in ids if t in set(STUDY_CI_TASKS))
    planted = [next(g for g, ids in truth.items() if t in ids) for t in tasks]
    by_name = ranking.set_index("name")
    assert by_name.loc["ts", "ari"] == 0 and by_name.loc["au", "ari"] == 0
    checked = 0
    for file in sorted((out / "search" / "proposals").glob("*.yaml")):
        groups = list(yaml.safe_load(file.read_text())["groups"].values())
        if sum(len(g) for g in groups) != len(tasks) or file.stem not in by_name.index:
            continue  # overlapping selections are scored by which network serves a task
        found = [next(k for k, g in enumerate(groups) if t in g) for t in tasks]
        assert by_name.loc[file.stem, "ari"] == pytest.approx(adjusted_rand_score(planted, found)), file.stem
        checked += 1
    assert checked >= 3
    best = meta["best"]["attribution"]["name"]
    assert meta["best_ari"]["attribution"] == pytest.approx(by_name.loc[best, "ari"])
