"""A process tree that dies with its parent: `python -m raybloom.reaper ROOT_PID` holds a pipe from the
process that started ROOT_PID and, when the pipe closes (that process ended, however it ended), SIGKILLs
ROOT_PID and everything below it, sessions of their own included (Flower's SuperExec is one), then runs
the last command written to the pipe as a JSON list on a line of its own, if any (the federated driver's:
end its MLflow run KILLED, written once it has one). Standard
library only: it starts in a moment and imports nothing of raybloom's."""

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


if __name__ == "__main__":  # python -m raybloom.reaper ROOT_PID; the pipe's last whole line runs after the kill
    import json

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
