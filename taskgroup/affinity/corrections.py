"""Corrections of the task-type confound in gradient-based affinity.

Two heads of the same kind (two segmentation decoders, say) send gradients of the same shape
into the encoder whatever their labels need, so gradient similarity and lookahead transfer rank
same-type pairs high even across unrelated factors (measured while planning: two segmentation
heads on unrelated factors looked more alike than any same-factor pair). The corrections work
on a measured matrix ``A`` (source rows, target columns) and leave its diagonal as it is:

- ``none``: as measured;
- ``type_centre``: subtract, from every off-diagonal entry, the mean of the off-diagonal entries
  of its (source type, target type) block: what is left is transfer beyond what a pair of these
  types shows on average. Works when every type occurs in several groups (the synthetic
  benchmark balances types across its planted groups; FM_UIA has 12 seg, 9 cls, 3 det, 3 reg);
- ``type_scale``: ``type_centre``, then divide each block by the standard deviation of its
  off-diagonal entries, so that types whose probes are louder (segmentation's dense losses) do
  not dominate a partition;
- ``type_task_centre``: ``type_centre``, then remove each task's own level: subtract each
  source's mean over its targets and each target's mean over its sources, add back the overall
  mean (off-diagonal entries, one pass). A task that is near everything (a spread attribution
  map resembles every broad one) says nothing about a pair by that alone.

A block with fewer than two off-diagonal entries cannot be corrected (its mean is its one
value: subtracting it would leave 0, which looks like a result and says nothing): its type
step is skipped (its entries keep their measured level while the other blocks are centred, so
they are not on one scale with them), and :func:`unestimated` names it so that the run can say
so. The task-level step of ``type_task_centre`` still applies to those entries when there are
three tasks or more; with fewer it is skipped too.
The measured effect of each on the synthetic benchmark is in the README (benchmarks/affinity.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CORRECTIONS = ("none", "type_centre", "type_scale", "type_task_centre")


def correct(matrix: np.ndarray, types: Sequence[str], method: str) -> np.ndarray:
    """The corrected copy of ``matrix`` (see the module doc); NaN entries stay NaN."""
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}; valid: {', '.join(CORRECTIONS)}")
    out = np.array(matrix, dtype=float, copy=True)
    if method == "none":
        return out
    types = np.asarray(types)
    off = ~np.eye(len(types), dtype=bool)
    for a in np.unique(types):
        for b in np.unique(types):
            block = np.outer(types == a, types == b) & off & np.isfinite(out)
            if block.sum() < 2:
                continue
            out[block] -= out[block].mean()
            if method == "type_scale":
                std = out[block].std()
                if std > 0:
                    out[block] /= std
    if method == "type_task_centre" and len(types) >= 3:
        values = np.where(off, out, np.nan)
        rows = np.nanmean(values, axis=1, keepdims=True)
        cols = np.nanmean(values, axis=0, keepdims=True)
        out[off] = (out - rows - cols + np.nanmean(values))[off]
    return out


def unestimated(matrix: np.ndarray, types: Sequence[str], method: str) -> list[str]:
    """What ``correct(matrix, types, method)`` leaves as measured because it cannot be
    estimated: each (source type, target type) block with an off-diagonal entry but fewer than
    two, as ``"seg->cls"``, and ``"task level"`` for ``type_task_centre`` on fewer than three
    tasks. Empty for ``none``."""
    if method == "none":
        return []
    types = np.asarray(types)
    values = np.isfinite(np.asarray(matrix, dtype=float)) & ~np.eye(len(types), dtype=bool)
    left = [
        f"{a}->{b}"
        for a in dict.fromkeys(types.tolist())
        for b in dict.fromkeys(types.tolist())
        if values[np.outer(types == a, types == b)].sum() == 1
    ]
    if method == "type_task_centre" and len(types) < 3:
        left.append("task level")
    return left
