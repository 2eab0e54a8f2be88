"""Where a run's wall time goes, for benchmarks and for a user asking why a short job takes as long as it does.

With $RAYBLOOM_TIMELINE naming a file, every process of a run (the driver, each Ray Train worker) appends one
line per step to it: `<unix time> <pid> <step>`; unset (the default), `mark` does nothing but read the
environment. `read` parses such a file. The steps are named where they are marked (`grep -rn mark(`);
tests/benchmarks/bench_ray_e2e.py turns them into the start-up account in README.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "RAYBLOOM_TIMELINE"


def mark(step: str) -> None:
    path = os.environ.get(ENV)
    if path:
        try:
            with open(path, "a", encoding="utf-8") as f:  # one short write: lines of concurrent processes stay whole
                f.write(f"{time.time():.4f} {os.getpid()} {step}\n")
        except OSError:  # a diagnostic never stops a run (the folder may not exist on another node)
            pass


def read(path: str | Path) -> list[tuple[float, int, str]]:
    """(time, pid, step) of every line, in time order."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        t, pid, step = line.split(" ", 2)
        rows.append((float(t), int(pid), step))
    return sorted(rows)
