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


def write_flwr_home(home: Path, address: str, ca: Optional[str] = None, name: str = CONNECTION,
                    options: Optional[dict[str, object]] = None) -> None:
    """$FLWR_HOME/config.toml with `address` as the default connection `name`: TLS checked against `ca`
    when given, else plain (loopback); `options` (dotted keys: `num-supernodes`, `backend.client-resources.
    num-cpus`, ...) for a SuperLink in simulation mode. Left as it is when it already says exactly that."""
    home.mkdir(parents=True, exist_ok=True)
    trust = f'root-certificates = "{ca}"' if ca else "insecure = true"
    extra = "".join(f"options.{k} = {json.dumps(v)}\n" for k, v in (options or {}).items())
    text = f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{trust}\n{extra}'
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
