"""Exclusive locks on folders the package writes: a run folder (one training run at a time) and a
generated data set while it is built (one builder at a time).

A lock is ``fcntl.flock`` on a small file; the kernel drops it when the process ends, however it
ends, so a killed run never leaves a stale lock behind. The file records the holder's pid and host
for the error message. On systems without ``fcntl`` (Windows) the lock is a no-op.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LockedError", "exclusive"]


class LockedError(ValueError):
    """The lock is held by another process."""


@contextmanager
def exclusive(path: str | os.PathLike, *, what: str, wait: bool = False):
    """Hold an exclusive lock on the file ``path`` (created if needed) for the ``with`` block.

    ``wait``: block until the holder releases it; otherwise a held lock is a :class:`LockedError`
    whose message starts with ``what`` (e.g. ``"out: runs/x"``) and names the holder."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            raise LockedError(f"{what} is in use by another process ({holder}); wait for it to finish or "
                              f"choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
