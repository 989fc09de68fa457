"""The affinity matrix as a value that travels in memory and knows its file (issue 26).

An :class:`AffinityMatrix` holds the tasks, the values (rows = source, columns = target:
``values[i, j]`` is the effect of source ``tasks[i]`` on target ``tasks[j]``), the method that
measured it, the quantity it is (``"matrix"`` for a method's reported matrix, else the name of
the other quantity, e.g. ``"cosine"`` or ``"conflict"``: the stem of its file) and free-form
meta. Its file is the ``<method>/<quantity>.csv`` of an affinity run: the first header cell says
``source \\ target``, the diagonal is kept. The meta is not written there (``meta.json`` holds
it). Torch-free: numpy and pandas only, so affinity, grouping and compare all import it.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["CORNER", "REPORTED", "AffinityMatrix"]

#: the first header cell of a matrix file
CORNER = "source \\ target"
#: the quantity (and file stem) of a method's reported matrix
REPORTED = "matrix"


@dataclasses.dataclass(frozen=True, eq=False)
class AffinityMatrix:
    """A square matrix over ``tasks`` (source rows, target columns); read-only once made."""

    tasks: tuple[str, ...]
    values: np.ndarray
    method: str
    quantity: str = REPORTED
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        tasks = tuple(str(t) for t in self.tasks)
        if len(set(tasks)) != len(tasks):
            twice = sorted({t for t in tasks if tasks.count(t) > 1})
            raise ValueError(f"affinity matrix {self.method}: task(s) named twice: {', '.join(twice)}")
        values = np.array(self.values)  # a copy: the caller's array stays theirs
        if values.dtype.kind not in "biuf":
            raise ValueError(f"affinity matrix {self.method}: values of dtype {values.dtype} are not numbers")
        if values.shape != (len(tasks), len(tasks)):
            raise ValueError(
                f"affinity matrix {self.method}: values of shape {values.shape} for {len(tasks)} tasks"
            )
        values.setflags(write=False)
        object.__setattr__(self, "tasks", tasks)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "meta", types.MappingProxyType(dict(self.meta)))

    def __len__(self) -> int:
        return len(self.tasks)

    def __repr__(self) -> str:
        return f"AffinityMatrix(method={self.method!r}, quantity={self.quantity!r}, tasks={len(self.tasks)})"

    def frame(self) -> pd.DataFrame:
        """The labelled frame: index and columns the tasks, the index named ``source \\ target``."""
        frame = pd.DataFrame(self.values.copy(), index=list(self.tasks), columns=list(self.tasks))
        frame.index.name = CORNER
        return frame

    def subset(self, tasks: Sequence[str]) -> AffinityMatrix:
        """The matrix over ``tasks`` only, in their order (rows and columns alike)."""
        tasks = list(tasks)
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise KeyError(f"affinity matrix {self.method}: no task(s) {', '.join(map(repr, unknown))}")
        index = [self.tasks.index(t) for t in tasks]
        return dataclasses.replace(self, tasks=tuple(tasks), values=self.values[np.ix_(index, index)])

    def to_csv(self, path: str | Path) -> Path:
        """Write the matrix file (the module doc); returns its path."""
        path = Path(path)
        self.frame().to_csv(path)
        return path

    @classmethod
    def from_csv(
        cls,
        path: str | Path,
        method: str | None = None,
        quantity: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> AffinityMatrix:
        """A matrix file back. ``method`` defaults to the name of its folder, ``quantity`` to the
        stem of its name; ``meta`` records the file as ``source``. A file that is not a matrix
        raises :class:`ValueError` naming it (a missing one :class:`FileNotFoundError`)."""
        path = Path(path)
        try:
            frame = pd.read_csv(path, index_col=0)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except (ValueError, UnicodeDecodeError) as exc:  # pandas' EmptyDataError, ParserError
            raise ValueError(f"{path}: not an affinity matrix ({exc})") from None
        if frame.index.name != CORNER:
            raise ValueError(f"{path}: not an affinity matrix (its first header cell is not {CORNER!r})")
        if list(frame.index) != list(frame.columns):
            raise ValueError(f"{path}: rows and columns name different tasks")
        wrong = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
        if wrong:
            raise ValueError(f"{path}: column {wrong[0]!r} holds entries that are not numbers")
        return cls(
            tuple(frame.index),
            frame.to_numpy(),
            method if method is not None else path.parent.name,
            quantity if quantity is not None else path.stem,
            {"source": str(path), **(meta or {})},
        )
