"""Where and how computations run: the device chosen at run time, CPU thread settings, and the
files a run writes and reads back.

Files: every artefact is written atomically (:func:`atomic_write`: a temporary file in the same
folder, fsync, ``os.replace``), so a kill or a full disk leaves the previous file as it was and
the error names the file and the reason. Checkpoints hold only tensors, numbers, strings and
lists, tuples and dicts of them (:func:`encode_state` turns numpy arrays into tensors), and are
read with ``torch.load(weights_only=True)`` (:func:`load_state`), which refuses any file that
would run code when unpickled; a checkpoint of an older taskgroup (numpy arrays pickled as
such) is read with numpy's array constructors allowed and nothing else, and rewritten in the
new form. A run folder is written by one process at a time (:func:`lock_folder`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import pickle
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from taskgroup.errors import TaskgroupError
from taskgroup.files import MAX_THREADS_ENV as MAX_THREADS_ENV  # re-exported: where callers import them
from taskgroup.files import WriteError as WriteError
from taskgroup.files import atomic_write as atomic_write
from taskgroup.files import atomic_write_bytes as atomic_write_bytes
from taskgroup.files import atomic_write_text as atomic_write_text
from taskgroup.files import remove_temporaries as remove_temporaries
from taskgroup.files import temporary_name as temporary_name
from taskgroup.files import thread_cap
from taskgroup.locks import FolderLocked as FolderLocked  # re-exported: where callers import them
from taskgroup.locks import LockUnavailable as LockUnavailable
from taskgroup.locks import hold_lock
from taskgroup.locks import timestamp as timestamp

log = logging.getLogger("taskgroup")

#: the lock of a folder written by one process at a time, and the file naming its holder
LOCK_NAME = ".taskgroup.lock"
HOLDER_NAME = LOCK_NAME + ".json"  # locks.holder_path

#: how :func:`encode_state` marks a numpy array (or scalar) turned into a tensor
NUMPY_TAG = "__numpy__"


class CheckpointError(TaskgroupError):
    """A checkpoint file cannot be read, or holds more than tensors and plain containers."""


def pick_device(preference: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else the CPU; or a device name (``cpu``, ``cuda:1``)."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {preference!r} asked for, but CUDA is not available here")
    return device


def configure_cpu(threads: int | None = None) -> None:
    """Flush denormals (tiny ViTs on the CPU run 10-80x faster: measured) and set the threads:
    ``threads`` (None: torch's default), at most ``TASKGROUP_MAX_THREADS`` when that is set."""
    torch.set_flush_denormal(True)
    cap = thread_cap()
    if cap is not None:
        threads = min(threads or torch.get_num_threads(), cap)
    if threads:
        torch.set_num_threads(threads)


# -- checkpoints that load without running code ------------------------------------------------
#: the mappings ``torch.load(weights_only=True)`` reads back (a model's ``state_dict`` is an
#: ``OrderedDict`` with ``_metadata``); any other mapping is written as a plain dict
_LOADABLE_MAPPINGS = (dict, collections.OrderedDict)


def encode_state(state: Any, where: str = "state") -> Any:
    """``state`` with every numpy array and scalar as a tagged tensor, so that ``torch.load``
    reads it with ``weights_only=True``; anything that is not a tensor, number, string, bytes,
    None, or a list, tuple or mapping of those is an error naming where it is. Every mapping
    that is not a dict or an OrderedDict (a defaultdict, a Counter, a mapping proxy) becomes a
    plain dict, and every subclass of list or tuple (a named tuple) a plain list or tuple: their
    classes are globals that ``weights_only`` refuses. Containers of plain types without numpy
    values are returned as they are (a model's ``state_dict`` keeps its ``_metadata``)."""
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
        unchanged = all(items[k] is v for k, v in state.items())
        return state if unchanged and type(state) in _LOADABLE_MAPPINGS else dict(items)
    if isinstance(state, list | tuple):
        values = [encode_state(v, f"{where}/{i}") for i, v in enumerate(state)]
        if type(state) in (list, tuple) and all(a is b for a, b in zip(values, state, strict=True)):
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


def _refusal(error: pickle.UnpicklingError) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please|\n\s*\n|$)", str(error), re.S)
    return " ".join(found.group(1).split()) if found else "not a checkpoint"


def _numpy_globals() -> list[Any]:
    """What a checkpoint of an older taskgroup needs besides tensors and plain containers: numpy
    arrays (``np.random.get_state()``'s state, probe values) and scalars, pickled as numpy
    pickles them (``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``, under their numpy 1 and 2
    names, and the classes of the numeric dtypes). None of these runs code: they build an
    array, a dtype or a scalar from its bytes."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray

    found = []
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        found += [
            (multiarray._reconstruct, f"{module}._reconstruct"),
            (multiarray.scalar, f"{module}.scalar"),
        ]
    # a pickled dtype is built (its state set) as an instance of its class: these classes
    # (numpy.dtypes.Float64DType...) of the numeric dtypes only, booleans to complex numbers; an
    # array of python objects (ObjectDType) stays refused
    dtypes = list(dict.fromkeys(type(np.dtype(code)) for code in NUMERIC_DTYPE_CODES))
    return [*found, (np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype"), *dtypes]


#: the numpy type codes of the values a checkpoint holds: bool, (unsigned) integers, floats, complex
NUMERIC_DTYPE_CODES = "?bBhHiIlLqQefdFD"


def _old_format(path: Path) -> bool:
    """Whether ``path`` is a ``torch.save`` file whose only globals beyond ``weights_only``'s are
    numpy's array and scalar constructors (a checkpoint written before :func:`encode_state`):
    its pickle is inspected, never run."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a bare pickle, a truncated file: nothing to migrate
        return False
    allowed = {g[1] for g in _numpy_globals() if isinstance(g, tuple)}
    return bool(unsafe) and set(unsafe) <= allowed


def _migrate(path: Path, map_location: Any) -> Any:
    """Read a checkpoint of an older taskgroup (see :func:`_old_format`) with numpy's array
    constructors allowed and nothing else, check that it holds only what :func:`encode_state`
    writes, and rewrite it in the new form (kept as it is if it cannot be written)."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(path, map_location=map_location, weights_only=True)
        encode_state(state)  # what a checkpoint holds: e.g. no array of python objects
    except OSError:
        raise
    except Exception as exc:
        reason = _refusal(exc) if isinstance(exc, pickle.UnpicklingError) else _first_line(exc)
        raise CheckpointError(
            f"{path}: refused to load: a checkpoint of an older taskgroup holds only tensors, numpy "
            f"arrays of numbers and plain containers ({reason}); delete it to compute what it held again"
        ) from None
    try:
        save_state(state, path)
        log.info("%s: rewritten in the checkpoint format of this taskgroup (numpy values as tensors)", path)
    except (WriteError, OSError) as exc:
        log.warning("%s: read in its older format, but not rewritten (%s)", path, exc)
    return state


def load_state(path: str | Path, map_location: Any = "cpu") -> Any:
    """Read a checkpoint written by :func:`save_state` (or a plain ``torch.save`` of tensors)
    with ``weights_only=True``: a file that would import anything else, i.e. could run code when
    unpickled, is refused with a :class:`CheckpointError` naming it, as is a file that is not a
    checkpoint at all. The one exception: a checkpoint of an older taskgroup, whose numpy arrays
    and scalars were pickled as such, is read with numpy's array and scalar constructors allowed
    (and nothing else) and rewritten in the new form, so an interrupted run keeps its progress."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning adds nothing here
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if _old_format(path):
            return decode_state(_migrate(path, map_location))
        reason = _refusal(exc)
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
@contextlib.contextmanager
def lock_folder(folder: str | Path) -> Iterator[None]:
    """Hold ``folder``'s lock while writing it: a second process fails at once with a
    :class:`FolderLocked` naming the holder (pid, host, start, in ``.taskgroup.lock.json``) instead
    of writing the same files. The operating system frees the lock when its holder dies.

    The lock is an ``flock`` lock on ``.taskgroup.lock``, never a "soft" lock (a file whose mere
    presence locks, which a ``kill -9`` would leave behind for every later run to trip on): a
    file system without ``flock`` (some FUSE and SMB mounts, NFS without its lock service, which
    is also the limit across machines: NFS locks hold between clients only when every client
    mounts with locking and the server runs ``lockd``) is a :class:`LockUnavailable` naming the
    folder and the reason; write the run to a local disk then."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with hold_lock(
        folder / LOCK_NAME,
        busy=lambda holder: (
            f"{folder} is being written by another taskgroup process ({holder}); two processes "
            "writing one folder would both train everything: wait for it to end, or write "
            "somewhere else"
        ),
        unavailable=lambda why: (
            f"{folder}: cannot be locked ({why}): its file system does not lock files (flock), so "
            "two processes could write it at once; write it to a local disk (NFS: only with its "
            "lock service)"
        ),
    ):
        yield
