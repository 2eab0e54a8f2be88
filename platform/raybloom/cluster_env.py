"""cluster.env: the `KEY=VALUE` file `raybloom cluster up` writes and drivers read to reach that cluster
(`RAY_ADDRESS`, `RAY_DASHBOARD_ADDRESS`, `MLFLOW_TRACKING_URI`, and with `--secure` its credentials)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Optional

STATE_ENV = "RAYBLOOM_STATE_DIR"
ENV_FILE = "cluster.env"


def state_dir(explicit: Optional[Path] = None) -> Path:
    """`--state-dir`, else $RAYBLOOM_STATE_DIR, else .raybloom in the current folder."""
    return Path(explicit or os.environ.get(STATE_ENV) or ".raybloom").resolve()


def read_env(folder: Optional[Path] = None) -> dict[str, str]:
    """The KEY=VALUE pairs of cluster.env ({} when there is none)."""
    path = state_dir(folder) / ENV_FILE
    if not path.is_file():
        return {}
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            pairs[key.strip()] = (shlex.split(value) or [""])[0]
    return pairs
