"""The Flower side of a connection: `$FLWR_HOME/config.toml` (where `flwr` finds a SuperLink) and the
`flwr` command itself, shared by federated deployment runs and the local cluster's SuperLink."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

CONNECTION = "raybloom"  # the `[superlink.raybloom]` entry raybloom writes


def write_flwr_home(home: Path, address: str, ca: Optional[str] = None) -> None:
    """$FLWR_HOME/config.toml with `address` as the default connection `raybloom`: TLS checked against
    `ca` when given, else plain (loopback). Left as it is when it already says exactly that."""
    home.mkdir(parents=True, exist_ok=True)
    trust = f'root-certificates = "{ca}"' if ca else "insecure = true"
    text = f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{trust}\n'
    config = home / "config.toml"
    if not config.is_file() or config.read_text() != text:
        config.write_text(text)


def flwr_cli(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """This virtualenv's `flwr` command with FLWR_HOME=home."""
    return subprocess.run([str(Path(sys.executable).with_name("flwr")), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "FLWR_HOME": str(home)})


def flwr_json(proc: subprocess.CompletedProcess) -> Optional[dict]:
    """The JSON object `flwr ... --format json` printed (after any log lines), or None."""
    try:
        return json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        return None
