"""One writer per folder: an exclusive, advisory lock on a dot file inside it.

`flock` is released by the system when the process dies, so a killed build or run never blocks
the next one. The lock file names its holder (pid, host, since when) for the message a second
writer gets.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path


@contextlib.contextmanager
def folder_lock(folder: Path, name: str, *, take: bool = True, refuse):
    """Hold `folder/name` exclusively; `refuse(holder)` makes the error a second writer raises."""
    if not take:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise refuse(holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
