"""Paths relative to a work root, so that workers on other machines share one job queue.

A queue created with ``--work-root R`` stores every path of its config (data root, test root,
pretrained weights, ...) and its work folder that lies under ``R`` as ``{work_root}/<relative
path>``; a worker given ``--work-root W`` (its own mount of the same files) reads them as
``W/<relative path>``. Paths outside ``R`` are stored as they are (each machine must then see
them at that path). While a worker trains, :func:`active` holds ``W``, and a network's identity
(:func:`taskgroup.training.run.network_config`, the hash that names its folder) is taken with
the paths under ``W`` marked again, so every machine computes the same folder names and
accepts the folders the others wrote. Without a work root nothing changes (the hashes of every
existing network folder stay as they are).

Hand-written: a few lines of path rewriting that no library does for a config mapping.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from taskgroup.errors import ConfigError

MARK = "{work_root}"
_ACTIVE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("work_root", default=None)


def _under(value: str, root: Path) -> str | None:
    """``value``'s path relative to ``root`` when it is an absolute path under it, else None."""
    if not os.path.isabs(value):
        return None
    path = os.path.normpath(value)
    base = os.path.normpath(str(root))
    try:
        common = os.path.commonpath([base, path])
    except ValueError:
        return None
    return os.path.relpath(path, base) if common == base else None


def mark(value: Any, root: str | Path) -> Any:
    """``value`` (a config mapping, list or string) with every absolute path under ``root``
    (as given, or with its symbolic links resolved) written ``{work_root}/<relative>``.
    Relative paths are left as they are: give the data root as an absolute path."""
    roots = tuple(dict.fromkeys([Path(os.path.abspath(root)), Path(root).resolve()]))
    return _mark(value, roots)


def _mark(value: Any, roots: tuple[Path, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _mark(v, roots) for k, v in value.items()}
    if isinstance(value, list):
        return [_mark(v, roots) for v in value]
    if isinstance(value, str):
        for root in roots:
            relative = _under(value, root)
            if relative is not None:
                return MARK if relative == "." else f"{MARK}/{Path(relative).as_posix()}"
    return value


def is_marked(value: Any) -> bool:
    if isinstance(value, dict):
        return any(is_marked(v) for v in value.values())
    if isinstance(value, list):
        return any(is_marked(v) for v in value)
    return isinstance(value, str) and (value == MARK or value.startswith(MARK + "/"))


def resolve(value: Any, root: str | Path | None, where: str = "the queue") -> Any:
    """``value`` with every ``{work_root}/<relative>`` read under ``root``; a marked value
    without a root is an error naming ``where``."""
    if isinstance(value, dict):
        return {k: resolve(v, root, where) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, root, where) for v in value]
    if isinstance(value, str) and is_marked(value):
        if root is None:
            raise ConfigError(
                f"{where} stores its paths relative to a work root ({value}): give the worker "
                "--work-root DIR, the folder that holds them on this machine"
            )
        return str(Path(root).resolve() / value[len(MARK) :].lstrip("/"))
    return value


@contextlib.contextmanager
def active(root: str | Path | None) -> Iterator[None]:
    """While inside, network identities mark the paths under ``root`` (None: no change)."""
    token = _ACTIVE.set(Path(root).resolve() if root is not None else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """A network config as its identity: the paths under the active work root marked."""
    root = _ACTIVE.get()
    return config if root is None else mark(config, root)
