"""The Flower side of a connection: `$FLWR_HOME/config.toml` (where `flwr` finds a SuperLink), the
`flwr` command itself, and raybloom's Flower app (its declaration, its run config keys, `flwr run` of it),
shared by federated runs and the local cluster's SuperLink. Light to import (no torch, no MLflow): the
simulation's SuperLink is started and the app submitted before the driver imports those."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from raybloom.errors import UserError

CONNECTION = "raybloom"  # the `[superlink.raybloom]` entry raybloom writes

# the app's run config: what `raybloom run` hands the ServerApp
SPEC_KEY = "raybloom-spec"  # the job spec as JSON (also the key of the spec in the messages to the clients)
RUN_ID_KEY = "raybloom-run-id"
URI_KEY = "raybloom-tracking-uri"
SPEC_FILE_KEY = "raybloom-spec-file"
TRIAL_KEY = "raybloom-trial"  # a search trial's reference (JSON): the ServerApp reports each round to it
HANDOFF_KEY = "raybloom-handoff"  # simulation: a file the driver writes the three above to once it has them
# beside the hand-off, in the simulation's folder: the driver's "pid start-time" (a ServerApp waiting for the
# hand-off gives up once that process is gone) and the file the ServerApp creates once it has ended the run
DRIVER_FILE = "driver"
RECORDED_FILE = "recorded"
RUN_CONFIG_KEYS = (SPEC_KEY, RUN_ID_KEY, URI_KEY, SPEC_FILE_KEY, TRIAL_KEY, HANDOFF_KEY)


def app_pyproject() -> str:
    """The Flower app's declaration: what the source tree's pyproject.toml says under [tool.flwr.app]."""
    config = "".join(f'{k} = ""\n' for k in RUN_CONFIG_KEYS)
    return ('[project]\nname = "raybloom"\nversion = "0.1.0"\n'
            'description = "raybloom\'s Flower app: its code is the installed raybloom package"\n'
            'license = { text = "Apache-2.0" }\n\n[tool.flwr.app]\npublisher = "raybloom"\n\n'
            '[tool.flwr.app.components]\nserverapp = "raybloom.federated.server_app:app"\n'
            f'clientapp = "raybloom.federated.client_app:app"\n\n[tool.flwr.app.config]\n{config}')


@functools.cache
def app_dir() -> Path:
    """The folder `flwr run` builds the app from: one written here with the app's declaration and no code.
    The ServerApp and ClientApp are imported from the installed raybloom package wherever they run (a
    FAB's files are not on the import path as `raybloom`), so the FAB need not carry them; building it
    from the source tree instead matched `fab-include` against every file there (the virtualenv too:
    8 s a run on 2 cores). The source tree's pyproject.toml declares the same app for plain `flwr run .`."""
    folder = Path(tempfile.mkdtemp(prefix="raybloom-flwr-app-"))
    (folder / "pyproject.toml").write_text(app_pyproject())
    return folder


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


def flwr_command(*args: str) -> list[str]:
    """This virtualenv's `flwr` command with `args`."""
    return [str(Path(sys.executable).with_name("flwr")), *args]


def flwr_env(home: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(home)}


def flwr_cli(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """`flwr args...` with FLWR_HOME=home, run to its end."""
    return subprocess.run(flwr_command(*args), capture_output=True, text=True, timeout=timeout, env=flwr_env(home))


def flwr_json(proc: subprocess.CompletedProcess) -> Optional[dict]:
    """The JSON object `flwr ... --format json` printed (after any log lines), or None."""
    try:
        return json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        return None


def flwr_answer(proc: subprocess.CompletedProcess, what: str) -> dict:
    """What `flwr ... --format json` answered, or a UserError naming `what` with its output."""
    found = flwr_json(proc)
    if found is None:
        raise UserError(f"{what} failed (exit {proc.returncode}): {(proc.stdout + proc.stderr).strip()[-1500:]}")
    return found


def run_args(home: Path, connection: str, config: dict[str, str], name: str) -> tuple[str, ...]:
    """`flwr run`'s arguments for the app on `connection` with `config` as its run config (written to
    `home/run-<name>.toml`), answering in JSON (`submitted_run` reads the answer)."""
    path = home / f"run-{name}.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
    return "run", str(app_dir()), connection, "--run-config", str(path), "--format", "json"


def submitted_run(proc: subprocess.CompletedProcess) -> str:
    """Flower's run id from what `flwr run --format json` answered, or a UserError with its output."""
    submitted = flwr_answer(proc, "flwr run")
    if not submitted.get("success", True) or "run-id" not in submitted:
        raise UserError(f"flwr run did not submit the app: {submitted}")
    return str(submitted["run-id"])
