"""Locks held by one process: a run folder's, a cache entry's builder's, a search study's.

Each is an ``flock`` lock (:mod:`filelock`, never its "soft" fallback: a file whose mere
presence locks, which a ``kill -9`` would leave behind for every later process to trip on); the
operating system frees it when its holder dies. Beside the lock file ``<lock>.json`` names the
holder (pid, host, start) for the message another process shows. A file system without ``flock``
(some FUSE and SMB mounts, NFS without its lock service, which is also the limit across
machines) is a :class:`LockUnavailable`.

Torch-free (the grouping library uses it), so it holds the two error types that
:mod:`taskgroup.runtime` re-exports.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from taskgroup.errors import TaskgroupError
from taskgroup.files import atomic_write_text, reason


class FolderLocked(TaskgroupError):
    """Another process holds a lock this one needs (a folder it writes, a cache entry it
    builds, a study it runs)."""


class LockUnavailable(TaskgroupError):
    """A folder's file system cannot lock files (no ``flock``), so it cannot be locked safely."""


def timestamp() -> str:
    """Now, in local time with its offset, to the second (``2026-12-03T20:01:27+00:00``): the
    time of a lock's holder, of a config change."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def holder_path(lock: Path) -> Path:
    """The file naming the holder of ``lock``."""
    return lock.with_name(lock.name + ".json")


def holder(lock: Path) -> str | None:
    """Who holds ``lock`` (``pid P on HOST, since T``), as its holder file says; None when the
    file is missing or unreadable (the holder is writing it, or it is gone)."""
    try:
        found = json.loads(holder_path(lock).read_text())
        return f"pid {found['pid']} on {found['host']}, since {found['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def hold_lock(
    lock: Path,
    busy: Callable[[str], str],
    unavailable: Callable[[str], str],
    wait: float = 0.0,
    waiting: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the ``flock`` lock at ``lock`` while the block runs, its holder named beside it.

    If another process holds it: with ``wait`` 0 (the default) fail at once, else call
    ``waiting(holder)`` and wait up to ``wait`` seconds; then a :class:`FolderLocked` with the
    message ``busy(holder)``. A file system that cannot lock is a :class:`LockUnavailable` with
    ``unavailable(reason)``."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    file_lock = FileLock(str(lock), fallback_to_soft=False)

    def named() -> str:
        return holder(lock) or f"unknown holder: see {lock}"

    try:
        try:
            file_lock.acquire(timeout=0)
        except Timeout:
            if wait <= 0:
                raise
            if waiting is not None:
                waiting(named())
            file_lock.acquire(timeout=wait)
    except Timeout:
        raise FolderLocked(busy(named())) from None
    except OSError as exc:
        raise LockUnavailable(unavailable(reason(exc))) from None
    record = holder_path(lock)
    try:
        holder_record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": timestamp(),
            "argv": sys.argv,
        }
        with contextlib.suppress(OSError):  # it only informs another process's message
            atomic_write_text(record, json.dumps(holder_record))
        yield
    finally:
        with contextlib.suppress(OSError):
            record.unlink()
        file_lock.release()
