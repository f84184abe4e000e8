"""Leaves nothing behind when a sweep's driver dies: `python -m bso_cache.training.ray_watchdog PID`.

The local Ray cluster a sweep starts (raylet, GCS, agents, the trials' workers) runs in processes
that outlive a driver killed by SIGKILL (a lost terminal, the OOM killer), holding cores and GPU
memory. This watchdog, started by the sweep in a session of its own, keeps a list of the driver's
descendants while it lives (each by its pid and start time, so a reused pid is never taken for
one), and once the driver is gone kills every one of them still running, then exits.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, or None where it is gone."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every process below `root`."""
    children: dict[int, list[int]] = {}
    starts = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry.name))
                starts[int(entry.name)] = st[2]
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found and child != os.getpid():
                found[child] = starts[child]
                todo.append(child)
    return found


def running(pid: int, start: int | None = None) -> bool:
    st = _stat(pid)
    return st is not None and st[1] != "Z" and (start is None or st[2] == start)


def main(driver: int, poll: float = 0.5, give_up: float = 60.0) -> None:
    seen: dict[int, int] = {}
    while running(driver):
        seen.update(descendants(driver))
        time.sleep(poll)
    deadline = time.monotonic() + give_up
    while time.monotonic() < deadline:
        left = [pid for pid, start in seen.items() if running(pid, start)]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(poll)


if __name__ == "__main__":
    main(int(sys.argv[1]))
