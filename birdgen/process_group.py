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

__all__ = ["dead_stubs", "exit_status", "live_group_members", "wait_exit_unreaped", "wait_group_gone"]

SERVER_NAME = "tritonserver"
STUB_NAME = "triton_python_b"  # triton_python_backend_stub as /proc names it (cut to 15 characters)


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
    return [pid for pid, _, state, _, group in _processes() if group == pgid and state not in ("Z", "X")]


def dead_stubs(server_pid: int | None = None) -> list[int]:
    """Python-backend stubs that died under a running tritonserver (`server_pid`, or any there is):
    its children that exited and were never reaped.

    Why: Triton reaps a stub it stops itself (an unload, a roll-out, a shutdown), but it neither
    notices nor restarts one that dies on its own (killed, OOM-killed, crashed): that model instance
    answers every later request with "Stub process '<instance>' is not healthy." while
    /v2/health/live, /v2/health/ready and the model's ready endpoint all stay 200. A non-empty list
    is what a liveness check restarts the server for (`birdgen check-stubs`, docs/reliability.md).
    """
    table = _processes()
    servers = {pid for pid, name, *_ in table if name == SERVER_NAME}
    if server_pid is not None:
        servers &= {server_pid}
    return sorted(
        pid
        for pid, name, state, parent, _ in table
        if name == STUB_NAME and state == "Z" and parent in servers
    )


def _processes() -> list[tuple[int, str, str, int, int]]:
    """(pid, name, state, parent pid, process group) of every process /proc shows."""
    table = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text.rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp ...
            table.append((int(stat.parent.name), name, fields[0], int(fields[1]), int(fields[2])))
    return table


def wait_group_gone(pgid: int, timeout: float) -> bool:
    """Wait until no live process of group ``pgid`` is left (ports and GPU memory are free then)."""
    deadline = time.monotonic() + timeout
    while live_group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
