"""Start-up wall time of the commands that train nothing (issue 26: ``taskgroup --help`` and
``taskgroup tasks`` under 1.5 s on this machine, no torch unless a command needs it).

    python benchmarks/cli_startup.py [--runs 5] [--data ROOT] [--target 1.5] [--check] [--json FILE]

Each command is run once to warm up (disk cache; ``tasks --data`` records the decoded files in
the default cache), then ``--runs`` times through the installed ``taskgroup`` script: the median,
min and max wall time of the whole process. One more run through a ``python -c`` wrapper says
whether the command imported torch (``'torch' in sys.modules`` at exit). ``tasks --data`` reads
the tiny synthetic benchmark, generated into a temporary folder unless ``--data`` names a root.
With ``--check``, exit code 1 when a median is above ``--target``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from report import fail, report

# the command's process, telling at exit whether torch was imported (SystemExit included)
WRAPPER = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("\\ntorch-imported=%s\\n" % ("torch" in sys.modules)))
sys.argv = ["taskgroup", *sys.argv[1:]]
from taskgroup.cli import run
run()
"""


def script() -> Path:
    """The installed ``taskgroup`` command beside this interpreter."""
    path = Path(sys.executable).parent / "taskgroup"
    if not path.exists():
        fail(f"{path}: no taskgroup command beside {sys.executable} (pip install -e .)")
    return path


def wall_time(argv: Sequence[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        fail(f"{' '.join(argv)}: exit code {result.returncode}\n{result.stderr}")
    return seconds


def imports_torch(args: Sequence[str]) -> bool:
    result = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True)
    if result.returncode != 0 or "torch-imported=" not in result.stderr:
        fail(f"taskgroup {' '.join(args)}: exit code {result.returncode}\n{result.stderr}")
    return result.stderr.rsplit("torch-imported=", 1)[1].strip() == "True"


def measure(args: Sequence[str], runs: int, target: float) -> dict[str, object]:
    command = [str(script()), *args]
    wall_time(command)  # warm-up
    times = [wall_time(command) for _ in range(runs)]
    median = statistics.median(times)
    return {
        "command": " ".join(["taskgroup", *(a if not Path(a).is_absolute() else "ROOT" for a in args)]),
        "runs": runs,
        "median s": round(median, 2),
        "min s": round(min(times), 2),
        "max s": round(max(times), 2),
        "torch imported": imports_torch(args),
        f"under {target:g} s": median < target,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data", type=Path, default=None, help="FM_UIA root (default: tiny synthetic)")
    parser.add_argument("--target", type=float, default=1.5, help="seconds (issue 26)")
    parser.add_argument("--check", action="store_true", help="exit code 1 when a median is over --target")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.runs < 1:
        fail("--runs must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            root = Path(tmp) / "synth"
            wall_time([str(script()), "synth", "--out", str(root), "--scale", "tiny", "--workers", "1"])
        elif not root.is_dir():
            fail(f"--data {root}: no such folder")
        rows = [
            measure(command, args.runs, args.target)
            for command in (["--help"], ["tasks"], ["tasks", "--data", str(root.resolve())])
        ]
    report(f"CLI start-up, wall time over {args.runs} runs (target {args.target:g} s)", rows, args.json)
    if args.check and not all(row[f"under {args.target:g} s"] for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
