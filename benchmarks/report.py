"""What the benchmarks share: how every one reports (a rich table on stdout and, with --json, the
same rows in a file), and the AU engine on all tasks that the training benchmarks time."""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import torch
from rich.console import Console
from rich.table import Table

from taskgroup.models import build_model
from taskgroup.runtime import pick_device
from taskgroup.training import Engine


def fail(message: str) -> NoReturn:
    """A benchmark's bad input: the message on stderr and exit code 2, no traceback."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def report(title: str, rows: Sequence[Mapping[str, object]], json_path: Path | None = None) -> None:
    """One table row per measured variant (columns: the keys of the first row)."""
    table = Table(title=title)
    for col in rows[0]:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*[str(v) for v in row.values()])
    Console().print(table)
    if json_path is not None:
        json_path.write_text(json.dumps(list(rows), indent=2))


@contextlib.contextmanager
def au_engine(cfg, registry, data) -> Iterator[Engine]:
    """An Engine training one network on every task of ``registry`` (as `taskgroup train
    --grouping au` builds it), seeded, with a temporary run folder."""
    torch.manual_seed(0)
    model = build_model(cfg.model, list(registry))
    with tempfile.TemporaryDirectory() as tmp:
        yield Engine(
            model,
            data,
            list(registry),
            cfg.train,
            cfg.data,
            Path(tmp),
            "au",
            device=pick_device(cfg.train.device),
        )
