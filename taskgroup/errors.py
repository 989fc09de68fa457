"""Exceptions of taskgroup: each says which file, row and task is at fault."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TaskgroupError(Exception):
    """Base class of the errors taskgroup raises on bad input."""


class ConfigError(TaskgroupError, ValueError):
    """A configuration or registry file is malformed."""


class DataError(TaskgroupError, ValueError):
    """A dataset row, image, mask or prediction is malformed."""


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """A suffix for "unknown X" messages: the closest valid names, or the list of valid ones."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    if close:
        return f"did you mean {', '.join(repr(c) for c in close)}?"
    return f"valid: {', '.join(valid)}"
