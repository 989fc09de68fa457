"""The lock of a cache entry's builder (taskgroup/training/data.py build_lock): a hard flock lock
whose wait ends in an error naming the lock file and its holder, never a soft lock."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from taskgroup.runtime import FolderLocked, LockUnavailable
from taskgroup.training.data import build_lock, generate_once


def test_a_build_lock_held_too_long_names_the_lock_file_and_its_holder(tmp_path):
    target = tmp_path / "cache" / "synthetic"
    held, free = threading.Event(), threading.Event()

    def builder() -> None:  # another holder (flock locks of two open files conflict)
        with build_lock(target):
            held.set()
            free.wait(30)

    thread = threading.Thread(target=builder)
    thread.start()
    try:
        assert held.wait(30)
        lock = tmp_path / "cache" / ".synthetic.lock"
        with (
            pytest.raises(FolderLocked, match=rf"{lock}: still held after 0 s by pid {os.getpid()} on "),
            build_lock(target, timeout=0.2),
        ):
            pass
    finally:
        free.set()
        thread.join()
    assert generate_once(target, lambda tmp: tmp.mkdir()) == target  # freed with its holder
    assert sorted(p.name for p in target.parent.iterdir()) == [".synthetic.lock", "synthetic"]


def test_a_file_system_without_flock_is_a_clear_error_for_a_build_too(tmp_path, monkeypatch):
    import filelock._native._unix as unix_lock

    def no_flock(fd):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(unix_lock, "lock_fd_nonblocking", no_flock)
    target = tmp_path / "cache" / "synthetic"
    with pytest.raises(
        LockUnavailable, match=r"\.synthetic\.lock: cannot be locked \(Function not implemented\)"
    ):
        generate_once(target, lambda tmp: tmp.mkdir())
    assert not target.exists() and not (tmp_path / "cache" / ".synthetic.lock.json").exists()
