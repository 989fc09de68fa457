"""Issue 2's calibration: after the default AU training (configs/tiny.yaml, the embedded
synthetic benchmark, the synthetic-pretrained encoder, all built from nothing in a fresh cache),
every task's validation metric is clearly above its data-only baseline. The longest test of the
suite (about 6 minutes on 2 cores): it is the default run a new user makes."""

from __future__ import annotations

import pytest
from fixtures import TINY_CONFIG

from taskgroup.cli import main
from taskgroup.training.calibration import calibration_markdown, calibration_table


@pytest.mark.slow
def test_default_au_run_learns_every_task(tmp_path, default_cache):
    run = tmp_path / "au"
    code = main(
        [
            "train",
            "--grouping",
            "au",
            "--config",
            str(TINY_CONFIG),
            "--out",
            str(run),
            "--set",
            f"data.cache_dir={default_cache}",
        ]
    )
    assert code == 0
    table = calibration_table(run)
    assert len(table) == 27
    missed = table[~table.clear]
    assert missed.empty, "not clearly above the data-only baseline:\n" + calibration_markdown(table)
