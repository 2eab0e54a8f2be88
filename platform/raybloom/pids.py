"""Processes by pid on Linux (/proc): a process is its pid *and* its start time (pids are reused). Shared
by the local cluster (`cluster.procs`) and `--resume` (is a run's driver still alive?)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class Proc:
    pid: int
    ppid: int
    pgid: int
    start: int  # clock ticks after boot: with the pid, identifies a process (pids are reused)
    state: str
    cmd: str


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def read_proc(pid: int) -> Optional[Proc]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    cmd = raw.replace(b"\0", b" ").decode(errors="replace").strip() or stat[stat.index("(") + 1:stat.rindex(")")]
    return Proc(pid, int(fields[1]), int(fields[2]), int(fields[19]), fields[0], cmd)


def alive(pid: int, start: int) -> bool:
    """Is this exact process (pid and start time) still running? Zombies count as gone."""
    p = read_proc(pid)
    return p is not None and p.start == start and p.state not in ("Z", "X")


def signal_if_alive(p: Proc, sig: int) -> None:
    """Signal this exact process (pid and start time) if it still runs: never a reused pid."""
    if alive(p.pid, p.start):
        try:
            os.kill(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
