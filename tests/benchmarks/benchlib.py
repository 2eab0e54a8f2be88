"""Helpers the benchmark scripts share: machine facts, load, CPU used by others, quartiles, a scratch folder,
writing the results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(**extra) -> dict:
    """CPU, cores and Python of this machine, plus the versions the caller adds (torch=..., ray=...)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable, **extra,
            "python": platform.python_version(), "platform": platform.platform()}


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def wait_quiet(max_s: float, threshold: float = 1.0, poll_s: float = 15.0) -> dict:
    """Wait (at most max_s) for a 1-minute load average below threshold; say how it went."""
    t0 = time.monotonic()
    seen = []
    while True:
        la = os.getloadavg()[0]
        seen.append(round(la, 2))
        quiet = la < threshold
        if quiet or time.monotonic() - t0 + poll_s > max_s:
            return {"quiet": quiet, "threshold": threshold, "waited_s": round(time.monotonic() - t0), "loadavg_1min": seen}
        print(f"waiting for a quiet machine: 1-min load average {la:.2f} >= {threshold}", flush=True)
        time.sleep(poll_s)


def proc_fields() -> dict[int, list[str]]:
    """pid -> the fields of /proc/PID/stat after the command name (field 0 is the state, 1 the ppid)."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        out[int(entry.name)] = raw[raw.rfind(")") + 2:].split()
    return out


def descendants(parent: dict[int, int], root: int) -> list[int]:
    """root and every process below it."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack += children.get(pid, [])
    return found


def tree_ticks() -> int:
    """CPU ticks (utime+stime+cutime+cstime) used by this process and all its descendants."""
    fields = proc_fields()
    parent = {pid: int(f[1]) for pid, f in fields.items()}
    return sum(sum(int(v) for v in fields[pid][11:15]) for pid in descendants(parent, os.getpid()) if pid in fields)


def busy_ticks() -> int:
    f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(f[:3]) + sum(f[5:8])  # user nice system (no idle, iowait) irq softirq steal


class OthersMeter:
    """Cores used on average by processes outside this process tree (Ray's daemons and workers are inside)."""

    def __init__(self):
        self.ok = Path("/proc/stat").exists()
        self.hz = os.sysconf("SC_CLK_TCK") if self.ok else 100

    def start(self) -> "OthersMeter":
        if self.ok:
            self.t0, self.busy0, self.ours0 = time.perf_counter(), busy_ticks(), tree_ticks()
        return self

    def stop(self) -> dict | None:
        if not self.ok:
            return None
        dt = time.perf_counter() - self.t0
        busy, ours = (busy_ticks() - self.busy0) / self.hz, (tree_ticks() - self.ours0) / self.hz
        # ours can miss processes that exited (Ray workers killed while idle): others is an upper bound
        return {"seconds": round(dt, 1), "all_cores": round(busy / dt, 2), "ours_cores": round(ours / dt, 2),
                "others_cores": round(max(0.0, busy - ours) / dt, 2)}


class SampledOthersMeter:
    """Like OthersMeter, but this process tree's CPU is sampled every `every` s while it runs, so processes
    that exit before the end (Ray Train's workers, after `fit`) still count as ours, not as others."""

    def __init__(self, every: float = 0.25):
        import threading

        self.every, self.hz = every, os.sysconf("SC_CLK_TCK")
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.running = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self) -> dict[int, int]:
        fields = proc_fields()
        parent = {pid: int(f[1]) for pid, f in fields.items()}
        return {pid: sum(int(v) for v in fields[pid][11:13]) for pid in descendants(parent, os.getpid()) if pid in fields}

    def _run(self) -> None:
        while self.running:
            for pid, ticks in self._tree().items():
                self.last[pid] = ticks
            time.sleep(self.every)

    def start(self) -> "SampledOthersMeter":
        self.t0, self.busy0 = time.perf_counter(), busy_ticks()
        self.first = self._tree()
        self.running = True
        self.thread.start()
        return self

    def stop(self) -> dict:
        self.running = False
        self.thread.join()
        for pid, ticks in self._tree().items():
            self.last[pid] = ticks
        dt = time.perf_counter() - self.t0
        ours = sum(ticks - self.first.get(pid, 0) for pid, ticks in self.last.items()) / self.hz
        busy = (busy_ticks() - self.busy0) / self.hz
        return {"seconds": round(dt, 1), "all_cores": round(busy / dt, 2), "ours_cores": round(ours / dt, 2),
                "others_cores": round(max(0.0, busy - ours) / dt, 2)}


def quartiles(v: list[float]) -> tuple[float, float]:
    if len(v) < 2:
        return v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], q[2]



def scratch(prefix: str) -> tempfile.TemporaryDirectory:
    """A temp folder for everything a benchmark's runs write: the data (unless $RAYBLOOM_DATA_DIR is set) and
    the MLflow store; Ray always starts in this process, never joining another cluster."""
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    work = Path(tmp.name)
    os.environ.setdefault("RAYBLOOM_DATA_DIR", str(work / "data"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ.pop("RAY_ADDRESS", None)
    return tmp


def write_results(out: str | Path, stem: str, result: dict, text: str) -> None:
    """Print the markdown and write it with the figures as OUT/STEM.md and OUT/STEM.json."""
    print()
    print(text)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
