"""Processes by pid on Linux (/proc), for `raybloom cluster`: a process is its pid *and* its start
time (pids are reused), a cluster is the processes a record names, the members of its process groups,
anything whose command line names its temp dir, and all their descendants. Stopping follows `ray stop`'s
order (raylets, the rest, the GCS) with SIGTERM, then SIGKILL."""

from __future__ import annotations

import os
import re
import signal
import time

from raybloom.pids import Proc, alive, boot_id, read_proc, signal_if_alive


def _all_procs() -> dict[int, Proc]:
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            p = read_proc(int(entry))
            if p is not None and p.state not in ("Z", "X"):
                procs[p.pid] = p
    return procs


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        p = read_proc(pid)
        pid = p.ppid if p else 0
    return pids


def cluster_processes(record: dict) -> dict[int, Proc]:
    """The live processes of the cluster `record` describes, and nothing else."""
    if record.get("boot_id") != boot_id():
        return {}
    procs = _all_procs()
    ours = {p["pid"] for p in record.get("processes", []) if p["pid"] in procs and procs[p["pid"]].start == p["start"]}
    groups = set(record.get("pgids", []))
    since = record.get("since_ticks", 0)
    paths = [record["temp_dir"]] if record.get("temp_dir") else []
    paths += record.get("markers", [])  # other folders only the cluster's processes name (--secure: PostgreSQL's)
    marker = re.compile("(?:" + "|".join(map(re.escape, paths)) + r")(?![\w-])") if paths else None
    for p in procs.values():
        if p.start >= since and (p.pgid in groups or (marker and marker.search(p.cmd))):
            ours.add(p.pid)
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    stack = list(ours)
    while stack:  # descendants: raylet workers, a job's driver (Ray Jobs puts it in a session of its own)
        for c in children.get(stack.pop(), []):
            if c not in ours:
                ours.add(c)
                stack.append(c)
    ours -= _ancestors()
    return {pid: procs[pid] for pid in ours}


def _signal(procs: dict[int, Proc], sig: int) -> None:
    for p in procs.values():
        signal_if_alive(p, sig)


def _wait_gone(procs: dict[int, Proc], timeout: float) -> dict[int, Proc]:
    deadline = time.monotonic() + timeout
    while True:
        left = {pid: p for pid, p in procs.items() if alive(p.pid, p.start)}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def _bucket(p: Proc) -> int:
    """The order `ray stop` uses: raylets first, then the rest, the GCS last."""
    exe = p.cmd.split()[0] if p.cmd else ""
    return 0 if exe.endswith("/raylet") else 2 if exe.endswith("/gcs_server") else 1


def stop_processes(record: dict, timeout: float = 15.0) -> tuple[int, list[Proc], list[Proc]]:
    """SIGTERM the cluster's processes in `ray stop`'s order (raylets, the rest, the GCS), each group
    SIGKILLed if still there after a third of `timeout` s. Returns (how many ended on SIGTERM, those that
    needed SIGKILL, survivors)."""
    total: dict[int, Proc] = {}
    killed: dict[int, Proc] = {}
    for bucket in range(3):
        targets = {pid: p for pid, p in cluster_processes(record).items() if _bucket(p) == bucket}
        total.update(targets)
        _signal(targets, signal.SIGTERM)
        left = _wait_gone(targets, timeout / 3)
        killed.update(left)
        _signal(left, signal.SIGKILL)
    for _ in range(3):  # a dying raylet may still have started a worker: look again
        left = {pid: p for pid, p in {**total, **cluster_processes(record)}.items() if alive(p.pid, p.start)}
        if not left:
            break
        total.update(left)
        killed.update(left)
        _signal(left, signal.SIGKILL)
        _wait_gone(left, 5)
    survivors = [p for p in total.values() if alive(p.pid, p.start)]
    return len(total) - len(killed), list(killed.values()), survivors
