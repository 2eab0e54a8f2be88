"""A process tree that dies with its parent: `python -m raybloom.reaper ROOT_PID` holds a pipe from the
process that started ROOT_PID and, when the pipe closes (that process ended, however it ended), SIGKILLs
ROOT_PID and everything below it, sessions of their own included (Flower's SuperExec is one), then runs
the last command written to the pipe as a JSON list on a line of its own, if any (the federated driver's:
end its MLflow run KILLED, written once it has one).

`python -m raybloom.reaper --ray-node NODE_ID` does the same for a Ray a driver started in its own process: its
head processes die with the driver (Ray starts them with a parent-death signal), but the raylet's agents
(`ray::DashboardAgent`, `ray::RuntimeEnvAgent`) notice the raylet gone only by polling, then wait up to 60 s
to tell the dead GCS; on the pipe's close the reaper kills every process whose environment names that node
(`RAY_NODE_ID`, a random id: never another Ray's) and everything below them.

Standard library only: it starts in a moment and imports nothing of raybloom's."""

from __future__ import annotations

import os
import signal
import sys


def process_tree(root: int) -> list[int]:
    """`root` and its descendants (by /proc's parent pids), parents first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat = fh.read()
                children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
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


def processes_of_ray_node(node_id: str) -> list[int]:
    """The processes whose environment holds `RAY_NODE_ID=node_id` (the agents of that node's raylet)."""
    wanted = f"RAY_NODE_ID={node_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if wanted in fh.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
    return found


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


if __name__ == "__main__":  # python -m raybloom.reaper ROOT_PID | --ray-node NODE_ID; see the module's text
    import json

    if sys.argv[1] == "--ray-node":
        for _ in sys.stdin.buffer:  # until the driver's end of the pipe closes
            pass
        found = processes_of_ray_node(sys.argv[2])
        for pid in found:  # all stopped first: none exits (and its pid goes to another process) before its kill
            try:
                os.kill(pid, signal.SIGSTOP)
            except OSError:
                pass
        for pid in found:
            kill_tree(pid)
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
