"""Where and how computations run: the device chosen at run time, CPU thread settings."""

from __future__ import annotations

import os

import torch

# Several processes sharing one machine (parallel test workers, several runs side by side) cap
# each one's torch threads with this variable; it wins over a config's ``train.threads``.
MAX_THREADS_ENV = "TASKGROUP_MAX_THREADS"


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
