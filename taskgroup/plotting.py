"""What every figure of the package needs: pyplot on the non-interactive backend (figures are
written to files or turned into PNG bytes, never shown), and a symmetric colour range for signed
values."""

from __future__ import annotations

import numpy as np


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, imported on first use (not at package import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def symmetric_limit(values) -> float:
    """The largest finite absolute value (1 when there is none): a diverging colour map centred
    on 0 uses [-limit, +limit]."""
    array = np.asarray(values, dtype=float)
    return float(np.nanmax(np.abs(array))) if np.isfinite(array).any() else 1.0
