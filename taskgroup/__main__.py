"""``python -m taskgroup ...`` (as ``torchrun -m taskgroup train ...`` needs)."""

from taskgroup.cli import run

run()
