"""One writer per directory: an exclusive, non-blocking `flock` held for as long as the writer runs.

    lock = hold_lock(out / ".rank-00000.lock", "dump rank 0 of 2")   # raises LockHeld if taken
    ...
    lock.release()                                                   # or: with hold_lock(...):

The kernel drops a flock when its process dies (kill -9 included), so a lock is never stale; the
file only keeps the last holder's pid, host and start time, which the refusal message names. Works
wherever flock works across the processes involved (local disks; NFS needs a mount with locks).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path


class LockHeld(Exception):
    """Another live process holds the lock; the message names it (pid, host, since when)."""


class ProcessLock:
    """A held lock; `release()` (or leaving the `with` block, or the process ending) frees it."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "ProcessLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold_lock(path: str | Path, what: str) -> ProcessLock:
    """Takes the exclusive lock `path` for `what` (e.g. "dump rank 0", "training run"), without waiting.

    Raises:
        LockHeld: a live process holds it: "PATH: WHAT is already running (pid P on host H since T);
            wait for it to finish or stop it; two writers would corrupt each other's files".
        OSError: the lock file cannot be created (read-only or full disk): the caller words it.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise LockHeld(f"{path}: {what} is already running ({holder}); wait for it to finish or stop it - two "
                       f"writers on one directory would corrupt each other's files") from None
    except BaseException:
        os.close(fd)
        raise
    try:
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "what": what})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (info + "\n").encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return ProcessLock(path, fd)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on host {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written its name yet
        return "another process; its pid is not recorded yet"
