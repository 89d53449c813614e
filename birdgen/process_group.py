"""Watch a child process and its process group without reaping the leader too early.

Why: a server started in its own session is stopped by signalling its group, whose id is the leader's
pid. Leaving the exited leader unreaped keeps that pid reserved until the group is swept, and waiting
for the group's live members to be gone is what frees its ports and GPU memory. Stdlib only.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

__all__ = ["exit_status", "live_group_members", "wait_exit_unreaped", "wait_group_gone"]


def exit_status(pid: int) -> int | None:
    """Exit code of our child ``pid`` if it has exited, else None, without reaping it (WNOWAIT).

    Why: an exited-but-unreaped child keeps its pid, so the pid (= our process-group id) cannot be reused
    by a stranger before the caller has swept the group (``os.killpg``).
    """
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return -1  # already reaped elsewhere
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def wait_exit_unreaped(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` for our child ``pid`` to exit, leaving it unreaped; True if it has."""
    deadline = time.monotonic() + timeout
    while exit_status(pid) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def live_group_members(pgid: int) -> list[int]:
    """Pids of process group ``pgid`` that are still running (zombies excluded: they hold no resources).

    Why not ``killpg(pgid, 0)``: a killed member (a python-backend stub, say) is reparented to pid 1 and
    stays a zombie until pid 1 reaps it, which some init processes do only every second or two.
    """
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp ...
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(stat.parent.name))
    return members


def wait_group_gone(pgid: int, timeout: float) -> bool:
    """Wait until no live process of group ``pgid`` is left (ports and GPU memory are free then)."""
    deadline = time.monotonic() + timeout
    while live_group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
