"""A process tree that dies with its parent: `python -m raybloom.reaper ROOT_PID` holds a pipe from the
process that started ROOT_PID and, when the pipe closes (that process ended, however it ended), SIGKILLs
ROOT_PID and everything below it, sessions of their own included (Flower's SuperExec is one), then runs
the last command written to the pipe as a JSON list on a line of its own, if any (the federated driver's:
end its MLflow run KILLED, written once it has one).

`python -m raybloom.reaper --ray DRIVER_PID RAY_DIR` does the same for a Ray a driver started in its own
process: its head processes die with the driver (Ray starts them with a parent-death signal), but the
raylet's agents (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`) notice the raylet gone only by polling, then
wait up to 60 s to tell the dead GCS. While the driver lives, the reaper notes (pid and start time) every
process below the driver's children that run from RAY_DIR (Ray's package: the GCS, the raylet, ...), every
second at first, then every 5 s; when the pipe closes it stops those still alive and kills them with their
trees. (An agent's environment is no guide: the title Ray gives it can overwrite what /proc shows.)

Standard library only: it starts in a moment and imports nothing of raybloom's."""

from __future__ import annotations

import os
import signal
import sys


def scan_proc() -> tuple[dict[int, list[int]], dict[int, int]]:
    """Every process's children by /proc's parent pids, and every process's start time (one read of /proc)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat = fh.read()
                fields = stat[stat.rindex(")") + 2:].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
                starts[int(entry)] = int(fields[19])
            except (OSError, ValueError, IndexError):
                continue
    return children, starts


def process_tree(root: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """`root` and its descendants, parents first."""
    children = scan_proc()[0] if children is None else children
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def freeze_tree(root: int, rounds: int = 20) -> list[int]:
    """SIGSTOP the tree under `root`, scanning again until a scan finds nobody new (a stopped process spawns
    nothing: a tree still being started, a ServerApp starting Ray, is caught whole); its pids."""
    stopped: dict[int, None] = {}  # in the order found: parents first
    for _ in range(rounds):
        new = [pid for pid in process_tree(root) if pid not in stopped]
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except OSError:
                pass
        stopped.update(dict.fromkeys(new))
    return list(stopped)


def _ray_below(driver: int, ray_dir: str) -> dict[int, int | None]:
    """The trees of `driver`'s children that run from `ray_dir`, by pid, with their start times."""
    found: dict[int, int | None] = {}
    marker = (ray_dir.rstrip("/") + "/").encode()
    children, starts = scan_proc()
    for child in children.get(driver, []):  # Ray's head processes are the driver's own children
        if child == os.getpid():  # this reaper names that folder too
            continue
        try:
            with open(f"/proc/{child}/cmdline", "rb") as fh:
                ours = marker in fh.read()
        except OSError:
            continue
        if ours:
            found.update((pid, starts.get(pid)) for pid in process_tree(child, children))
    return found


def reap_ray(driver: int, ray_dir: str) -> None:
    """Note the driver's Ray processes until the pipe on stdin closes, then kill those still alive."""
    import select

    seen: dict[int, int | None] = {}
    scans = 0
    while True:
        seen.update(_ray_below(driver, ray_dir))
        scans += 1
        ready, _, _ = select.select([0], [], [], 1.0 if scans < 30 else 5.0)
        if ready and not os.read(0, 4096):  # the driver's end closed: it ended, however it ended
            break
    now = scan_proc()[1]
    alive = [pid for pid, start in seen.items() if start is not None and now.get(pid) == start]
    for pid in alive:  # all stopped first: none exits (and its pid goes to another process) before its kill
        try:
            os.kill(pid, signal.SIGSTOP)
        except OSError:
            pass
    for pid in alive:
        kill_tree(pid)


def kill_tree(root: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send `sig` to the whole tree under `root`, frozen first (taken before any of it dies: orphans move to
    init), then let it go on (a SIGTERM is handled by processes that run)."""
    tree = freeze_tree(root)
    for pid in tree:
        for s in (sig, signal.SIGCONT):
            try:
                os.kill(pid, s)
            except OSError:
                pass
    return tree


if __name__ == "__main__":  # python -m raybloom.reaper ROOT_PID | --ray DRIVER_PID RAY_DIR; see the module's text
    import json

    if sys.argv[1] == "--ray":
        reap_ray(int(sys.argv[2]), sys.argv[3])
        sys.exit(0)
    command: list[str] = []
    for line in sys.stdin.buffer:  # until the parent's end of the pipe closes; each JSON list replaces the one before
        try:
            command = json.loads(line)
        except ValueError:  # a line cut short by the parent's death: the command before it stands
            pass
    kill_tree(int(sys.argv[1]))
    if command:
        import subprocess

        subprocess.run(command, stdin=subprocess.DEVNULL, timeout=300, check=False)
