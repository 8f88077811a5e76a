"""Crash-safe writes shared by the store, checkpoints and reports: after a crash a reader finds the
old file or the whole new one, never a torn one."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, data: bytes) -> None:
    """Writes `path` via a temporary name in the same directory (`.NAME.tmp-PID`), fsync, rename,
    fsync of the directory. On any failure (a full disk) the temporary file is removed and the error
    raised; `path` keeps its old content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def remove_stale_temporaries(path: str | Path) -> None:
    """Deletes the temporaries `write_atomic` left for `path` in processes that died mid-write.
    Call it only while holding the lock that makes the caller `path`'s one writer."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        tmp.unlink(missing_ok=True)


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
