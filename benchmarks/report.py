"""How every benchmark reports: a rich table on stdout and, with --json, the same rows in a file."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table


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
