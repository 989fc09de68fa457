"""Where and how computations run: the device chosen at run time, CPU thread settings, and the
files a run writes and reads back.

Files: every artefact is written atomically (:func:`atomic_write`: a temporary file in the same
folder, fsync, ``os.replace``), so a kill or a full disk leaves the previous file as it was and
the error names the file and the reason. Checkpoints hold only tensors, numbers, strings and
lists, tuples and dicts of them (:func:`encode_state` turns numpy arrays into tensors), and are
read with ``torch.load(weights_only=True)`` (:func:`load_state`), which refuses any file that
would run code when unpickled. A run folder is written by one process at a time
(:func:`lock_folder`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pickle
import re
import socket
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from filelock import FileLock, Timeout

from taskgroup.errors import TaskgroupError

# Several processes sharing one machine (parallel test workers, several runs side by side) cap
# each one's torch threads with this variable; it wins over a config's ``train.threads``.
MAX_THREADS_ENV = "TASKGROUP_MAX_THREADS"

#: the lock of a folder written by one process at a time, and the file naming its holder
LOCK_NAME = ".taskgroup.lock"
HOLDER_NAME = ".taskgroup.lock.json"

#: how :func:`encode_state` marks a numpy array (or scalar) turned into a tensor
NUMPY_TAG = "__numpy__"


class WriteError(TaskgroupError):
    """A file could not be written (full disk, file size limit, permissions)."""


class CheckpointError(TaskgroupError):
    """A checkpoint file cannot be read, or holds more than tensors and plain containers."""


class FolderLocked(TaskgroupError):
    """Another process holds the lock of a folder it writes."""


def pick_device(preference: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else the CPU; or a device name (``cpu``, ``cuda:1``)."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {preference!r} asked for, but CUDA is not available here")
    return device


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


def configure_cpu(threads: int | None = None) -> None:
    """Flush denormals (tiny ViTs on the CPU run 10-80x faster: measured) and set the threads:
    ``threads`` (None: torch's default), at most ``TASKGROUP_MAX_THREADS`` when that is set."""
    torch.set_flush_denormal(True)
    cap = thread_cap()
    if cap is not None:
        threads = min(threads or torch.get_num_threads(), cap)
    if threads:
        torch.set_num_threads(threads)


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


def _reason(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else str(error)


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
                f"{path}: could not be written ({_reason(error)}); the previous file, if any, is left as it was"
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


def remove_temporaries(folder: Path) -> None:
    """Remove the temporary files of writes that a killed process left in ``folder`` (the caller
    is the folder's only writer)."""
    for tmp in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


# -- checkpoints that load without running code ------------------------------------------------
def encode_state(state: Any, where: str = "state") -> Any:
    """``state`` with every numpy array and scalar as a tagged tensor, so that ``torch.load``
    reads it with ``weights_only=True``; anything that is not a tensor, number, string, bytes,
    None, or a list, tuple or dict of those is an error naming where it is. Containers without
    numpy values are returned as they are (a model's ``state_dict`` keeps its ``_metadata``)."""
    if isinstance(state, np.ndarray | np.generic):  # before float: np.float64 is a float
        array = np.asarray(state)
        if array.dtype.kind not in "biufc":
            raise TypeError(f"{where}: a numpy array of dtype {array.dtype} cannot be checkpointed")
        tensor = torch.from_numpy(np.array(array, order="C"))  # a copy (ascontiguousarray makes 0-d 1-d)
        return {NUMPY_TAG: tensor, "scalar": True} if isinstance(state, np.generic) else {NUMPY_TAG: tensor}
    if isinstance(state, torch.Tensor | str | bytes | bool | int | float | type(None)):
        return state
    if isinstance(state, Mapping):
        if NUMPY_TAG in state:
            raise TypeError(f"{where}: the key {NUMPY_TAG!r} is reserved")
        items = {k: encode_state(v, f"{where}/{k}") for k, v in state.items()}
        return state if all(items[k] is v for k, v in state.items()) else dict(items)
    if isinstance(state, list | tuple):
        values = [encode_state(v, f"{where}/{i}") for i, v in enumerate(state)]
        if all(a is b for a, b in zip(values, state, strict=True)):
            return state
        return tuple(values) if isinstance(state, tuple) else values
    raise TypeError(
        f"{where}: a {type(state).__name__} cannot be checkpointed (a checkpoint holds tensors, numpy "
        "arrays, numbers, strings and lists, tuples and dicts of them)"
    )


def decode_state(state: Any) -> Any:
    """The inverse of :func:`encode_state`: tagged tensors back to numpy arrays and scalars."""
    if isinstance(state, Mapping):
        if NUMPY_TAG in state and set(state) <= {NUMPY_TAG, "scalar"}:
            array = state[NUMPY_TAG].cpu().numpy()
            return array[()] if state.get("scalar") else array
        items = {k: decode_state(v) for k, v in state.items()}
        return state if all(items[k] is v for k, v in state.items()) else dict(items)
    if isinstance(state, list | tuple):
        values = [decode_state(v) for v in state]
        if all(a is b for a, b in zip(values, state, strict=True)):
            return state
        return tuple(values) if isinstance(state, tuple) else values
    return state


def save_state(state: Any, path: str | Path) -> Path:
    """Write a checkpoint atomically, numpy values encoded (see :func:`encode_state`)."""
    encoded = encode_state(state)
    return atomic_write(path, lambda file: torch.save(encoded, file))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def load_state(path: str | Path, map_location: Any = "cpu") -> Any:
    """Read a checkpoint written by :func:`save_state` (or a plain ``torch.save`` of tensors)
    with ``weights_only=True``: a file that would import anything else, i.e. could run code when
    unpickled, is refused with a :class:`CheckpointError` naming it, as is a file that is not a
    checkpoint at all."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning adds nothing here
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please|\n\s*\n|$)", str(exc), re.S)
        reason = " ".join(found.group(1).split()) if found else "not a checkpoint"
        raise CheckpointError(
            f"{path}: refused to load: it holds more than tensors and plain containers, and "
            f"unpickling it could run code ({reason}). taskgroup never writes such a file: if it "
            "comes from an older taskgroup, delete it (what it held is then computed again); "
            "otherwise do not trust it"
        ) from None
    except OSError:
        raise
    except Exception as exc:  # torch's readers fail in many ways on a truncated or foreign file
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or another format: {_first_line(exc)}); "
            "delete it to compute what it held again"
        ) from None
    return decode_state(state)


def non_finite(state: Any, where: str = "") -> list[str]:
    """Where ``state`` holds a floating-point tensor with a NaN or infinite value."""
    if isinstance(state, torch.Tensor):
        if (state.is_floating_point() or state.is_complex()) and not bool(torch.isfinite(state).all()):
            return [where or "tensor"]
        return []
    if isinstance(state, Mapping):
        return [w for k, v in state.items() for w in non_finite(v, f"{where}.{k}" if where else str(k))]
    if isinstance(state, list | tuple):
        return [w for i, v in enumerate(state) for w in non_finite(v, f"{where}.{i}" if where else str(i))]
    return []


# -- one writer per folder ---------------------------------------------------------------------
def _holder(folder: Path) -> str:
    """Who holds ``folder``'s lock, as its holder file says."""
    try:
        found = json.loads((folder / HOLDER_NAME).read_text())
        return f"pid {found['pid']} on {found['host']}, since {found['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"unknown holder: see {folder / LOCK_NAME}"


@contextlib.contextmanager
def lock_folder(folder: str | Path) -> Iterator[None]:
    """Hold ``folder``'s lock while writing it: a second process fails at once with a
    :class:`FolderLocked` naming the holder (pid, host, start, in ``.taskgroup.lock.json``) instead
    of writing the same files. The operating system frees the lock when its holder dies."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FolderLocked(
            f"{folder} is being written by another taskgroup process ({_holder(folder)}); two "
            "processes writing one folder would both train everything: wait for it to end, or "
            "write somewhere else"
        ) from None
    holder = folder / HOLDER_NAME
    try:
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": since, "argv": sys.argv}
        atomic_write_text(holder, json.dumps(record, indent=1))
        yield
    finally:
        with contextlib.suppress(OSError):
            holder.unlink()
        lock.release()
