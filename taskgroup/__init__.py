"""taskgroup: which ultrasound imaging tasks should be trained together.

A research framework around the FM_UIA 2026 challenge: the 27-task registry, the challenge's data
format and official metrics, an embedded synthetic benchmark with a planted task-affinity
structure, and (in later modules) the M2DINO model, one training engine and the task-grouping search.
"""

from __future__ import annotations

__version__ = "0.1.0"
