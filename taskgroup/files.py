"""Files written whole or not at all, and the process-wide thread cap: what every layer needs
and none of it torch (the data reader and the grouping library import it; so does
:mod:`taskgroup.runtime`, which re-exports it where callers have always imported it)."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from taskgroup.errors import TaskgroupError


def reason(error: OSError) -> str:
    """An OS error's reason in words (``No locks available``), without the errno prefix."""
    return os.strerror(error.errno) if error.errno else str(error)


# Several processes sharing one machine (parallel test workers, several runs side by side) cap
# each one's torch threads with this variable; it wins over a config's ``train.threads``.
MAX_THREADS_ENV = "TASKGROUP_MAX_THREADS"


class WriteError(TaskgroupError):
    """A file could not be written (full disk, file size limit, permissions)."""


def thread_cap() -> int | None:
    """The ``TASKGROUP_MAX_THREADS`` cap on a process's torch threads (None: no cap)."""
    value = os.environ.get(MAX_THREADS_ENV, "").strip()
    if not value:
        return None
    try:
        cap = int(value)
    except ValueError:
        cap = 0
    if cap < 1:
        raise ValueError(f"{MAX_THREADS_ENV}={value!r}: expected a whole number of threads >= 1")
    return cap


# -- atomic writes ---------------------------------------------------------------------------
class _RecordingFile:
    """A binary file that remembers the OS error of a failed write: ``torch.save`` reports one as
    a ``RuntimeError`` naming neither the file nor the reason."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (the folder's entry); not every file system allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_name(path: Path) -> Path:
    """The temporary file :func:`atomic_write` writes ``path`` through (hidden, ``.tmp``)."""
    return path.parent / f".{path.name}.{os.getpid()}.tmp"


def atomic_write(path: str | Path, write: Callable[[Any], object]) -> Path:
    """Write ``path`` through ``write(file)``: into a temporary file in the same folder, fsynced,
    then renamed over ``path``, so readers (and a later run) see the previous file or the whole
    new one, never a part. On any failure the temporary file is removed; an OS error (a full
    disk, ``ulimit -f``) becomes a :class:`WriteError` naming ``path`` and the reason."""
    path = Path(path)
    tmp = temporary_name(path)
    recording: _RecordingFile | None = None
    try:
        # os.open applies the umask (mkstemp would make every artefact private to its owner)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "wb") as file:
            recording = _RecordingFile(file)
            write(recording)
            recording.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        error = recording.error if recording is not None and recording.error else exc
        if isinstance(error, OSError):
            raise WriteError(
                f"{path}: could not be written ({reason(error)}); the previous file, if any, is left as it was"
            ) from error
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """``data`` into ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda file: file.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) into ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


_TEMPORARY_PID = re.compile(r"\.(\d+)\.tmp$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def remove_temporaries(folder: Path) -> None:
    """Remove the temporary files of writes that a killed process left in ``folder``. The caller
    holds the folder's lock (:func:`lock_folder`), so no other taskgroup process writes there;
    even so a temporary file of a live process of this machine (its pid is in the name) is left
    alone, only those of this process and of processes that are gone are removed."""
    for tmp in Path(folder).glob(".*.tmp"):
        found = _TEMPORARY_PID.search(tmp.name)
        pid = int(found.group(1)) if found else None
        if pid is not None and pid != os.getpid() and _process_alive(pid):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
