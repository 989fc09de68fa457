"""Learnability of the synthetic benchmark: every task's validation metric after a training run
against its data-only baseline (issue 2's calibration), as a markdown table.

    python benchmarks/calibration.py RUN [--step N]

RUN is a `taskgroup train` run folder (default config: `taskgroup train --grouping au --out RUN`).
"Clearly above" uses taskgroup.evaluation.clear_margin (two standard errors for accuracy, 0.1 of
DSC/IoU, 20 % of MRE); tests/test_calibration.py asserts it for every task.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from taskgroup.training.calibration import calibration_markdown, calibration_table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("--step", type=int, default=None)
    args = parser.parse_args()
    print(calibration_markdown(calibration_table(args.run, args.step)))


if __name__ == "__main__":
    main()
