"""Is it up yet: MLflow's /health, Ray's ALIVE nodes, waiting for a check, the tail of a log."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Optional


def mlflow_healthy(uri: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def alive_nodes(dashboard: str) -> Optional[list]:
    """ALIVE Ray nodes, asked of the dashboard's state API (no driver joins the cluster); None when
    the dashboard does not answer."""
    try:
        from ray.util.state import list_nodes

        return list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], timeout=10)
    except Exception:  # noqa: BLE001 - not up yet, or gone
        return None


def wait(what: str, check, timeout: float, procs: list[subprocess.Popen] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: the process exited with code {p.returncode}")
        time.sleep(0.5)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
