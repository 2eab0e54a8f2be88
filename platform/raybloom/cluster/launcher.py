"""Starting the local cluster's processes: each in a process group of its own, recorded as it starts."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from raybloom.cluster import procs
from raybloom.cluster.state import save_record


class Launcher:
    """Starts processes in groups of their own and records them (cluster.json) as it goes."""

    def __init__(self, folder: Path, record: dict, env: dict[str, str]):
        self.folder, self.record, self.env = folder, record, env
        self.umask = -1  # --secure: 0o077, so what the processes write (logs, artifacts, state) is theirs alone
        self.logs = folder / "cluster" / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def spawn(self, role: str, cmd: list[str], **env: str) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{role}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**self.env, **env}, start_new_session=True, cwd=self.folder, umask=self.umask)
        self.record["pgids"].append(proc.pid)
        self.record["groups"].append({"role": role, "pgid": proc.pid, "log": str(log), "cmd": shlex.join(cmd)})
        self.snapshot()
        return proc, log

    def snapshot(self) -> None:
        """Record every live process of the cluster (pid, start time, group, command line)."""
        known = {(p["pid"], p["start"]) for p in self.record["processes"]}
        for p in procs.cluster_processes(self.record).values():
            if (p.pid, p.start) not in known:
                self.record["processes"].append({"pid": p.pid, "start": p.start, "pgid": p.pgid, "cmd": p.cmd[:300]})
        save_record(self.folder, self.record)
